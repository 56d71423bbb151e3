"""AA-CLIP: residual adapters, losses (hand-worked cases), shapes, frozen backbone, few-shot splits."""
from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from adlib.data.imageset import ImageSet
from adlib.features import clip
from adlib.methods.aaclip import adapters, losses, scoring, training

SMALL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(one_thread) -> clip.open_clip.CLIP:
    torch.manual_seed(0)
    return clip.build_tiny_clip(SMALL).eval()


def make_model(tiny, **kw) -> adapters.AACLIP:
    torch.manual_seed(1)
    args = dict(text_adapt_until=1, image_adapt_until=2, levels=(2, 3))
    args.update(kw)
    return adapters.AACLIP(tiny, **args)


def toy_batch(n: int = 4, size: int = 32) -> ImageSet:
    """``n`` random images in [0, 1] of a "star", the second half anomalous with a rectangular defect."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[n // 2:, 8:16, 8:20] = True
    labels = [0] * (n // 2) + [1] * (n - n // 2)
    return ImageSet(images, labels, masks, objects=["star"] * n)


# --------------------------------------------------------------------------- residual adapter


def test_residual_adapt_hand_case():
    x = torch.tensor([3.0, 4.0])
    a = torch.tensor([0.0, 7.0])  # rescaled to |x| = 5: (0, 5)
    out = adapters.residual_adapt(x, a, lam=0.1)
    torch.testing.assert_close(out, torch.tensor([0.9 * 3.0, 0.1 * 5.0 + 0.9 * 4.0]))


def test_residual_adapt_norm_property():
    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(50, 7, generator=g), torch.randn(50, 7, generator=g)
    out = adapters.residual_adapt(x, a, lam=0.3)
    assert torch.all(out.norm(dim=-1) <= x.norm(dim=-1) + 1e-5)  # triangle inequality
    # the adapter's scale does not matter
    torch.testing.assert_close(out, adapters.residual_adapt(x, 123.0 * a, lam=0.3))
    # an adapter output along x leaves x unchanged (equality case)
    torch.testing.assert_close(adapters.residual_adapt(x, 2.5 * x, lam=0.3), x)
    # orthogonal to x: |out| = |x| sqrt(lam^2 + (1 - lam)^2)
    x2, a2 = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 9.0]])
    assert adapters.residual_adapt(x2, a2, 0.3).norm().item() == pytest.approx(2.0 * math.hypot(0.3, 0.7))
    with pytest.raises(ValueError, match="lam"):
        adapters.residual_adapt(x, a, lam=1.5)


# --------------------------------------------------------------------------- losses


def test_disentangle_loss_hand_case():
    anchors = torch.tensor([[[1.0, 0.0], [0.6, 0.8]],   # <n, a> = 0.6
                            [[0.0, 1.0], [0.0, 1.0]]])  # <n, a> = 1.0
    assert losses.disentangle_loss(anchors).item() == pytest.approx(0.8 ** 2)  # square of the batch mean
    assert losses.disentangle_loss(anchors[0]).item() == pytest.approx(0.36)
    assert losses.disentangle_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item() == 0.0
    with pytest.raises(ValueError, match="normal, anomalous"):
        losses.disentangle_loss(torch.zeros(3, 4, 5))


def test_dice_loss_hand_case():
    pred = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # (2 * 1.5 + 1) / (1.5 + 2 + 1) = 4 / 4.5
    assert losses.dice_loss(pred, target).item() == pytest.approx(1.0 - 4.0 / 4.5)


def test_focal_loss_against_loop():
    g = torch.Generator().manual_seed(0)
    p1 = torch.rand(2, 3, 3, generator=g)
    probs = torch.stack([1.0 - p1, p1], dim=1).double()
    mask = (torch.rand(2, 3, 3, generator=g) > 0.5).double()
    s, total = 1e-5, 0.0
    for n in range(2):
        for i in range(3):
            for j in range(3):
                p_true = probs[n, int(mask[n, i, j]), i, j].item()
                pt = (1 - s) * p_true + s * (1 - p_true) + s
                total += -((1 - pt) ** 2) * math.log(pt)
    assert losses.focal_loss(probs, mask).item() == pytest.approx(total / 18, rel=1e-9)
    # one pixel by hand: P(anomalous) = 0.8 on a defect pixel
    one = torch.tensor([[[[0.2]], [[0.8]]]]).double()
    pt = (1 - s) * 0.8 + s * 0.2 + s
    assert losses.focal_loss(one, torch.ones(1, 1, 1)).item() == pytest.approx(-(1 - pt) ** 2 * math.log(pt))


def test_segmentation_loss_is_focal_plus_two_dice():
    probs = torch.tensor([[[[0.9, 0.4]], [[0.1, 0.6]]]])  # (1, 2, 1, 2)
    mask = torch.tensor([[[0.0, 1.0]]])
    expected = (losses.focal_loss(probs, mask) + losses.dice_loss(probs[:, 0], 1 - mask)
                + losses.dice_loss(probs[:, 1], mask))
    assert losses.segmentation_loss(probs, mask).item() == pytest.approx(expected.item())
    # dice terms by hand: normal map (0.9, 0.4) vs (1, 0): (1.8 + 1) / (1.3 + 1 + 1); anomalous (0.1, 0.6) vs (0, 1)
    dice = 2 - (2.8 / 3.3) - (2.2 / 2.7)
    assert (expected - losses.focal_loss(probs, mask)).item() == pytest.approx(dice)


def test_similarity_probs_shapes_and_softmax():
    patches = torch.nn.functional.normalize(torch.randn(3, 16, 8), dim=-1)
    anchors = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    logits = scoring.similarity_logits(patches, anchors, 10.0)
    assert logits.shape == (3, 2, 4, 4)
    torch.testing.assert_close(logits[1, 1, 2, 3], 10.0 * patches[1, 2 * 4 + 3] @ anchors[1])  # row-major grid
    probs = scoring.similarity_probs(patches, anchors, 10.0, 12)
    assert probs.shape == (3, 2, 12, 12)
    torch.testing.assert_close(probs.sum(1), torch.ones(3, 12, 12))


# --------------------------------------------------------------------------- model


def test_prompts_as_official_code():
    normal, anomalous = adapters.prompts("star")
    assert len(normal) == 6 and len(anomalous) == 10
    assert "a photo of the star." in normal and "a star with defect." in anomalous


def test_unadapted_paths_equal_clip(tiny):
    model = make_model(tiny, text_adapt_until=0, image_adapt_until=0, levels=(3,), copy_projections=True)
    tokens = clip.tokenize(["a photo of a star.", "a broken ring."], tiny)
    torch.testing.assert_close(model.encode_text(tokens, adapt=False), tiny.encode_text(tokens, normalize=True))
    # no adapters + projection copied from CLIP = CLIP's own text embedding
    torch.testing.assert_close(model.encode_text(tokens), tiny.encode_text(tokens, normalize=True))
    images = torch.randn(2, 3, 32, 32)  # as if normalised by clip.to_tensor
    patches, _ = model.encode_image(images)
    torch.testing.assert_close(patches[0], clip.encode_normalised(tiny, images)[1])


def test_projections_are_the_official_simple_proj_unless_copied(tiny):
    model = make_model(tiny)
    x = torch.randn(4, tiny.transformer.width)
    # text: Linear (no bias, Xavier start) + LeakyReLU; image: linear, as the official code without --relu
    torch.testing.assert_close(model.text_proj(x), F.leaky_relu(x @ model.text_proj.weight.T))
    torch.testing.assert_close(model.det_proj(x), x @ model.det_proj.weight.T)
    assert model.text_proj.bias is None and not model.seg_proj[0].relu
    bound = (6 / sum(model.text_proj.weight.shape)) ** 0.5  # xavier_uniform's bound
    assert model.text_proj.weight.abs().max() <= bound
    assert not torch.allclose(model.text_proj.weight, tiny.text_projection.T)
    copied = make_model(tiny, copy_projections=True)
    torch.testing.assert_close(copied.text_proj.weight, tiny.text_projection.T)
    torch.testing.assert_close(copied.det_proj.weight, tiny.visual.proj.T)


def test_shapes_and_scores(tiny):
    model = make_model(tiny)
    anchors = model.anchors("star")
    assert anchors.shape == (2, 32)
    torch.testing.assert_close(anchors.norm(dim=-1), torch.ones(2))
    patches, image = model.encode_image(torch.randn(3, 3, 32, 32))
    assert [p.shape for p in patches] == [(3, 16, 32)] * 2 and image.shape == (3, 32)
    images = ImageSet(np.random.default_rng(0).random((3, 3, 40, 40), dtype=np.float32))
    for stage in (1, 2):
        scores, maps = scoring.anomaly_scores(model, images, "star", stage)
        assert scores.shape == (3,) and maps.shape == (3, 40, 40)
        assert np.isfinite(maps).all() and np.all((scores >= 0) & (scores <= 1))
        # batch by batch (each batch through CLIP's preprocessing) as all at once, up to float rounding (some CPUs'
        # kernels sum in another order for another batch size); a bare float array as the set, exactly
        batched = scoring.anomaly_scores(model, images, "star", stage, batch_size=2)
        for got, want in zip(batched, (scores, maps)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        for got, want in zip(scoring.anomaly_scores(model, images.images, "star", stage), (scores, maps)):
            np.testing.assert_array_equal(got, want)
    # the official scores by hand, without blur: summed per-level logit differences, (cos(image, t_a) + 1) / 2
    scores, maps = scoring.anomaly_scores(model, images, "star", 2, sigma=0)
    with torch.no_grad():
        levels, image = model.encode_image(clip.to_tensor(images, clip.image_size(model.clip)))
        a = anchors.detach()
        by_hand = sum(model.logit_scale * (p @ a[1] - p @ a[0]) for p in levels)  # (N, P)
    side = int(round(by_hand.shape[1] ** 0.5))
    grid = torch.nn.functional.interpolate(by_hand.reshape(3, 1, side, side), size=(40, 40), mode="bilinear",
                                           align_corners=True)[:, 0]
    np.testing.assert_allclose(maps, grid.double().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores, ((image @ anchors[1] + 1) / 2).detach().double().numpy(), rtol=1e-5, atol=1e-6)
    sim = scoring.anchor_similarity(model, ["star", "ring"])
    assert sim.shape == (4, 4) and np.allclose(np.diag(sim), 1.0)
    with pytest.raises(ValueError, match="stage"):
        scoring.anomaly_scores(model, images, "star", 3)


def test_fused_image_score_is_the_official_metrics_eval():
    rng = np.random.default_rng(0)
    image_scores, maps = rng.random(6), 3 * rng.random((6, 5, 5)) - 1
    # forward_utils.metrics_eval of the AA-CLIP code, written out: min-max over the class, then half and half
    pixel = (maps - maps.min()) / (maps.max() - maps.min())
    image = (image_scores - image_scores.min()) / (image_scores.max() - image_scores.min())
    official = 0.5 * pixel.max(axis=(1, 2)) + 0.5 * image
    np.testing.assert_allclose(scoring.fused_image_scores(image_scores, maps), official, rtol=0, atol=1e-12)
    wider = scoring.ScoreRange((-1.0, 3.0), (-2.0, 6.0))  # other statistics: the same rule, other ranges
    np.testing.assert_allclose(scoring.fused_image_scores(image_scores, maps, wider),
                               0.5 * (maps.max(axis=(1, 2)) + 2) / 8 + 0.5 * (image_scores + 1) / 4, atol=1e-12)


def test_fused_scorer_takes_its_ranges_from_the_reference_normal_images_only(tiny):
    model = make_model(tiny)
    rng = np.random.default_rng(1)
    test = ImageSet(rng.random((4, 3, 32, 32), dtype=np.float32), objects=["star"] * 4)
    reference = ImageSet(rng.random((4, 3, 32, 32), dtype=np.float32), labels=[0, 0, 0, 1],
                         objects=["ring", "ring", "star", "star"])
    got, maps = scoring.fused_scorer(model, 2, reference)(test, "star")
    parts = [scoring.anomaly_scores(model, reference[idx], name) for idx, name in (([0, 1], "ring"), ([2], "star"))]
    ranges = scoring.ScoreRange.of(np.concatenate([a for a, _ in parts]), np.concatenate([m for _, m in parts]))
    raw, raw_maps = scoring.anomaly_scores(model, test, "star")
    np.testing.assert_array_equal(maps, raw_maps)
    np.testing.assert_allclose(got, scoring.fused_image_scores(raw, raw_maps, ranges), atol=1e-12)
    own = scoring.fused_scorer(model, 2, None)(test, "star")[0]  # the official code's test-set statistics
    np.testing.assert_allclose(own, scoring.fused_image_scores(raw, raw_maps), atol=1e-12)


def test_augmentation_moves_image_and_mask_together_as_the_official_code():
    images = torch.full((40, 3, 16, 16), 0.2)
    masks = torch.zeros(40, 16, 16)
    images[:, :, 3, 5] = 1.0  # one white pixel, and the mask on it
    masks[:, 3, 5] = 1.0
    torch.manual_seed(0)
    out, out_masks = training.augment(images, masks, colour=False)
    assert out.shape == images.shape and out_masks.shape == masks.shape
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}  # nearest-neighbour: still a mask
    moved = 0
    for x, m in zip(out, out_masks):
        assert torch.equal(x[0] == 1.0, m == 1.0)  # wherever the pixel went, its mask went
        moved += int(m[3, 5] != 1.0)
        # uncovered pixels take CLIP's mean colour (0 after CLIP's normalisation, as the official code's fill)
        uncovered = (x[0] != 0.2) & (x[0] != 1.0)
        if uncovered.any():
            torch.testing.assert_close(x[:, uncovered].T[0], torch.tensor(open_clip.OPENAI_DATASET_MEAN))
    assert 20 < moved < 40  # flips and moves happen often, but not always
    torch.manual_seed(0)
    again = training.augment(images, masks, colour=False)
    assert torch.equal(again[0], out) and torch.equal(again[1], out_masks)
    torch.manual_seed(1)
    jittered, _ = training.augment(images, masks, colour=True)
    assert (jittered.amax((1, 2, 3)) != 1.0).any()  # colour jitter changes the white pixel in some images


def test_object_predictions_of_plain_clip_are_clips_zero_shot_classifier(tiny):
    model = make_model(tiny)
    images = ImageSet(np.random.default_rng(2).random((7, 3, 32, 32), dtype=np.float32))
    names = ["star", "ring", "moon"]
    plain = scoring.object_predictions(model, images, names, adapt=False, batch_size=3)
    image_emb, _ = clip.encode_images(tiny, images)
    np.testing.assert_array_equal(plain, (image_emb @ clip.class_embeddings(tiny, names).T).argmax(1).numpy())
    adapted = scoring.object_predictions(model, images, names)
    assert adapted.shape == (7,) and set(adapted.tolist()) <= {0, 1, 2}


def test_stage1_with_cached_augmented_views_trains_repeatably(tiny):
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 40, 40), bool)
    masks[3:, 10:20, 10:20] = True
    data = ImageSet(rng.random((6, 3, 40, 40), dtype=np.float32), labels=[0, 0, 0, 1, 1, 1], masks=masks,
                    objects=["star", "ring"] * 3)
    args = dict(epochs=2, lr=1e-3, batch_size=4, cached_views=3, seed=2)
    first = training.train_text_adapters(make_model(tiny), data, **args)
    again = training.train_text_adapters(make_model(tiny), data, **args)
    assert first == again and len(first) == 2 and np.isfinite(first[-1]["loss"])
    model = make_model(tiny)
    state = torch.get_rng_state()
    views = training._frozen_views(model, data, 3, seed=2)
    assert torch.equal(state, torch.get_rng_state())  # drawn aside, the caller's generator untouched
    assert [v.shape[:2] for v in views] == [(3, 6)] * 3 and not torch.equal(views[0][0], views[0][1])
    assert torch.equal(views[2][:, :3], torch.zeros_like(views[2][:, :3]))  # normal images keep empty masks


def test_bad_configuration(tiny):
    with pytest.raises(ValueError, match="levels"):
        adapters.AACLIP(tiny, 1, 1, levels=(4,))
    with pytest.raises(ValueError, match="text_adapt_until"):
        adapters.AACLIP(tiny, 5, 1, levels=(3,))


def test_training_keeps_backbone_frozen(tiny):
    model = make_model(tiny)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    text_before = [p.clone() for p in model.text_parameters()]
    image_before = [p.clone() for p in model.image_parameters()]
    train = toy_batch()
    # stage 1 from 8-bit photos (through CLIP's preprocessing per batch), stage 2 from float images
    raw = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    photos = ImageSet.from_uint8(raw, labels=train.labels, masks=train.masks, objects=train.objects)
    h1 = training.train_text_adapters(model, photos, epochs=1, lr=1e-2, batch_size=4)
    assert len(h1) == 1 and h1[0]["epoch"] == 1 and np.isfinite(h1[0]["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(text_before, model.text_parameters()))
    assert all(torch.equal(a, b) for a, b in zip(image_before, model.image_parameters()))
    text_after = [p.clone() for p in model.text_parameters()]
    h2 = training.train_image_adapters(model, train, epochs=1, lr=1e-2, batch_size=2)
    assert len(h2) == 1 and np.isfinite(h2[0]["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(image_before, model.image_parameters()))
    assert all(torch.equal(a, b) for a, b in zip(text_after, model.text_parameters()))
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in tiny.parameters())


@pytest.mark.parametrize("stage", ["text", "image"])
def test_training_resumes_bit_exactly_from_a_checkpoint(tiny, tmp_path, stage):
    """Three epochs in one go equal two epochs, an interruption (a fresh model and process state), then the third
    from the checkpoint: the same parameters and the same history."""
    train = training.train_text_adapters if stage == "text" else training.train_image_adapters
    params = adapters.AACLIP.text_parameters if stage == "text" else adapters.AACLIP.image_parameters
    data = toy_batch(n=6)
    args = dict(lr=1e-2, batch_size=4, seed=3)
    whole = make_model(tiny)
    h_whole = train(whole, data, epochs=3, **args)
    ckpt = tmp_path / f"{stage}.pt"
    train(make_model(tiny), data, epochs=2, checkpoint=ckpt, **args)
    torch.manual_seed(123)  # the interruption: other global random state, a freshly built model
    resumed = make_model(tiny)
    h_resumed = train(resumed, data, epochs=3, checkpoint=ckpt, **args)
    assert h_resumed == h_whole
    for a, b in zip(params(whole), params(resumed)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="different settings"):  # a stage-1 checkpoint is not a stage-2 one
        other = training.train_image_adapters if stage == "text" else training.train_text_adapters
        other(make_model(tiny), data, epochs=3, checkpoint=ckpt, **args)


def test_stage1_loss_is_the_official_one_unless_the_image_term_is_asked_for(tiny):
    """With a vanishing learning rate the two runs see the same model, so the difference of their losses is the
    image-level cross-entropy, which is positive."""
    data = toy_batch()
    args = dict(epochs=1, lr=1e-12, batch_size=4)
    official = training.train_text_adapters(make_model(tiny), data, **args)[0]["loss"]
    with_ce = training.train_text_adapters(make_model(tiny), data, image_loss=True, **args)
    assert with_ce[0]["loss"] > official > 0


def test_stage1_with_features_computed_once_equals_per_batch(tiny):
    """The frozen image tower gives every image the same features in every batch, so caching them changes nothing."""
    data = toy_batch(n=6)
    args = dict(epochs=2, lr=1e-2, batch_size=4)
    cached, per_batch = make_model(tiny), make_model(tiny)
    h_cached = training.train_text_adapters(cached, data, **args)
    h_batch = training.train_text_adapters(per_batch, data, feature_cache_bytes=0, **args)
    assert [h["loss"] for h in h_cached] == pytest.approx([h["loss"] for h in h_batch], rel=1e-5)
    for a, b in zip(cached.text_parameters(), per_batch.text_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_checks_inputs(tiny):
    data = toy_batch()
    for stage in (training.train_text_adapters, training.train_image_adapters):
        with pytest.raises(TypeError, match="ImageSet"):
            stage(make_model(tiny), data.images, epochs=1)
        for incomplete in (ImageSet(data.images, data.labels, objects=data.objects),  # no masks
                           ImageSet(data.images, None, data.masks, objects=data.objects),  # no labels
                           ImageSet(data.images, data.labels, data.masks)):  # no object names
            with pytest.raises(ValueError, match="needs images, and labels, masks and an object name"):
                stage(make_model(tiny), incomplete, epochs=1)


# --------------------------------------------------------------------------- data, paper model


def test_few_shot_indices():
    labels = np.array([0, 0, 0, 1, 1, 0, 0, 1, 1, 1])
    groups = np.array(["a"] * 5 + ["b"] * 5)
    images = ImageSet(np.zeros((10, 3, 2, 2), np.float32), labels, objects=groups)
    idx = few = training.few_shot_indices(images, 2, seed=0)
    assert len(idx) == 8 and len(set(idx)) == 8
    for g in "ab":
        for label in (0, 1):
            assert np.sum((groups[few] == g) & (labels[few] == label)) == 2
    np.testing.assert_array_equal(idx, training.few_shot_indices(images, 2, seed=0))
    np.testing.assert_array_equal(training.few_shot_indices(images, None), np.arange(10))
    assert len(images[idx]) == 8
    with pytest.raises(ValueError, match="fewer than k=3"):
        training.few_shot_indices(images, 3)
    with pytest.raises(ValueError, match="labelled"):
        training.few_shot_indices(ImageSet(images.images), 1)


def test_anchor_statistics_hand_case():
    # two objects: (normal, anomalous) cosines 0.9 and 0.7; normal-normal cosine 0.2
    sim = np.array([[1.0, 0.9, 0.2, 0.0],
                    [0.9, 1.0, 0.1, 0.3],
                    [0.2, 0.1, 1.0, 0.7],
                    [0.0, 0.3, 0.7, 1.0]])
    np.testing.assert_allclose(scoring.same_object_cosine(sim), [0.9, 0.7])
    assert scoring.anchor_stats(sim) == pytest.approx({"cos(normal, anomalous), same object": 0.8,
                                                       "cos(normal, normal), different objects": 0.2})


def test_resize_input():
    torch.manual_seed(0)
    model = clip.build_tiny_clip(SMALL).eval()
    pos = model.visual.positional_embedding.detach().clone()
    adapters.resize_input(model, 48)
    assert model.visual.positional_embedding.shape == (1 + 36, 32)
    torch.testing.assert_close(model.visual.positional_embedding[0], pos[0])  # class token kept
    assert clip.encode_images(model, torch.rand(1, 3, 48, 48))[1].shape == (1, 36, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        adapters.resize_input(model, 50)


def test_paper_clip_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        adapters.paper_clip()


def test_joint_training_trains_both_sides_on_stage2_loss_plus_disentangle(tiny):
    """One batch, no augmentation: the first step's loss is stage 2's loss against the moving anchors plus 0.1 times
    the disentangle loss, and one step moves the text and the image side while CLIP stays as it was."""
    model, data = make_model(tiny), toy_batch(n=4)
    clip_before = {k: v.clone() for k, v in tiny.state_dict().items()}
    text_before = [p.clone() for p in model.text_parameters()]
    image_before = [p.clone() for p in model.image_parameters()]
    with torch.no_grad():
        anchors = model.anchors("star")[None].expand(4, 2, -1)
        images = clip.to_tensor(data.images, clip.image_size(tiny))
        expected = (training.stage2_loss(model, images, torch.as_tensor(data.masks).float(),
                                         torch.as_tensor(data.labels).long(), anchors)
                    + 0.1 * losses.disentangle_loss(anchors))
    history = training.train_jointly(model, data, epochs=1, lr=1e-2, text_lr=1e-2, batch_size=4, augmentation=False)
    assert history[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(text_before, model.text_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(image_before, model.image_parameters()))
    assert all(torch.equal(v, clip_before[k]) for k, v in tiny.state_dict().items())


def test_official_steps_of_the_recipes():
    from adlib.recipes import aaclip_caption

    # train.py on VisA: 2,162 full-shot images, 5 epochs of 16 and 20 of 2; k-shot: k + k images of 12 categories
    assert aaclip_caption.official_steps("stage 1") == 5 * 136 == 680
    assert aaclip_caption.official_steps("stage 2") == 20 * 1081 == 21_620
    assert aaclip_caption.official_steps("stage 1", shots=2) == 5 * 3
    assert aaclip_caption.official_steps("stage 2", shots=8) == 20 * 96


def test_shipped_adapters_stop_where_their_rule_first_holds_and_load_into_one_model():
    from adlib.methods.cfa import is_flat
    from adlib.recipes import aaclip_caption, checkpoints

    table = checkpoints.registry.shipped_weights()
    names = [n for n in checkpoints.all_recipes() if n.startswith("aaclip-caption-")]
    assert len(names) == 35 and all(n in table for n in names)
    capped = set()
    for name in (n for n in names if not n.endswith(("-x2", "-x4"))):  # doubled runs: no stop (test_checkpoints)
        rec = table[name]["record"]
        per_epoch = rec["steps"] // len(rec["loss"])
        history = [{"loss": v} for v in rec["loss"]]
        flat_at = [n for n in range(5, len(history) + 1) if is_flat(history[:n], per_epoch, rec["official_steps"])]
        most = math.ceil(aaclip_caption.MAX_SHARE * rec["official_steps"] / per_epoch)
        assert (flat_at[0] if flat_at else most) == len(history), name
        capped |= set() if flat_at else {name}
    # the doubling check covers every full-pool joint run that reached the cap unconverged
    assert {n for n in capped if "-joint-" in n} == {aaclip_caption.name_of("joint", s)
                                                     for s in aaclip_caption.DOUBLED["joint"]}
    model, runs = aaclip_caption.trained_aaclip("both", 1)
    assert [r.record.name for r in runs] == ["aaclip-caption-text-s1", "aaclip-caption-image-s1"]
    # a stage's file holds only what that stage trains; the model carries both stages over the shipped CLIP
    assert all(k.startswith("parts.text_") for k in runs[0].model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(runs[0].model.aaclip.text_parameters(), model.text_parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(runs[0].model.aaclip.image_parameters(),
                                                     model.image_parameters()))
    shipped = clip.load_tiny_clip(None).state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in model.clip.state_dict().items())


def test_the_bench_detector_scores_as_chapter_10_with_the_shipped_adapters():
    from adlib.data import captionworld
    from adlib.methods import catalog
    from adlib.recipes import aaclip_caption

    test = captionworld.labelled_set(("pentagon",), 2, 1, seed=1)
    detector = catalog.make_detector("aaclip", object_name="pentagon", sigma=0.0)
    scores = detector.fit(test[test.labels == 0]).predict(test)  # zero-shot: fit learns nothing
    model, _ = aaclip_caption.trained_aaclip("both", 0)
    image_scores, maps = scoring.fused_scorer(model, 2, aaclip_caption.training_set())(test, "pentagon")
    np.testing.assert_allclose(scores.image, image_scores)
    np.testing.assert_allclose(scores.maps, maps, rtol=1e-6, atol=1e-9)
