"""The command line under real use: checks before the first fit, nothing finished lost, guards, clear messages."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adlib import cli
from adlib.bench import deploy, folders, runs
from adlib.core import runtime

SMALL = ["--backbone", "random-resnet18", "--image-size", "32", "--device", "cpu"]


def _in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each category here instead of in a new process, so that a patched ``runs.run_category`` applies."""
    monkeypatch.setattr(runtime, "in_fresh_processes", lambda fn, calls, **kw: (fn(**call) for call in calls))


def _category(root: Path, name: str) -> None:
    for split, n, dent in (("train/good", 3, False), ("test/good", 2, False), ("test/dent", 2, True)):
        for i in range(n):
            arr = (np.random.default_rng(i + 10 * dent).uniform(0.4, 0.6, (40, 40, 3)) * 255).astype(np.uint8)
            if dent:
                arr[10:20, 10:20] = 255
            (root / name / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / name / split / f"{i}.png")
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:20] = 255
    (root / name / "ground_truth/dent").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray(mask).save(root / name / f"ground_truth/dent/{i}_mask.png")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    for name in ("alpha", "beta"):
        _category(tmp_path / "data", name)
    return tmp_path / "data"


def _run(data: Path, *extra: str) -> list[str]:
    return ["run", "patchknn", "--data", str(data), *SMALL, *extra]


