"""Converged chapter models: a tiny recipe trained in chunks, shipped with its record, loaded back by the chapter
helper with RETRAIN off and on; the registry's own files and records."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adlib import cli
from adlib.eval.claims import TrainingRecord
from adlib.recipes import checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny(seed: int) -> checkpoints.Training:
    """An autoencoder of 16-dimensional points: 4 epochs of 5 steps, a held-out loss and the learning rate."""
    data = torch.randn(60, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(TensorDataset(data[:50]), batch_size=10, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    done = {"steps": 0}

    def step(batch):
        (x,) = batch
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        done["steps"] += 1
        out = {"loss": loss.item()}
        if done["steps"] % len(loader) == 0:
            with torch.no_grad():
                out |= {"held_out": (model(data[50:]) - data[50:]).pow(2).mean().item(), "lr": 1e-2}
        return out

    return checkpoints.Training(model, step, loader, {"model": model, "opt": opt}, epochs=4, official_steps=20)


TINY = checkpoints.CheckpointRecipe("tiny-ae", "a tiny autoencoder (tests)", "TINY.md", _tiny)


@pytest.fixture
def weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setitem(checkpoints.CHECKPOINT_RECIPES, "tiny-ae", TINY)
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "TINY.md").write_text("# tiny-ae\n")
    return folder


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_recipe_in_chunks_ships_and_loads_back_the_same_tensors_with_retrain_off_and_on(weights_dir, tmp_path):
    state = tmp_path / "tiny.training.pt"
    # A budget of 0 s: one epoch per invocation, as a session that ends after each chunk.
    entries = [checkpoints.build("tiny-ae", state, budget_s=0, weights_dir=weights_dir) for _ in range(4)]
    assert entries[:3] == [None, None, None] and entries[3] is not None
    assert not state.exists() and not state.with_suffix(".json").exists()  # the training state is cleaned up
    record = entries[3]["record"]
    assert record["steps"] == 20 and record["official_steps"] == 20 and len(record["loss"]) == 4
    assert len(record["held_out"]) == 4 and record["lr"] == [0.01] * 4
    assert [c["to_epoch"] for c in record["runs"][0]["chunks"]] == [1, 2, 3, 4]

    loaded = checkpoints.load_or_train("tiny-ae", retrain=False, weights_dir=weights_dir)
    retrained = checkpoints.load_or_train("tiny-ae", retrain=True)
    assert _same(loaded.model, retrained.model)  # RETRAIN on gives the shipped tensors
    assert isinstance(loaded.record, TrainingRecord) and loaded.record == retrained.record
    assert loaded.history == retrained.history and retrained.seconds > 0
    assert loaded.record.converged == retrained.record.converged  # the book's rule reads the shipped record
    assert "20 optimiser steps (official 20)" in loaded.summary()
    assert "recorded with the shipped file" in loaded.summary() and "trained here" in retrained.summary()
    ax = loaded.plot()
    assert [line.get_label() for line in ax.get_lines()] == ["training loss", "held-out loss", "official schedule"]
    assert list(ax.get_lines()[0].get_xdata()) == [5, 10, 15, 20]  # optimiser steps, not epochs
    assert checkpoints.registry_problems(weights_dir) == []


def test_a_half_recipe_ships_fp16_and_gives_the_rounded_model_loaded_or_retrained(weights_dir, tmp_path, monkeypatch):
    half = dataclasses.replace(TINY, half=True)
    monkeypatch.setitem(checkpoints.CHECKPOINT_RECIPES, "tiny-ae", half)
    checkpoints.build("tiny-ae", tmp_path / "h.pt", weights_dir=weights_dir)
    stored = load_file(str(weights_dir / "tiny-ae.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    loaded = checkpoints.load_or_train("tiny-ae", weights_dir=weights_dir)
    retrained = checkpoints.load_or_train("tiny-ae", retrain=True)
    full = checkpoints.train(TINY, tmp_path / "f.pt")
    assert _same(loaded.model, retrained.model) and not _same(loaded.model, full.model)
    for key, value in full.model.state_dict().items():  # rounding, nothing else
        assert torch.equal(loaded.model.state_dict()[key], value.half().float())
    assert loaded.history == full.history  # the record is the training's, before the rounding


def test_an_interrupted_recipe_resumes_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setitem(checkpoints.CHECKPOINT_RECIPES, "tiny-ae", TINY)
    whole = checkpoints.train(TINY, tmp_path / "a.pt")
    first = checkpoints.train(TINY, tmp_path / "b.pt", budget_s=0)
    assert not first.finished and len(first.history) == 1
    rest = checkpoints.train(TINY, tmp_path / "b.pt")
    assert rest.finished and rest.history == whole.history and _same(rest.model, whole.model)


def test_a_second_run_keeps_the_first_as_discarded_and_errors_say_what_to_do(weights_dir, tmp_path):
    for name in ("one", "two"):
        checkpoints.build("tiny-ae", tmp_path / f"{name}.pt", weights_dir=weights_dir)
    runs = json.loads((weights_dir / "registry.json").read_text())["tiny-ae"]["record"]["runs"]
    assert len(runs) == 2 and "replaced" in runs[0]["discarded"] and runs[1]["discarded"] == ""
    with pytest.raises(ValueError, match="choose from"):
        checkpoints.recipe("no-such-model")
    (weights_dir / "tiny-ae.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="train-checkpoint tiny-ae"):
        checkpoints.load_or_train("tiny-ae", weights_dir=weights_dir)
    assert checkpoints.registry_problems(weights_dir) == []  # present, if corrupt: the sha256 check catches that
    (weights_dir / "tiny-ae.safetensors").unlink()
    assert checkpoints.registry_problems(weights_dir) == ["tiny-ae: file tiny-ae.safetensors missing"]
    table = json.loads((weights_dir / "registry.json").read_text())
    del table["tiny-ae"]["record"]["runs"]
    (weights_dir / "registry.json").write_text(json.dumps(table))
    assert any("record lacks ['runs']" in p for p in checkpoints.registry_problems(weights_dir))
    (weights_dir / "TINY.md").unlink()
    with pytest.raises(FileNotFoundError, match="card"):
        checkpoints.build("tiny-ae", tmp_path / "three.pt", weights_dir=weights_dir)


def _one_recipe_per_kind() -> list[checkpoints.CheckpointRecipe]:
    """The first recipe of each kind: names that differ only in their digits (digit, class, seed), in a width
    (``-w<width>``: the same code; a full-width epoch would add half a minute here), a length (``-x<factor>``), a
    number of shots (``-k<shots>``), a trailing seed (``-s<seed>``), CFA's SynthTex category (the same code on
    other images), AA-CLIP's stage-1 loss (``-imageloss``) or its stage 2's anchors (``alone``: plain CLIP's) share a
    set-up function."""
    kinds: dict[str, checkpoints.CheckpointRecipe] = {}
    for name, spec in checkpoints.all_recipes().items():
        kind = re.sub(r"-w\d+$|-[xk]\d+|-imageloss", "", name).replace("-alone-", "-image-")
        kind = re.sub(r"^cfa-synthtex-[a-z]+", "cfa-synthtex", re.sub(r"-s\d+$", "", kind))
        kinds.setdefault(re.sub(r"\d+", "#", kind), spec)
    return list(kinds.values())


@pytest.mark.parametrize("spec", [TINY, *_one_recipe_per_kind()], ids=lambda r: r.name)
def test_every_kind_of_recipe_repeats_its_tensors_on_one_thread(spec, tmp_path):
    # a shortened run: its first epoch, twice
    a, b = (checkpoints.train(spec, tmp_path / f"{k}.pt", budget_s=0) for k in "ab")
    assert a.history == b.history and _same(a.model, b.model)


def test_the_shipped_registry_is_complete_within_budget_and_in_the_readme():
    assert checkpoints.registry_problems() == []
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = readme.index("| name | what | size | card | retrain |"), readme.index("**Converged chapter models.**")
    table = readme[start:end]
    for name in checkpoints.registry.shipped_weights():
        assert f"`{name}`" in table, f"README's weights table lacks {name} (with its size and rebuild time)"


def test_size_budgets(weights_dir, monkeypatch):
    (weights_dir / "big.safetensors").write_bytes(b"0" * 1000)
    (weights_dir / "registry.json").write_text(json.dumps({"big": {"file": "big.safetensors"}}))
    assert checkpoints.registry_problems(weights_dir) == []
    monkeypatch.setattr(checkpoints, "MAX_FILE_BYTES", 999)
    monkeypatch.setattr(checkpoints, "MAX_TOTAL_BYTES", 500)
    assert checkpoints.registry_problems(weights_dir) == ["big: 0.0 MB, over 0 MB",
                                                          "the registry holds 0.0 MB, over 0 MB"]


def test_the_command_resumes_and_reports(weights_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoints.registry, "WEIGHTS_DIR", weights_dir)
    assert cli.main(["train-checkpoint", "tiny-ae", "--budget-minutes", "0"]) == 0
    assert "run the same command" in capsys.readouterr().err and (tmp_path / "tiny-ae.training.pt").exists()
    assert cli.main(["train-checkpoint", "tiny-ae"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["kind"] == "checkpoint" and entry["command"] == "python -m adlib train-checkpoint tiny-ae"
    assert not (tmp_path / "tiny-ae.training.pt").exists()
    assert cli.main(["train-checkpoint", "nothing"]) == 2


def test_the_doubled_runs_of_chapters_3_5_and_10_begin_with_the_shipped_runs():
    # the doubling check compares a run with its own continuation: the first half of every doubled record (-x2, and
    # -x4 after -x2) must be the shorter run's record, epoch for epoch (a retrained x1 without its x2 breaks this),
    # when both ran on the same CPU model (runs without a "cpu" predate its recording: the AMD EPYC machines); on
    # another model the float kernels part the two within the first epoch, so only that epoch is compared, within 5 %
    from adlib.recipes import aaclip_caption, recon_mnist, ssl_occ_digits

    lengths = (1, *ssl_occ_digits.FACTORS)
    pairs = [(ssl_occ_digits.name_of(m, c, f), ssl_occ_digits.name_of(m, c, f2))
             for c in ssl_occ_digits.CLASSES for m in ssl_occ_digits.DOUBLED for f, f2 in zip(lengths, lengths[1:])]
    pairs += [(recon_mnist.name_of(k, a), recon_mnist.name_of(k, a, factor=recon_mnist.DOUBLING))
              for a in range(10) for k in recon_mnist.KINDS]
    lengths = (1, *aaclip_caption.FACTORS)
    pairs += [(aaclip_caption.name_of(v, s, factor=f), aaclip_caption.name_of(v, s, factor=f2))
              for v, seeds in aaclip_caption.DOUBLED.items() for s in seeds for f, f2 in zip(lengths, lengths[1:])]
    table = checkpoints.registry.shipped_weights()
    for once_name, twice_name in pairs:
        once, twice = table[once_name]["record"], table[twice_name]["record"]
        assert twice["steps"] == 2 * once["steps"], twice_name
        if once["runs"][-1].get("cpu") != twice["runs"][-1].get("cpu"):
            assert abs(twice["loss"][0] - once["loss"][0]) < 0.05 * abs(once["loss"][0]), twice_name
            continue
        for curve in ("loss", "held_out"):
            assert twice[curve][: len(once[curve])] == once[curve], twice_name
