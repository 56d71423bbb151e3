"""Training plumbing shared by every chapter: seeding, device choice and one plain training loop.

``seed_everything`` and ``choose_device`` are defined in: "Anomaly detection in ten minutes"
(``notebooks/01_ad_in_ten_minutes.ipynb``). The loop ``fit`` (progress, checkpoint after every epoch,
exact resume after a disconnect) is defined in: "Reconstruction: AE, VAE and GANomaly"
(``notebooks/03_reconstruction.ipynb``).
"""
from __future__ import annotations

import hashlib
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import numpy as np
import torch

from adlib.core.runtime import seed_everything

#: A step function: called with one batch, returns the losses it logged (name -> float).
StepFn = Callable[[Any], dict[str, float]]


def batch_images(batch: Any) -> torch.Tensor:
    """The image tensor of a batch: a tensor, the first item of a tuple/list, or ``batch["image"]``.

    Used by: ``adlib.methods.autoencoder.ae_step``, ``adlib.methods.ganomaly.ganomaly_step``.
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor):
        return batch["image"]
    raise TypeError(
        f"Cannot find images in a batch of type {type(batch).__name__}; yield a tensor, a tuple "
        "(images, ...) or a dict with an 'image' tensor."
    )


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (where its step functions move each batch).

    Used by: ``adlib.methods.autoencoder.ae_step``, ``adlib.methods.ganomaly.ganomaly_step``.
    """
    return next(model.parameters()).device


_FORMAT = "adlib.training.loop.fit/1"
_PROGRESS_MODES = ("widget", "text", "summary", "none")
# Hyperparameters that define a run; other param_group entries (foreach, fused, ...) vary with torch versions.
_OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov", "alpha", "amsgrad")


def _progress_mode() -> str:
    """How ``fit`` reports progress when ``progress=True``.

    ``$ADLIB_PROGRESS`` (one of ``_PROGRESS_MODES``) wins. Otherwise a tqdm widget only in a notebook a
    person is looking at (Colab, or a kernel started by a Jupyter server, which sets ``JPY_SESSION_NAME``):
    a batch run (papermill, the book build) would store the widget's state in the page. A terminal gets a
    text bar; anything else one summary line per epoch.
    """
    mode = os.environ.get("ADLIB_PROGRESS")
    if mode:
        if mode not in _PROGRESS_MODES:
            raise ValueError(f"$ADLIB_PROGRESS must be one of {', '.join(_PROGRESS_MODES)}; got {mode!r}.")
        return mode
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and type(shell).__name__ != "TerminalInteractiveShell":
        if "google.colab" in sys.modules or os.environ.get("JPY_SESSION_NAME"):
            return "widget"
        return "summary"
    return "text" if sys.stderr.isatty() else "summary"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fingerprint(state: Mapping[str, Any], loader: Iterable, seed: int, config: Mapping[str, Any] | None) -> dict:
    """Settings that must match for a checkpoint to be resumed: strings, so they compare and print simply."""
    fp = {"seed": str(seed), "batch_size": repr(getattr(loader, "batch_size", None))}
    dataset = getattr(loader, "dataset", None)
    fp["n_samples"] = repr(len(dataset)) if hasattr(dataset, "__len__") else "unknown"
    fp["loader_generator"] = repr(getattr(loader, "generator", None) is not None)
    for name, obj in state.items():
        if isinstance(obj, torch.nn.Module):
            shapes = ";".join(f"{k}{tuple(v.shape)}{v.dtype}" for k, v in obj.state_dict().items())
            fp[f"state.{name}"] = f"{type(obj).__name__} architecture {_digest(shapes)}"
        elif isinstance(obj, torch.optim.Optimizer):
            groups = [{k: g[k] for k in _OPTIMIZER_KEYS if k in g} for g in obj.param_groups]
            fp[f"state.{name}"] = f"{type(obj).__name__} {groups!r}"
        else:
            fp[f"state.{name}"] = type(obj).__name__
    for key, value in (config or {}).items():
        fp[f"config.{key}"] = repr(value)
    return fp


def _rng_states(loader: Iterable) -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # as a tensor, so the checkpoint loads with torch.load(weights_only=True)
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader.generator.get_state() if getattr(loader, "generator", None) is not None else None,
    }


