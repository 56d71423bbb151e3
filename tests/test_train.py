"""adlib.training.loop.fit: per-epoch means, exact resume after an interruption, refusal of foreign checkpoints."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adlib.training import loop
from adlib.training.loop import fit

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


DATA = TensorDataset(torch.randn(40, 6, generator=torch.Generator().manual_seed(0)))


def _setup(init_seed: int, with_generator: bool, lr: float = 1e-2):
    """A model whose training consumes every RNG fit must restore: torch (dropout, shuffling), NumPy, Python."""
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 6))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(123) if with_generator else None
    loader = DataLoader(DATA, batch_size=8, shuffle=True, generator=generator)

    def step(batch):
        (x,) = batch
        noise = torch.from_numpy(np.random.normal(0, 0.1, x.shape).astype(np.float32)) * random.random()
        model.train()
        loss = (model(x + noise) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "noise_scale": float(noise.abs().mean())}

    return model, opt, loader, step


@pytest.mark.parametrize("with_generator", [False, True])
def test_resume_after_interruption_is_exact(tmp_path, with_generator):
    model, opt, loader, step = _setup(0, with_generator)
    full = fit(step, loader, epochs=3, state={"model": model, "opt": opt}, seed=7, progress=False)

    ckpt = tmp_path / "ckpt.pt"
    m1, o1, l1, s1 = _setup(0, with_generator)
    first = fit(s1, l1, epochs=1, checkpoint=ckpt, state={"model": m1, "opt": o1}, seed=7, progress=False)
    assert len(first) == 1
    # A new session: fresh objects (other initial weights), fresh RNGs; everything must come from the file.
    torch.manual_seed(999), np.random.seed(999), random.seed(999)
    m2, o2, l2, s2 = _setup(1, with_generator)
    resumed = fit(s2, l2, epochs=3, checkpoint=ckpt, state={"model": m2, "opt": o2}, seed=7, progress=False)

    assert resumed == full
    for (name, p_full), (_, p_res) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(p_full, p_res), name
    assert [p.tolist() for p in opt.state_dict()["state"][0].values()] == \
           [p.tolist() for p in o2.state_dict()["state"][0].values()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]   # no temporary files left behind


def test_a_budget_stops_at_an_epoch_end_and_the_same_call_resumes_bit_for_bit(tmp_path):
    model, opt, loader, step = _setup(0, True)
    full = fit(step, loader, epochs=3, state={"model": model, "opt": opt}, seed=7, progress=False)
    ckpt, chunks = tmp_path / "ckpt.pt", []
    while len(chunks) < 5:  # a budget of 0 s: one epoch per call, each call a new session
        m, o, ld, s = _setup(len(chunks), True)  # resumed calls start from other weights: the file restores them
        chunks.append(fit(s, ld, epochs=3, checkpoint=ckpt, state={"model": m, "opt": o}, seed=7, progress=False,
                          budget_s=0))
        if len(chunks[-1]) == 3:
            break
    assert [len(c) for c in chunks] == [1, 2, 3] and chunks[-1] == full
    for (name, a), b in zip(model.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="checkpoint file too"):
        fit(step, loader, epochs=3, budget_s=60, progress=False)


def test_until_stops_after_the_first_epoch_it_holds_and_a_finished_run_resumes_as_finished(tmp_path):
    model, opt, loader, step = _setup(0, True)
    two = lambda history: len(history) >= 2  # noqa: E731
    ckpt = tmp_path / "ckpt.pt"
    history = fit(step, loader, epochs=5, checkpoint=ckpt, state={"model": model, "opt": opt}, progress=False,
                  until=two)
    m, o, ld, s = _setup(1, True)
    again = fit(s, ld, epochs=5, checkpoint=ckpt, state={"model": m, "opt": o}, progress=False, until=two)
    assert len(history) == 2 and again == history  # nothing trained after the rule held
    for (name, a), b in zip(model.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b), name


def test_history_holds_per_epoch_means_of_the_step_outputs():
    calls = []

    def step(batch):
        calls.append(len(calls))
        return {"a": float(len(calls)), "b": torch.tensor(2.0)}

    loader = DataLoader(DATA, batch_size=10)                 # 4 steps per epoch
    history = fit(step, loader, epochs=2, progress=False)
    assert history == [{"epoch": 1, "a": (1 + 2 + 3 + 4) / 4, "b": 2.0},
                       {"epoch": 2, "a": (5 + 6 + 7 + 8) / 4, "b": 2.0}]


def test_summary_lines_when_not_interactive(capsys, monkeypatch):
    monkeypatch.setenv("ADLIB_PROGRESS", "summary")
    loader = DataLoader(DATA, batch_size=20)
    fit(lambda batch: {"loss": 1.0}, loader, epochs=3, log_every=2)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 2/3", "epoch 3/3"]
    assert "loss 1" in lines[0]


def test_finished_checkpoint_is_loaded_without_training(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    model, opt, loader, step = _setup(0, True)
    history = fit(step, loader, epochs=2, checkpoint=ckpt, state={"model": model, "opt": opt}, progress=False)
    m2, o2, l2, _ = _setup(1, True)

    def must_not_run(batch):
        raise AssertionError("trained again")

    again = fit(must_not_run, l2, epochs=2, checkpoint=ckpt, state={"model": m2, "opt": o2}, progress=False)
    assert again == history
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(ValueError, match="already holds 2 epochs"):
        fit(must_not_run, l2, epochs=1, checkpoint=ckpt, state={"model": m2, "opt": o2}, progress=False)


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"seed": 1}, "seed"),
        ({"lr": 0.5}, "state.opt"),
        ({"config": {"beta": 2.0}}, "config.beta"),
    ],
)
def test_checkpoint_from_other_settings_is_refused_and_kept(tmp_path, change, expected):
    ckpt = tmp_path / "ckpt.pt"
    model, opt, loader, step = _setup(0, True)
    fit(step, loader, epochs=1, checkpoint=ckpt, state={"model": model, "opt": opt}, seed=0,
        config={"beta": 1.0}, progress=False)
    before = ckpt.read_bytes()
    m2, o2, l2, s2 = _setup(0, True, lr=change.get("lr", 1e-2))
    with pytest.raises(ValueError, match=rf"different settings(.|\n)*{expected}(.|\n)*left untouched"):
        fit(s2, l2, epochs=2, checkpoint=ckpt, state={"model": m2, "opt": o2}, seed=change.get("seed", 0),
            config=change.get("config", {"beta": 1.0}), progress=False)
    assert ckpt.read_bytes() == before


def test_other_architecture_and_foreign_files_are_refused(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    model, opt, loader, step = _setup(0, True)
    fit(step, loader, epochs=1, checkpoint=ckpt, state={"model": model, "opt": opt}, progress=False)
    wider = nn.Linear(6, 7)
    with pytest.raises(ValueError, match="state.model"):
        fit(step, loader, epochs=2, checkpoint=ckpt,
            state={"model": wider, "opt": torch.optim.Adam(wider.parameters(), lr=1e-2)}, progress=False)

    foreign = tmp_path / "notes.pt"
    foreign.write_text("my own notes")
    with pytest.raises(ValueError, match="not a readable fit\\(\\) checkpoint"):
        fit(step, loader, epochs=1, checkpoint=foreign, state={"model": model, "opt": opt}, progress=False)
    assert foreign.read_text() == "my own notes"


def test_bad_arguments_are_explained(tmp_path):
    loader = DataLoader(DATA, batch_size=8)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        fit(lambda b: {}, loader, epochs=0)
    with pytest.raises(ValueError, match="needs something to save"):
        fit(lambda b: {}, loader, epochs=1, checkpoint=tmp_path / "c.pt")
    with pytest.raises(ValueError, match="is a directory"):
        fit(lambda b: {}, loader, epochs=1, checkpoint=tmp_path, state={"m": nn.Linear(1, 1)})
    with pytest.raises(TypeError, match="dict of floats"):
        fit(lambda b: 1.0, loader, epochs=1, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        fit(lambda b: {}, DataLoader(TensorDataset(torch.zeros(0, 1))), epochs=1, progress=False)


def test_loss_change_compares_the_last_two_fifths():
    history = [{"epoch": i + 1, "loss": v} for i, v in enumerate([9, 9, 9, 9, 9, 9, 4, 4, 2, 2])]
    # fifths of 2 epochs: the second-last averages 4, the last 2 -> -50 %
    assert loop.loss_change(history) == pytest.approx(-0.5)
    assert loop.loss_change([{"loss": 2.0}, {"loss": 1.0}]) == pytest.approx(-0.5)
    assert loop.loss_change([{"loss": 0.0}] * 4) == 0.0  # a loss that reached zero is flat, not 0 / 0
    assert loop.loss_change([{"loss": 0.0}, {"loss": 1.0}]) == float("inf")
    with pytest.raises(ValueError, match="at least 2 epochs"):
        loop.loss_change([{"loss": 1.0}])


def test_index_batches_cover_every_sample_once_per_pass() -> None:
    loader = loop.IndexBatches(10, 4, seed=0)
    first, second = [b.tolist() for b in loader], [b.tolist() for b in loader]
    assert len(loader) == 3 and [len(b) for b in first] == [4, 4, 2]
    assert sorted(sum(first, [])) == list(range(10)) == sorted(sum(second, []))
    assert first != second  # a new order every pass
    assert [b.tolist() for b in loop.IndexBatches(10, 4, seed=0)] == first
    with pytest.raises(ValueError, match="batch_size"):
        loop.IndexBatches(10, 0)


def test_random_steps_and_steps_per_epoch() -> None:
    loader = loop.RandomSteps(3, seed=1)
    assert len(loader) == 3 and all(g is loader.generator for g in loader)
    assert [loop.steps_per_epoch(n) for n in (3000, 600, 7, 250, 1)] == [100, 100, 7, 50, 1]
    with pytest.raises(ValueError, match="steps"):
        loop.RandomSteps(0)


class Interrupted(Exception):
    """What :func:`interrupted_after` raises: a disconnect in the middle of a training."""


@contextlib.contextmanager
def interrupted_after(n_steps: int):
    """Every :class:`adlib.training.loop.RandomSteps` loader raises :class:`Interrupted` at its ``n_steps + 1``-th
    step."""
    original, count = loop.RandomSteps.__iter__, [0]

    def iterate(self):
        for item in original(self):
            count[0] += 1
            if count[0] > n_steps:
                raise Interrupted
            yield item

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop.RandomSteps, "__iter__", iterate)
        yield
