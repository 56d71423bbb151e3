"""CFA: losses against a hand computation, the memory bank, scores against brute-force loops, the ablation without
the descriptor."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adlib.data.imageset import ImageSet
from adlib.methods import base, catalog, cfa


def test_loss_matches_a_hand_computation():
    # One patch, a bank of 5 features, k = 2 attracted, j = 2 repelled (rank 3 and 4; rank 5 unused).
    sq = torch.tensor([[[0.9, 0.01, 0.5, 0.05, 2.0]]])
    r, alpha, nu = 0.5, 0.1, 0.01
    # sorted: 0.01, 0.05 | 0.5, 0.9 | 2.0; r^2 = 0.25
    att = (max(0, 0.01 - 0.25) + max(0, 0.05 - 0.25)) / 2  # both inside: 0
    rep = (max(0, 0.25 - 0.5 - 0.1) + max(0, 0.25 - 0.9 - 0.1)) / 2  # both outside the margin: 0
    out = cfa.cfa_loss(sq, r, k=2, j=2, alpha=alpha, nu=nu)
    assert out["att"].item() == pytest.approx(att) and out["rep"].item() == pytest.approx(rep)

    r = 0.8  # r^2 = 0.64: the third is now a hard negative inside the margin, the first two far inside
    out = cfa.cfa_loss(sq, r, k=2, j=2, alpha=alpha, nu=nu)
    rep = (max(0, 0.64 - 0.5 - 0.1) + max(0, 0.64 - 0.9 - 0.1)) / 2  # (0.04 + 0) / 2
    assert out["att"].item() == pytest.approx(0.0)
    assert out["rep"].item() == pytest.approx(rep, rel=1e-5) and rep == pytest.approx(0.02)
    assert out["loss"].item() == pytest.approx(rep / nu, rel=1e-5)

    r = 0.1  # r^2 = 0.01: the second nearest is outside its sphere
    out = cfa.cfa_loss(sq, r, k=2, j=2, alpha=alpha, nu=nu)
    assert out["att"].item() == pytest.approx((0.0 + 0.04) / 2, rel=1e-5)


def test_loss_matches_loops_on_random_distances():
    g = torch.Generator().manual_seed(0)
    sq = torch.rand(2, 7, 10, generator=g)
    r, k, j, alpha, nu = 0.6, 3, 3, 0.1, 1e-3
    att, rep = [], []
    for b in range(2):
        for p in range(7):
            d = sorted(sq[b, p].tolist())
            att += [max(0.0, x - r * r) for x in d[:k]]
            rep += [max(0.0, r * r - x - alpha) for x in d[k:k + j]]
    out = cfa.cfa_loss(sq, torch.tensor([r]), k=k, j=j, alpha=alpha, nu=nu)
    assert out["att"].item() == pytest.approx(np.mean(att), rel=1e-5)
    assert out["rep"].item() == pytest.approx(np.mean(rep), rel=1e-5)
    assert out["loss"].item() == pytest.approx((np.mean(att) + np.mean(rep)) / nu, rel=1e-5)


def test_repulsion_is_inactive_at_the_paper_radius():
    sq = torch.rand(1, 4, 8)
    assert cfa.cfa_loss(sq, 1e-5)["rep"].item() == 0.0  # r^2 - D - alpha < 0 whenever r^2 < alpha


def test_loss_needs_k_plus_j_memory_features():
    with pytest.raises(ValueError, match="k \\+ j"):
        cfa.cfa_loss(torch.rand(1, 2, 5), 0.1, k=3, j=3)


def test_squared_distances_match_cdist():
    g = torch.Generator().manual_seed(1)
    desc, bank = torch.randn(2, 6, 3, 4, generator=g), torch.randn(9, 6, generator=g)
    rows = desc.permute(0, 2, 3, 1).reshape(2, 12, 6)
    expected = torch.cdist(rows.double(), bank.double()) ** 2
    torch.testing.assert_close(cfa.squared_distances(desc, bank).double(), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="channels"):
        cfa.squared_distances(desc, torch.randn(9, 5))


def test_softmin_score_by_hand():
    d = [1.0, 2.0, 3.0]  # Euclidean distances to the 3 nearest; a farther one must be ignored
    sq = torch.tensor([[[x * x for x in d] + [100.0]]])
    w = math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3))
    assert cfa.softmin_scores(sq, k=3).item() == pytest.approx(w * 1.0, rel=1e-6)


def test_add_coords_and_descriptor_shapes():
    x = torch.zeros(2, 5, 3, 4)
    c = cfa.add_coords(x)
    assert c.shape == (2, 7, 3, 4)
    np.testing.assert_allclose(c[0, 5, :, 0].numpy(), [-1, 0, 1])  # row coordinate
    np.testing.assert_allclose(c[0, 6, 0].numpy(), np.linspace(-1, 1, 4), atol=1e-6)  # column coordinate
    assert cfa.PatchDescriptor(8, gamma_d=2)(torch.randn(1, 8, 3, 3)).shape == (1, 4, 3, 3)
    with pytest.raises(ValueError, match="gamma_d"):
        cfa.PatchDescriptor(4, gamma_d=8)


def test_memory_bank_ema_matches_a_loop():
    g = torch.Generator().manual_seed(2)
    desc = torch.randn(3, 4, 2, 3, generator=g)  # 3 images of 6 patches
    rows = desc.permute(0, 2, 3, 1).reshape(3, 6, 4).numpy().astype(np.float64)
    for beta in (None, 0.3):
        bank = rows[0].copy()  # gamma_c = 1: the first image's patches
        for i in (1, 2):
            b = 1 / (i + 1) if beta is None else beta
            for m in range(6):
                nearest = rows[i][np.argmin(((rows[i] - bank[m]) ** 2).sum(1))]
                bank[m] = (1 - b) * bank[m] + b * nearest
        np.testing.assert_allclose(cfa.memory_bank(desc, beta=beta).numpy(), bank, atol=1e-5)


def test_memory_bank_kmeans_compression():
    # Two tight clusters in the first image; gamma_c = 4 keeps 8 // 4 = 2 centres, the cluster means.
    first = torch.cat([torch.full((4, 2), 0.0), torch.full((4, 2), 10.0)]) + 0.01 * torch.arange(8.0)[:, None]
    desc = first.T.reshape(1, 2, 2, 4)
    bank = cfa.memory_bank(desc, gamma_c=4)
    assert bank.shape == (2, 2)
    expected = np.array([first[:4].mean(0).numpy(), first[4:].mean(0).numpy()])
    got = bank.numpy()[np.argsort(bank[:, 0].numpy())]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="gamma_c"):
        cfa.memory_bank(desc, gamma_c=9)
    with pytest.raises(ValueError, match="beta"):
        cfa.memory_bank(desc, beta=0.0)


def test_model_score_maps_shape_range_and_zero_on_the_bank():
    torch.manual_seed(0)
    feats = torch.randn(3, 8, 4, 4)
    model = cfa.CFA(8, k=2, j=2)
    with pytest.raises(RuntimeError, match="init_bank"):
        model.score_maps(feats)
    model.init_bank(feats[:1])  # bank = the first image's 16 descriptors
    maps = model.score_maps(feats)
    assert maps.shape == (3, 4, 4) and maps.dtype == np.float64
    assert np.isfinite(maps).all() and (maps >= 0).all()
    np.testing.assert_allclose(maps[0], 0.0, atol=1e-3)  # a patch that is in the bank scores 0
    sq = torch.cdist(model.descriptor(feats[1:2]).flatten(2).transpose(1, 2), model.bank) ** 2
    expected = cfa.softmin_scores(sq, k=2).reshape(4, 4).detach().numpy()
    np.testing.assert_allclose(maps[1], expected, rtol=1e-4, atol=1e-4)


def test_training_reduces_the_loss_and_grows_the_radius():
    torch.manual_seed(0)
    feats = torch.randn(8, 6, 4, 4)
    model = cfa.CFA(6).init_bank(feats)
    before = model.loss(feats)["loss"].item()
    history = cfa.train_cfa(model, feats, epochs=3, batch_size=4, progress=False)
    assert len(history) == 3 and not model.training
    assert model.loss(feats)["loss"].item() < before
    assert history[-1]["radius"] > 1e-5
    with pytest.raises(ValueError, match="batch_size"):
        cfa.train_cfa(model, feats[:2], epochs=1, batch_size=4, progress=False)


def test_training_is_deterministic():
    def run() -> np.ndarray:
        torch.manual_seed(0)
        feats = torch.randn(8, 6, 4, 4)
        model = cfa.CFA(6).init_bank(feats)
        cfa.train_cfa(model, feats, epochs=2, batch_size=4, seed=1, progress=False)
        return model.score_maps(feats)

    np.testing.assert_array_equal(run(), run())



# ----------------------------------------------------------------------------- the ablation without the descriptor
SMALL = {"backbone": "random-resnet18", "epochs": 2, "train_batch_size": 2}


def _sets() -> tuple[ImageSet, ImageSet]:
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.rand(4, 3, 32, 32, generator=g)), ImageSet(torch.rand(3, 3, 32, 32, generator=g))


def test_without_descriptor_is_a_new_detector_and_leaves_the_fitted_one_as_it_was():
    train, test = _sets()
    det = cfa.CFADetector(**SMALL).fit(train)
    before, model = det.predict(test), det.model
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    raw = det.without_descriptor()
    assert raw is not det and raw.model is None and raw.image_shape is None  # new and unfitted
    assert raw.hparams() == det.hparams() | {"adapt": False} and det.adapt and not raw.adapt
    raw.fit(train)
    assert isinstance(raw.model.descriptor, torch.nn.Identity) and raw.history == []  # nothing trained
    assert det.model is model and isinstance(model.descriptor, cfa.PatchDescriptor)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    np.testing.assert_array_equal(det.predict(test).maps, before.maps)


def test_without_descriptor_scores_the_frozen_features_with_the_compact_bank():
    train, test = _sets()
    raw = cfa.CFADetector(**SMALL).without_descriptor().fit(train)
    f_train, f_test = raw.inputs(train.tensor()), raw.inputs(test.tensor())
    torch.testing.assert_close(raw.model.bank, cfa.memory_bank(f_train))  # the bank of the raw features
    by_hand = cfa.softmin_scores(cfa.squared_distances(f_test, cfa.memory_bank(f_train)), k=3)
    patch_maps = by_hand.reshape(len(test), *f_test.shape[-2:]).double().numpy()
    expected = base.postprocess(base.PatchScores(patch_maps), test.size, raw.sigma)
    scores = raw.predict(test)
    np.testing.assert_allclose(scores.maps, expected.maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.image, expected.image, rtol=1e-5, atol=1e-6)


def test_a_detector_without_descriptor_saves_and_loads(tmp_path):
    train, test = _sets()
    raw = cfa.CFADetector(**SMALL).without_descriptor().fit(train)
    loaded, _ = catalog.load_detector(raw.save(tmp_path / "raw.pt"))
    assert not loaded.adapt and isinstance(loaded.model.descriptor, torch.nn.Identity)
    np.testing.assert_allclose(loaded.predict(test).maps, raw.predict(test).maps)


# ----------------------------------------------------------------------------- the schedule: until held-out is flat
def test_held_out_split_holds_out_the_same_tenth_whatever_the_seed():
    fit_part, held = cfa.held_out_split(60)
    assert len(held) == 6 and len(fit_part) == 54
    assert sorted(np.concatenate([fit_part, held]).tolist()) == list(range(60))
    np.testing.assert_array_equal(cfa.held_out_split(60)[1], held)
    assert len(cfa.held_out_split(9)[1]) == 0  # too few images to hold any out


def test_is_flat_needs_the_official_steps_and_a_flat_held_out_loss():
    flat = [{"loss": 100.0 - i, "held_out": 5.0} for i in range(50)]
    falling = [{"loss": 5.0, "held_out": 100.0 - i} for i in range(50)]
    assert cfa.is_flat(flat, steps_per_epoch=100, min_steps=1800)
    assert not cfa.is_flat(flat, steps_per_epoch=10, min_steps=1800)  # 500 steps: too few
    assert not cfa.is_flat(falling, steps_per_epoch=100)  # the held-out loss, not the training loss, decides
    assert cfa.is_flat([{"loss": 5.0}] * 50, steps_per_epoch=100)  # nothing held out: the training loss


def test_passes_shuffle_each_pass_and_drop_its_last_incomplete_batch():
    batches = list(cfa.Passes(10, 4, 3, torch.Generator().manual_seed(0)))
    assert len(batches) == len(cfa.Passes(10, 4, 3, torch.Generator())) == 6
    for p in range(3):
        seen = batches[2 * p] + batches[2 * p + 1]
        assert len(set(seen)) == 8 and set(seen) <= set(range(10))  # no repeat within a pass
    assert batches[:2] != batches[2:4]  # a new order each pass


def test_training_until_flat_stops_at_the_rule_and_keeps_the_held_out_loss():
    torch.manual_seed(0)
    feats = torch.randn(12, 6, 4, 4)
    model = cfa.CFA(6).init_bank(feats[:10])
    history = cfa.train_cfa(model, feats[:10], feats[10:], min_steps=20, max_epochs=200, passes=1, batch_size=2,
                            lr=0.01, progress=False)
    assert all("held_out" in row for row in history)
    assert cfa.is_flat(history, 5, 20) and len(history) < 200
    assert not any(cfa.is_flat(history[:n], 5, 20) for n in range(1, len(history)))  # the first epoch it holds


def test_the_detector_builds_its_bank_from_the_images_it_does_not_hold_out():
    g = torch.Generator().manual_seed(0)
    train = ImageSet(torch.rand(10, 3, 32, 32, generator=g))
    raw = cfa.CFADetector(**SMALL).without_descriptor().fit(train)
    features = raw.inputs(train.tensor())
    fit_part, _ = cfa.held_out_split(10)
    torch.testing.assert_close(raw.model.bank, cfa.memory_bank(features[fit_part]))


def test_shipped_descriptors_stop_where_their_rule_first_holds():
    from adlib.recipes import cfa_synthtex
    from adlib.weights import registry

    table = registry.shipped_weights()
    names = {cfa_synthtex.name_of(c, s): 1 for c in cfa_synthtex.synthtex.CATEGORIES for s in cfa_synthtex.SEEDS}
    capped = set()
    doubled = {cfa_synthtex.name_of(c, s, 2): 2 for c, seeds in cfa_synthtex.DOUBLED.items() for s in seeds}
    assert all(name in table for name in names | doubled)
    for name, factor in (names | doubled).items():
        rec = table[name]["record"]
        history = [{"loss": loss, "held_out": held} for loss, held in zip(rec["loss"], rec["held_out"])]
        per_epoch = rec["steps"] // len(history)
        assert rec["steps"] >= cfa.OFFICIAL_STEPS and rec["official_steps"] == cfa.OFFICIAL_STEPS
        flat_at = [n for n in range(1, len(history) + 1) if cfa.is_flat(history[:n], per_epoch)]
        assert (flat_at[0] if flat_at else factor * cfa.MAX_EPOCHS) == len(history), name
        capped |= set() if flat_at or factor > 1 else {name}
    # the doubling check covers every run that reached the cap; it repeats the recipe (its first epoch, within the
    # float differences of another CPU model: the shipped runs predate the recording of the CPU)
    assert {name.removesuffix("-x2") for name in doubled} == capped
    for name in doubled:
        once, twice = table[name.removesuffix("-x2")]["record"], table[name]["record"]
        assert abs(twice["held_out"][0] - once["held_out"][0]) < 0.05 * once["held_out"][0], name


def test_the_cfa_method_loads_chapter_7s_descriptor_only_for_its_own_features_and_settings():
    from adlib.bench import runs
    from adlib.data import mvtec
    from adlib.methods import catalog
    from adlib.recipes import cfa_synthtex

    root = mvtec.benchmark_root("book")
    run = runs.run_category("cfa", root, "brick", image_size=cfa_synthtex.IMAGE_SIZE, seed=1)  # as the bench does
    det = run.detector
    assert det.shipped.record.name == "cfa-synthtex-brick-s1" and det.history == det.shipped.history
    assert run.row["fit_s"] == det.shipped.seconds  # the fit's cost is the recorded training's
    shipped, _ = cfa_synthtex.fitted_detector("brick", 1)
    for (name, a), b in zip(det.model.state_dict().items(), shipped.model.state_dict().values()):
        assert torch.equal(a, b), name
    features = det.inputs(mvtec.load_split(root, "brick", "train", cfa_synthtex.IMAGE_SIZE).tensor())
    assert det.shipped_name(features) == "cfa-synthtex-brick-s1"
    assert det.shipped_name(features.flip(-1)) is None  # other features
    assert det.shipped_name(features[1:]) is None
    for other in ({"seed": 3}, {"epochs": 3}, {"k": 2}, {"layers": (1, 2, 3)}):  # other settings
        assert catalog.make_detector("cfa", **({"seed": 1} | other)).shipped_name(features) is None, other
    assert catalog.make_detector("cfa", seed=1, sigma=2.0).shipped_name(features) == "cfa-synthtex-brick-s1"