def _set_rng_states(rng: dict, loader: Iterable) -> None:
    random.setstate(rng["python"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rng["loader"] is not None:
        loader.generator.set_state(rng["loader"])


def _save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file next to ``path``, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_checkpoint(path: Path, fingerprint: dict) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path} exists but is not a readable fit() checkpoint ({err}); it is left untouched: "
            "pass another checkpoint path, or move the file away to start over."
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise ValueError(
            f"{path} exists but is not a fit() checkpoint; it is left untouched: "
            "pass another checkpoint path, or move the file away to start over."
        )
    saved = ckpt["fingerprint"]
    diffs = [
        f"{k}: {saved.get(k, '<absent>')} (checkpoint) vs {fingerprint.get(k, '<absent>')} (now)"
        for k in sorted(set(saved) | set(fingerprint))
        if saved.get(k) != fingerprint.get(k)
    ]
    if diffs:
        raise ValueError(
            f"Checkpoint {path} was made with different settings, so it cannot be resumed:\n  "
            + "\n  ".join(diffs)
            + "\nIt is left untouched: pass another checkpoint path, or delete the file to train from scratch."
        )
    return ckpt


class IndexBatches:
    """A loader of index batches for training on arrays held in memory: every pass draws a new order of the ``n``
    samples (``torch.randperm`` with its own seeded ``generator``) and yields (B,) numpy index arrays of
    ``batch_size`` (the last one shorter). :func:`fit` saves and restores ``generator``, so a resumed run draws
    the same batches as an uninterrupted one.

    Used by: ``adlib.methods.aaclip.training.text_adapter_training``.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 samples and batch_size >= 1, got n={n}, batch_size={batch_size}.")
        self.n, self.batch_size = n, batch_size
        self.dataset = range(n)  # its length is part of fit's checkpoint fingerprint
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).numpy()
        return iter([order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)])


class FitSetup(NamedTuple):
    """One training set up for :func:`fit` and not yet run: the ``step`` function, the ``loader``, the ``state`` fit
    checkpoints (models, optimisers, schedules) and the ``config`` it fingerprints. A recipe that ships the model
    (``adlib.recipes.checkpoints.Training``) takes these four from a method's set-up function.

    Used by: ``adlib.methods.aaclip.training.text_adapter_training``, ``adlib.methods.clipn.no_encoder_training``.
    """

    step: StepFn
    loader: Any
    state: dict[str, Any]
    config: dict[str, Any]


class RandomSteps:
    """A loader for trainings that draw each step's batch themselves (random pairs, crops, augmentations): a pass
    is ``steps`` steps, and each step receives the loader's seeded ``generator`` to draw from. :func:`fit` saves and
    restores it, so a resumed run draws what an uninterrupted one would.

    Used by: ``adlib.methods.clipn.no_encoder_training``, ``adlib.recipes.tiny_clip.train_tiny_clip``.
    """

    def __init__(self, steps: int, seed: int = 0):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        self.steps = steps
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([self.generator] * self.steps)


def steps_per_epoch(steps: int, at_most: int = 100) -> int:
    """The largest divisor of ``steps`` up to ``at_most``: how many steps a step-counted training puts in one
    :func:`fit` epoch (one checkpoint and one history row per epoch).

    Used by: ``adlib.recipes.tiny_clip.train_tiny_clip``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    return max(d for d in range(1, min(steps, at_most) + 1) if steps % d == 0)


def _summary(epoch: int, epochs: int, row: dict[str, float], seconds: float) -> str:
    losses = "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
    return f"epoch {epoch}/{epochs}  {losses}  ({seconds:.1f} s)"


def fit(
    step_fn: Callable[[Any], Mapping[str, float]],
    loader: Iterable,
    *,
    epochs: int,
    checkpoint: str | os.PathLike | None = None,
    state: Mapping[str, Any] | None = None,
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    log_every: int = 1,
    budget_s: float | None = None,
    until: Callable[[list[dict[str, float]]], bool] | None = None,
) -> list[dict[str, float]]:
    """Train for ``epochs`` epochs: call ``step_fn(batch)`` (one optimisation step) on every batch.

    ``step_fn`` returns a dict of floats (losses); the result is the history, one dict per epoch with
    ``"epoch"`` (1-based) and the mean of each value over the epoch's steps.

    A fresh run starts with ``seed_everything(seed)`` (seed again yourself before building the models,
    so their initialisation repeats too). With ``checkpoint`` (a file path), every epoch ends by writing
    the epoch, the history, ``state_dict()`` of every object in ``state`` (models, optimisers,
    schedulers) and the RNG states (Python, NumPy, torch, CUDA, and the loader's ``generator``) to it,
    atomically. If the file exists, training resumes after its last epoch and ends exactly as an
    uninterrupted run would. The checkpoint stores a fingerprint of the settings (seed, batch size,
    data set size, architectures, optimiser hyperparameters and the ``config`` dict, e.g. loss
    weights); a checkpoint made with other settings is refused with a ``ValueError``, never overwritten.
    ``budget_s`` (with a checkpoint): stop after the first epoch that ends ``budget_s`` seconds or more after this
    call started; the history returned is then shorter than ``epochs``, and the same call again continues the run
    (a long training in chunks that each fit a session). ``until``: a stopping rule on the history so far, asked
    after every epoch (e.g. "the held-out loss is flat"); ``epochs`` is then the most it may train.

    ``progress``: a tqdm bar (a widget only in a live notebook, see ``_progress_mode``; set
    ``$ADLIB_PROGRESS`` to ``widget``, ``text``, ``summary`` or ``none`` to choose) and a summary line
    every ``log_every`` epochs and at the last one.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}.")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every!r}.")
    state = dict(state or {})
    for name, obj in state.items():
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"state[{name!r}] ({type(obj).__name__}) has no state_dict()/load_state_dict().")
    if checkpoint is not None and not state:
        raise ValueError("A checkpoint needs something to save: pass state={'model': model, 'opt': optimizer}.")
    if budget_s is not None and checkpoint is None:
        raise ValueError("budget_s stops a run to resume it later: pass a checkpoint file too.")
    called = time.perf_counter()

    path = Path(checkpoint) if checkpoint is not None else None
    fingerprint = _fingerprint(state, loader, seed, config)
    history: list[dict[str, float]] = []
    start = 0
    if path is not None and path.is_dir():
        raise ValueError(f"checkpoint must be a file path, but {path} is a directory; e.g. pass {path / 'ckpt.pt'}.")
    if path is not None and path.exists():
        ckpt = _load_checkpoint(path, fingerprint)
        if ckpt["epoch"] > epochs:
            raise ValueError(
                f"Checkpoint {path} already holds {ckpt['epoch']} epochs, more than epochs={epochs}; "
                f"pass epochs >= {ckpt['epoch']}, or another checkpoint path."
            )
        for name, obj in state.items():
            obj.load_state_dict(ckpt["state"][name])
        _set_rng_states(ckpt["rng"], loader)
        history, start = list(ckpt["history"]), ckpt["epoch"]
        if until is not None and until(history):  # a finished run: nothing left to train
            return history
    else:
        seed_everything(seed)

    mode = _progress_mode() if progress else "none"
    if progress and start > 0:
        print(f"Resumed from {path} after epoch {start}/{epochs}.")
    bar = None
    if mode in ("widget", "text") and start < epochs:
        if mode == "widget":
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm
        steps = len(loader) if hasattr(loader, "__len__") else None
        bar = tqdm(total=None if steps is None else steps * (epochs - start), desc="training", leave=False)

    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            n_steps = 0
            for batch in loader:
                out = step_fn(batch)
                if not isinstance(out, Mapping):
                    raise TypeError(f"step_fn must return a dict of floats, got {type(out).__name__}.")
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                    counts[key] = counts.get(key, 0) + 1
                n_steps += 1
                if bar is not None:
                    bar.update(1)
            if n_steps == 0:
                raise ValueError("The loader yielded no batches: check the data set and batch_size/drop_last.")
            row = {"epoch": epoch + 1, **{k: sums[k] / counts[k] for k in sums}}
            history.append(row)
            if path is not None:
                _save_atomic(
                    {
                        "format": _FORMAT,
                        "epoch": epoch + 1,
                        "history": history,
                        "state": {name: obj.state_dict() for name, obj in state.items()},
                        "rng": _rng_states(loader),
                        "fingerprint": fingerprint,
                    },
                    path,
                )
            if mode != "none" and ((epoch + 1) % log_every == 0 or epoch + 1 == epochs):
                line = _summary(epoch + 1, epochs, row, time.perf_counter() - t0)
                if bar is not None:
                    bar.write(line)
                else:
                    print(line, flush=True)
            if until is not None and until(history):
                if progress:
                    print(f"Stopped after epoch {epoch + 1}/{epochs}: its stopping rule holds.", flush=True)
                break
            if budget_s is not None and epoch + 1 < epochs and time.perf_counter() - called >= budget_s:
                if progress:
                    print(f"Stopped after epoch {epoch + 1}/{epochs} (budget {budget_s:.0f} s); the same call resumes "
                          f"from {path}.", flush=True)
                break
    finally:
        if bar is not None:
            bar.close()
    return history


def loss_change(history: list[Mapping[str, float]], key: str = "loss") -> float:
    """How much a run's loss still moved at the end: the relative change of the mean of ``history[i][key]``
    from the second-last fifth of the epochs to the last fifth (0 = flat; -0.05 = still falling 5 %).

    ``history`` is what :func:`fit` returns; a plateau check that needs no test data.

    Used by: ``adlib.eval.claims.TrainingRecord``, ``adlib.recipes.teachers.distill_teacher``.
    """
    loss = [row[key] for row in history]
    if len(loss) < 2:
        raise ValueError(f"need at least 2 epochs to measure a change, got {len(loss)}.")
    k = max(1, len(loss) // 5)
    before, last = np.mean(loss[-2 * k:-k] or loss[:1]), np.mean(loss[-k:])
    if before == 0:  # a loss that reached zero: flat while it stays there
        return 0.0 if last == 0 else float("inf")
    return float((last - before) / abs(before))
