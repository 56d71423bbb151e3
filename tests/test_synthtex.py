"""SynthTex: layout, determinism, reuse and refusal on disk, exact masks, and that it is not trivial."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from adlib.data import synthtex
from adlib.data.defects import AREA_RANGE, add_defect
from adlib.data.synthtex import CATEGORIES, DEFECTS, SIZES, generate, texture

TINY = dict(n_train=3, n_test_good=2, n_test_per_defect=1, image_size=48)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (synthtex.MANIFEST, synthtex.LOCK)
    }


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("smoke"), **SIZES["smoke"])


def test_categories_and_defects():
    assert len(CATEGORIES) >= 5 and len(set(CATEGORIES)) == len(CATEGORIES)
    assert len(DEFECTS) >= 4 and "good" not in DEFECTS


def test_layout_is_mvtec(smoke_root):
    p = SIZES["smoke"]
    size = (p["image_size"], p["image_size"])
    for category in CATEGORIES:
        folder = smoke_root / category
        assert sorted(d.name for d in folder.iterdir()) == ["ground_truth", "test", "train"]
        assert sorted(d.name for d in (folder / "test").iterdir()) == sorted(("good",) + DEFECTS)
        assert sorted(d.name for d in (folder / "ground_truth").iterdir()) == sorted(DEFECTS)  # no good masks
        train = sorted((folder / "train" / "good").iterdir())
        assert [f.name for f in train] == [f"{i:03d}.png" for i in range(p["n_train"])]
        assert len(list((folder / "test" / "good").iterdir())) == p["n_test_good"]
        for f in train:
            with Image.open(f) as im:
                assert (im.mode, im.size) == ("RGB", size)
        for defect in DEFECTS:
            images = sorted((folder / "test" / defect).iterdir())
            masks = sorted((folder / "ground_truth" / defect).iterdir())
            assert len(images) == p["n_test_per_defect"]
            assert [m.name for m in masks] == [f.stem + "_mask.png" for f in images]
            for f, m in zip(images, masks):
                with Image.open(f) as im, Image.open(m) as mk:
                    assert (im.mode, im.size) == ("RGB", size)
                    assert (mk.mode, mk.size) == ("L", size)
                    values = np.asarray(mk)
                assert set(np.unique(values)) == {0, 255}  # binary and non-empty
                assert AREA_RANGE[0] <= (values > 0).mean() <= AREA_RANGE[1]


def test_manifest_records_parameters(smoke_root):
    manifest = json.loads((smoke_root / synthtex.MANIFEST).read_text())
    for category in CATEGORIES:
        entry = manifest["categories"][category]
        assert entry["complete"] is True
        assert entry["params"] == SIZES["smoke"] | {"seed": 0, "version": synthtex.VERSION}


def test_same_seed_same_bytes_and_categories_independent(tmp_path):
    a = _hashes(generate(tmp_path / "a", categories=["brick", "wood"], **TINY))
    b = _hashes(generate(tmp_path / "b", categories=["brick", "wood"], **TINY))
    alone = _hashes(generate(tmp_path / "c", categories=["wood"], **TINY))
    other_seed = _hashes(generate(tmp_path / "d", categories=["wood"], **TINY | {"seed": 1}))
    assert len(a) == 2 * (3 + 2 + 2 * len(DEFECTS)) and a == b
    assert alone == {k: v for k, v in a.items() if k.startswith("wood")}
    assert set(other_seed) == set(alone) and all(other_seed[k] != alone[k] for k in alone)


def test_reuse_does_not_rewrite(tmp_path):
    root = generate(tmp_path, categories=["tile"], **TINY)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    assert generate(tmp_path, categories=["tile"], **TINY) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == stamps


def test_incomplete_generation_is_redone(tmp_path):
    root = generate(tmp_path, categories=["tile"], **TINY)
    before = _hashes(root)
    (root / "tile" / "test" / "hole" / "000.png").unlink()
    generate(root, categories=["tile"], **TINY)
    assert _hashes(root) == before


def test_refuses_foreign_folder_even_with_overwrite(tmp_path):
    mine = tmp_path / "brick" / "my_photo.txt"
    mine.parent.mkdir()
    mine.write_text("user data")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not written by SynthTex"):
            generate(tmp_path, categories=["brick"], overwrite=overwrite, **TINY)
    assert mine.read_text() == "user data"


def test_other_parameters_need_overwrite_which_deletes_only_synthtex_folders(tmp_path):
    generate(tmp_path, categories=["grass", "gravel"], **TINY)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    gravel = _hashes(tmp_path / "gravel")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate(tmp_path, categories=["grass"], **TINY | {"seed": 5})
    generate(tmp_path, categories=["grass"], overwrite=True, **TINY | {"seed": 5})
    fresh = _hashes(generate(tmp_path / "fresh", categories=["grass"], **TINY | {"seed": 5}))
    assert {k: v for k, v in _hashes(tmp_path).items() if k.startswith("grass")} == fresh
    assert _hashes(tmp_path / "gravel") == gravel and notes.read_text() == "keep me"
    manifest = json.loads((tmp_path / synthtex.MANIFEST).read_text())
    assert manifest["categories"]["grass"]["params"]["seed"] == 5
    assert manifest["categories"]["gravel"]["params"]["seed"] == 0


def test_foreign_manifest_is_refused(tmp_path):
    (tmp_path / synthtex.MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="not a SynthTex manifest"):
        generate(tmp_path, categories=["brick"], **TINY)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(categories=["marble"]), "choose from"),
        (dict(image_size=16), "image_size"),
        (dict(n_train=0), "n_train"),
        (dict(seed=-1), "seed"),
    ],
)
def test_generate_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tmp_path, **TINY | kwargs)


@pytest.mark.parametrize("category", CATEGORIES)
def test_texture_shape_range_and_variation(category):
    a = texture(category, 64, np.random.default_rng(0))
    b = texture(category, 64, np.random.default_rng(1))
    assert a.shape == (64, 64, 3) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0.02
    assert np.abs(a - b).mean() > 0.02  # normal images differ from each other
    assert np.array_equal(a, texture(category, 64, np.random.default_rng(0)))


@pytest.mark.parametrize("defect", DEFECTS)
def test_defect_mask_is_exact_and_sized(defect):
    rng = np.random.default_rng(0)
    fractions = []
    for k in range(24):
        category, size = CATEGORIES[k % len(CATEGORIES)], (64, 128)[k % 2]
        image = texture(category, size, rng)
        donor = texture(CATEGORIES[(k + 1) % len(CATEGORIES)], size, rng)
        kept = image.copy()
        out, mask = add_defect(image, defect, rng, donor=donor)
        assert np.array_equal(image, kept)  # the input is not modified
        assert out.shape == image.shape and out.dtype == np.float32 and mask.shape == (size, size)
        assert mask.dtype == bool and 0 <= out.min() and out.max() <= 1
        assert np.array_equal(out[~mask], image[~mask])  # nothing changes outside the mask
        assert np.abs(out - image).max(axis=2)[mask].mean() > 0.01  # and the inside does change
        fractions.append(mask.mean())
    assert AREA_RANGE[0] <= min(fractions) and max(fractions) <= AREA_RANGE[1]
    assert max(fractions) > 3 * min(fractions)  # small and medium defects both occur


def test_add_defect_errors():
    rng = np.random.default_rng(0)
    image = texture("wood", 64, rng)
    with pytest.raises(ValueError, match="choose from"):
        add_defect(image, "dent", rng)
    with pytest.raises(ValueError, match="donor"):
        add_defect(image, "cut_paste", rng)
    with pytest.raises(ValueError, match="donor"):
        add_defect(image, "cut_paste", rng, donor=image[:32])
    with pytest.raises(ValueError, match="H, W, 3"):
        add_defect(image[..., 0], "hole", rng)
    with pytest.raises(ValueError, match="choose from"):
        texture("marble", 64, rng)


def test_generate_for_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("ADLIB_DATA", str(tmp_path))
    root = synthtex.generate_for_profile("smoke")
    assert root == tmp_path / "synthtex-smoke"
    manifest = json.loads((root / synthtex.MANIFEST).read_text())
    assert set(manifest["categories"]) == set(CATEGORIES)
    with pytest.raises(ValueError, match="MVTec AD"):
        synthtex.generate_for_profile("paper")
    with pytest.raises(ValueError, match="'smoke'.*'book'.*'paper'"):
        synthtex.generate_for_profile("huge")


def test_sizes_of_profiles():
    smoke, book = SIZES["smoke"], SIZES["book"]
    assert smoke["image_size"] <= 64 and smoke["n_train"] <= 10
    assert book["image_size"] == 128 and book["n_train"] >= 60
    assert book["n_test_good"] + book["n_test_per_defect"] * len(DEFECTS) >= 40
    assert "paper" not in SIZES


# ----------------------------------------------------------------- SynthTex is not trivial


def _load(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(f), np.float32) / 255 for f in sorted(folder.glob("*.png"))])


def _global_features(x: np.ndarray) -> np.ndarray:
    """Per channel: mean, std and a 32-bin histogram: (n, H, W, 3) -> (n, 102)."""
    hist = [np.stack([np.histogram(im[..., c], 32, (0, 1))[0] / im[..., c].size for im in x]) for c in range(3)]
    return np.concatenate([x.mean((1, 2)), x.std((1, 2)), *hist], 1)


def _patches(x: np.ndarray, stride: int) -> np.ndarray:
    """Raw 8x8 RGB patches: (n, H, W, 3) -> (n, n_patches, 192)."""
    p = np.lib.stride_tricks.sliding_window_view(x, (8, 8), axis=(1, 2))[:, ::stride, ::stride]
    return p.reshape(len(x), -1, 8 * 8 * 3)


def test_local_detector_beats_global_statistics(tmp_path):
    root = generate(tmp_path, n_train=10, n_test_good=8, n_test_per_defect=2, image_size=64, seed=3)
    auroc = {"knn": [], "gauss": [], "local": []}
    for category in CATEGORIES:
        train = _load(root / category / "train" / "good")
        test = [_load(root / category / "test" / d) for d in ("good",) + DEFECTS]
        y = np.repeat([0] + [1] * len(DEFECTS), [len(t) for t in test])
        test = np.concatenate(test)
        f_train, f_test = _global_features(train), _global_features(test)
        mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
        knn = NearestNeighbors(n_neighbors=1).fit((f_train - mu) / sd)
        auroc["knn"].append(roc_auc_score(y, knn.kneighbors((f_test - mu) / sd)[0][:, 0]))
        auroc["gauss"].append(roc_auc_score(y, LedoitWolf().fit(f_train).mahalanobis(f_test)))
        bank = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(_patches(train, 2).reshape(-1, 192))
        queries = _patches(test, 4)
        dist = bank.kneighbors(queries.reshape(-1, 192))[0][:, 0].reshape(len(test), -1)
        auroc["local"].append(roc_auc_score(y, dist.max(1)))
    mean = {k: float(np.mean(v)) for k, v in auroc.items()}
    assert mean["local"] >= max(mean["knn"], mean["gauss"]) + 0.1, auroc