def _refused_before_any_fit(capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "done:" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_bad_outputs_and_inputs_are_refused_before_the_first_fit(data: Path, tmp_path: Path, capsys) -> None:
    _refused_before_any_fit(capsys, _run(data, "--save-model", str(tmp_path / "no/such/m.pt")), "does not exist")
    _refused_before_any_fit(capsys, _run(data, "--out", str(tmp_path / "missing/r.json")), "does not exist")
    (data / "beta/test/dent/1.png").write_bytes(b"not a png")  # a broken file in the LAST category
    _refused_before_any_fit(capsys, _run(data), "Cannot read image")


def test_each_category_is_saved_when_done_and_ctrl_c_keeps_it(data: Path, tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    real = runs.run_category

    def interrupted_on_beta(method, root, category, **kw):
        if category == "beta":
            raise KeyboardInterrupt
        return real(method, root, category, **kw)

    _in_this_process(monkeypatch)
    monkeypatch.setattr(runs, "run_category", interrupted_on_beta)
    out = tmp_path / "r.json"
    assert cli.main(_run(data, "--out", str(out))) == 130
    assert "interrupted" in capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert list(saved["categories"]) == ["alpha"] and saved["complete"] is False and saved["mean"] is None
    monkeypatch.setattr(runs, "run_category", real)
    _refused_before_any_fit(capsys, _run(data, "--out", str(out)), "--overwrite")
    assert cli.main(_run(data, "--out", str(out), "--overwrite")) == 0
    saved = json.loads(out.read_text())
    assert sorted(saved["categories"]) == ["alpha", "beta"] and saved["complete"] is True and saved["mean"]


def test_a_real_ctrl_c_stops_the_category_process_and_keeps_the_finished_ones(data: Path, tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal sends it: the category's own process stops too, no traceback,
    exit 130, the finished categories stay in --out and no process is left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    for i in range(40):  # gamma: enough images that its fit is still running when the signal comes
        arr = (np.random.default_rng(100 + i).uniform(0.4, 0.6, (40, 40, 3)) * 255).astype(np.uint8)
        (data / "gamma/train/good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(data / "gamma/train/good" / f"{i}.png")
    for split in ("test/good", "test/dent", "ground_truth/dent"):
        for f in (data / "alpha" / split).iterdir():
            (data / "gamma" / split).mkdir(parents=True, exist_ok=True)
            (data / "gamma" / split / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "r.json"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "adlib", "run", "patchcore", "--data", str(data), "--backbone",
                             "random-resnet18", "--image-size", "128", "--allow-large", "--device", "cpu", "--out",
                             str(out)], stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            # as a shell starts it: an ignored SIGINT (an earlier test's) would be inherited
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:
        if line.startswith("[gamma] fitting"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert "interrupted" in err and "Traceback" not in err
    assert list(json.loads(out.read_text())["categories"]) == ["alpha", "beta"]
    for _ in range(100):  # the group empties: no category process (or fork server) is left running
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("processes of the interrupted run are still running 10 s after it exited")


def test_leftover_overlays_and_links_are_refused_before_fitting(data: Path, tmp_path: Path, capsys) -> None:
    maps = tmp_path / "maps"
    (maps / "alpha").mkdir(parents=True)
    (maps / "alpha/dent_0.png").write_bytes(b"from an interrupted run")
    _refused_before_any_fit(capsys, _run(data, "--category", "alpha", "--save-maps", str(maps)), "not empty")
    (maps / "alpha/dent_0.png").unlink()
    (maps / "alpha/good_0.png").symlink_to(tmp_path / "nowhere.png")  # dangling
    _refused_before_any_fit(capsys, _run(data, "--category", "alpha", "--save-maps", str(maps), "--overwrite"),
                            "symbolic link")
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    _refused_before_any_fit(capsys, _run(data, "--out", str(tmp_path / "link.json"), "--overwrite"), "symbolic link")
    assert (tmp_path / "real.json").read_text() == "{}"


def test_guards_image_size_memory_duplicates_and_options(data: Path, capsys, monkeypatch) -> None:
    _refused_before_any_fit(capsys, ["run", "patchknn", "--data", str(data), "--image-size", "1024"],
                            "more than twice the largest input image (40 px)")
    monkeypatch.setattr(folders, "_free_memory", lambda: 100_000)
    _refused_before_any_fit(capsys, ["run", "patchknn", "--data", str(data), "--image-size", "64"], "GiB are free")
    monkeypatch.undo()
    _refused_before_any_fit(capsys, _run(data, "--category", "alpha", "alpha"), "listed twice")
    _refused_before_any_fit(capsys, ["run", "patchknn", "--data", str(data / "alpha"), *SMALL],
                            f"pass its parent, {data}, with --category alpha")
    _refused_before_any_fit(capsys, ["run", "patchcore", "--data", str(data), *SMALL, "--set", "coreset_ratio=abc"],
                            "expects a float for coreset_ratio")
    _refused_before_any_fit(capsys, ["run", "patchcore", "--data", str(data), *SMALL, "--set", "coreset_ration=0.5"],
                            "no option 'coreset_ration'")
    _refused_before_any_fit(capsys, _run(data, "--calibrate"), "needs 19 calibration images")  # 3 train images


def test_predict_keeps_every_overlay_and_refuses_a_non_model_file(data: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "m.pt"
    assert cli.main(_run(data, "--category", "alpha", "--save-model", str(model))) == 0
    assert cli.main(_run(data, "--category", "alpha", "--save-model", str(model))) == 2  # exists: refused
    assert cli.main(_run(data, "--category", "alpha", "--save-model", str(model), "--overwrite")) == 0  # replaced
    maps = tmp_path / "pmaps"
    rows = deploy.predict(model, [data / "alpha/test/good", data / "alpha/test/dent"], save_maps=maps)
    assert len(rows) == 4 and len(list(maps.glob("*.png"))) == 4  # 0.png and 1.png in both folders
    assert folders.unique_names([Path("a/x.png"), Path("a/x.jpg"), Path("b/x.png")]) == ["a_x", "a_x_2", "b_x"]
    junk = tmp_path / "notes.pt"
    junk.write_text("a text file")
    assert cli.main(["predict", "--model", str(junk), str(data / "alpha/test/good")]) == 2
    err = capsys.readouterr().err
    assert "is not a detector saved by adlib" in err and "weights_only" not in err


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(data: Path, capsys, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    _in_this_process(monkeypatch)
    monkeypatch.setattr(runs, "run_category", broken)
    assert cli.main(_run(data)) == 2
    assert capsys.readouterr().err.strip().endswith("error: a bug (ZeroDivisionError; --debug shows the traceback)")
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", *_run(data)])
