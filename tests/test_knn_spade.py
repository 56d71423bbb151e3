"""SPADE on global + patch features and the ViT token extractor, against brute-force computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adlib.data.imageset import ImageSet
from adlib.features import vit
from adlib.methods import base, catalog, spade


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(7, 6, generator=g), torch.randn(7, 4, 3, 5, generator=g),
            torch.randn(3, 6, generator=g), torch.randn(3, 4, 3, 5, generator=g))


def test_nearest_images_matches_cdist():
    train_g, _, test_g, _ = _data()
    d = torch.cdist(test_g.double(), train_g.double())
    expected = d.topk(3, largest=False)
    dist, idx = spade.nearest_images(train_g, test_g, 3)
    np.testing.assert_allclose(dist, expected.values.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(idx, expected.indices.numpy())


@pytest.mark.parametrize("k, kappa", [(1, 1), (3, 1), (3, 2), (7, 4)])
def test_spade_matches_brute_force(k, kappa):
    train_g, train_p, test_g, test_p = _data()
    maps, scores, extras = spade.SPADE(k=k, kappa=kappa).fit(train_g, train_p).predict(test_g, test_p)
    for n in range(3):
        dists = [float(torch.linalg.norm(test_g[n] - train_g[m])) for m in range(7)]
        near = np.argsort(dists)[:k]
        assert scores[n] == pytest.approx(np.sort(dists)[:k].mean(), rel=1e-5)
        assert sorted(extras["neighbours"][n]) == sorted(near)  # the gallery, returned with the scores
        for i in range(3):
            for j in range(5):
                # Every position of every gallery image, not just the same position (i, j).
                gallery = [float(torch.linalg.norm(test_p[n, :, i, j] - train_p[m, :, a, b]))
                           for m in near for a in range(3) for b in range(5)]
                assert maps[n, i, j] == pytest.approx(np.sort(gallery)[:kappa].mean(), rel=1e-4, abs=1e-5)


def test_spade_gallery_is_restricted_to_the_nearest_images():
    train_g, train_p, test_g, test_p = _data()
    # Put an exact copy of test patch (0, 1, 2) into the training image farthest from test image 0 globally.
    far = int(torch.cdist(test_g[:1], train_g).argmax())
    train_p = train_p.clone()
    train_p[far, :, 0, 0] = test_p[0, :, 1, 2]
    maps_k1 = spade.SPADE(k=1).fit(train_g, train_p).predict(test_g, test_p).maps
    maps_all = spade.SPADE(k=7).fit(train_g, train_p).predict(test_g, test_p).maps
    assert maps_k1[0, 1, 2] > 0.1  # the copy is outside the 1-image gallery
    assert maps_all[0, 1, 2] == pytest.approx(0.0, abs=1e-3)  # and found once every image is in it


def test_spade_errors():
    train_g, train_p, test_g, test_p = _data()
    with pytest.raises(ValueError, match="lower k"):
        spade.SPADE(k=50).fit(train_g, train_p)
    with pytest.raises(RuntimeError, match="Call fit"):
        spade.SPADE(k=1).predict(test_g, test_p)
    with pytest.raises(ValueError, match="same M images"):
        spade.SPADE(k=1).fit(train_g[:5], train_p)
    with pytest.raises(ValueError, match="differ"):
        spade.SPADE(k=1).fit(train_g, train_p).predict(test_g, test_p[:, :2])



def test_spade_detector_carries_the_global_feature_beside_the_patches():
    g = torch.Generator().manual_seed(0)
    train, test = torch.rand(4, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    det = spade.SPADEDetector(backbone="random-resnet18", k=2)
    maps, feats = det.extractor(test), det.features(test)
    torch.testing.assert_close(feats.pooled, maps[-1].mean(dim=(2, 3)))  # the pool step: the last map's mean
    assert feats.patches.shape[1] == sum(m.shape[1] for m in maps)  # no global channels among the patches
    scores = det.fit(ImageSet(train)).predict(ImageSet(test))
    fitted = det.features(train)
    patch_maps, image, extras = spade.SPADE(k=2).fit(fitted.pooled, fitted.patches).predict(feats.pooled,
                                                                                              feats.patches)
    np.testing.assert_allclose(scores.image, image)
    np.testing.assert_allclose(scores.maps, base.to_pixel_maps(patch_maps, 32, det.sigma))
    np.testing.assert_array_equal(scores.extras["neighbours"], extras["neighbours"])  # (N, k) indices into train

def test_spade_global_feature_from_the_final_stage_is_not_a_patch_feature(tmp_path):
    g = torch.Generator().manual_seed(0)
    train, test = torch.rand(4, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    det = spade.SPADEDetector(backbone="random-resnet18", k=2, global_stage=4)
    maps = det.extractor(test)
    assert [m.shape[1] for m in maps] == [64, 128, 512]  # stages 1, 2 and the final stage 4
    feats = det.features(test)
    torch.testing.assert_close(feats.pooled, maps[-1].mean(dim=(2, 3)))
    assert feats.patches.shape[1] == 64 + 128 and det.layers == (1, 2) and det.hparams()["global_stage"] == 4
    det.fit(ImageSet(train))
    loaded, _ = catalog.load_detector(det.save(tmp_path / "spade.pt"))
    assert loaded.layers == (1, 2) and loaded.global_stage == 4
    np.testing.assert_allclose(loaded.predict(ImageSet(test)).image, det.predict(ImageSet(test)).image)
    inside = spade.SPADEDetector(backbone="random-resnet18", k=2, global_stage=2)  # one of the patch layers
    torch.testing.assert_close(inside.features(test).pooled, inside.extractor(test)[-1].mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="global_stage"):
        spade.SPADEDetector(backbone="random-resnet18", layers=(2, 3), global_stage=1)
    with pytest.raises(ValueError, match="global_stage=None"):  # the fractal ResNet-18 ships stages 0-2
        spade.SPADEDetector(backbone="book-resnet18", global_stage=4)


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    return vit.vit_backbone("vit_tiny_patch16_224", image_size=32, patch_size=8, seed=0)


def test_vit_stages_are_the_blocks_outputs(tiny_vit):
    model = tiny_vit
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = torch.cat(vit.ViTStages(model, (0, 2))(x), 1)
    assert tokens.shape == (2, 2 * model.embed_dim, 4, 4)
    # Independent path: run the blocks by hand and fold the patch tokens (class token dropped) into a grid.
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        outs = []
        for i, block in enumerate(model.blocks[:3]):
            h = block(h)
            if i in (0, 2):
                outs.append(h[:, model.num_prefix_tokens:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2))
    torch.testing.assert_close(tokens, torch.cat(outs, 1))
    with pytest.raises(ValueError, match="blocks must be"):
        vit.ViTStages(model, (12,))


def test_vit_backbone_loads_a_local_file_and_repeats_with_a_seed(tiny_vit, tmp_path):
    model = tiny_vit
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    loaded = vit.vit_backbone("vit_tiny_patch16_224", image_size=32, patch_size=8, seed=2,
                                    weights=str(tmp_path / "vit.pth"))
    again = vit.vit_backbone("vit_tiny_patch16_224", image_size=32, patch_size=8, seed=0)
    torch.testing.assert_close(again.patch_embed.proj.weight, model.patch_embed.proj.weight)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.ViTStages(loaded, (1,))(x)[0], vit.ViTStages(model, (1,))(x)[0])
    with pytest.raises(FileNotFoundError, match="No weights"):
        vit.vit_backbone("vit_tiny_patch16_224", image_size=32, weights=str(tmp_path / "missing.pth"))
