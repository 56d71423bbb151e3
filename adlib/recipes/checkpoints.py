"""Converged chapter models: trained offline to convergence, shipped with their training record, loaded by a chapter.

A chapter whose model cannot train for the official number of optimiser steps within its three minutes loads a
shipped checkpoint instead, and retrains it on request (the UvA DL notebooks' pattern: load it, else train)::

    trained = checkpoints.load_or_train("NAME", retrain=RETRAIN)   # TrainedCheckpoint
    trained.model, trained.record.converged, trained.seconds

A :class:`CheckpointRecipe` sets one training up (:class:`Training`: the model, the step function and loader of
:func:`adlib.training.loop.fit`, the epochs and the official schedule's steps); :func:`train` runs it in chunks that
resume bit for bit (``budget_s``), :func:`ship` writes the model (safetensors) beside the registry with its entry:
sha256, the command that rebuilds it, its card and the training record that ``adlib.eval.claims`` judges.
``python -m adlib train-checkpoint NAME`` does both. Recipes register themselves in :data:`CHECKPOINT_RECIPES`.
"""
from __future__ import annotations

import importlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adlib.core.checksum import sha256sum
from adlib.core.home import exclusive
from adlib.core.versions import cpu_model
from adlib.eval.claims import TrainingRecord, training_record
from adlib.training.loop import StepFn, fit
from adlib.weights import registry


@dataclass
class Training:
    """One training, set up: ``model`` (its ``state_dict`` is what ships), ``step`` and ``loader`` for
    :func:`adlib.training.loop.fit`, ``state`` (what fit checkpoints: the model, the optimiser, a scheduler),
    ``epochs``, ``official_steps`` (the paper's schedule in optimiser steps, None where there is none) and
    ``config`` (the settings fit's checkpoint fingerprints), ``until`` (a stopping rule: ``epochs`` is then the most it
    trains). The step function may add ``"held_out"`` (a held-out
    loss) and ``"lr"`` (the learning rate) to the last step of an epoch: the record keeps them per epoch.

    Used by: ``adlib.recipes.checkpoints.CheckpointRecipe``.
    """

    model: nn.Module
    step: StepFn
    loader: Iterable
    state: dict[str, Any]
    epochs: int
    official_steps: int | None
    config: dict[str, Any] = field(default_factory=dict)
    until: Callable[[list[dict[str, float]]], bool] | None = None


@dataclass(frozen=True)
class CheckpointRecipe:
    """A registry name, its one-line ``summary``, its ``card`` (a markdown file beside the registry) and ``setup``:
    a function of the seed that builds the same untrained :class:`Training` every time it is called. ``half``: the
    trained model's floating-point tensors are rounded to float16, and shipped so (half the file; the model a
    chapter uses is the rounded one whether loaded or retrained). ``model``: a function of the seed that builds the
    untrained model alone, for loading a shipped file without building the training (its data) too; None: the model
    of ``setup``.

    Used by: ``adlib.recipes.checkpoints.recipe``.
    """

    name: str
    summary: str
    card: str
    setup: Callable[[int], Training]
    seed: int = 0
    half: bool = False
    model: Callable[[int], nn.Module] | None = None


#: The chapters' checkpoint recipes by registry name, filled by the modules of :data:`RECIPE_MODULES` on import.
CHECKPOINT_RECIPES: dict[str, CheckpointRecipe] = {}

#: The modules that define chapter recipes (each adds its :class:`CheckpointRecipe` s to :data:`CHECKPOINT_RECIPES`);
#: :func:`recipe` imports them, so a recipe is found without importing its chapter's code first.
RECIPE_MODULES: tuple[str, ...] = ("adlib.recipes.recon_mnist", "adlib.recipes.ssl_occ_digits",
                                   "adlib.recipes.simclr_digits", "adlib.recipes.cfa_synthtex",
                                   "adlib.recipes.aaclip_caption", "adlib.recipes.clipn_caption")


@dataclass
class TrainedCheckpoint:
    """A trained model and how it was trained: ``history`` (one dict per epoch, as fit returns it), ``record`` (the
    :class:`adlib.eval.claims.TrainingRecord` the convergence rule judges), ``seconds`` of training (this call's when
    retrained, the recorded ones when ``loaded`` from the shipped file) and ``finished`` (False: stopped by a
    budget, resumable). :meth:`summary` and :meth:`plot` are what a chapter shows of it.

    Used by: ``adlib.recipes.checkpoints.load_or_train``.
    """

    model: nn.Module
    history: list[dict[str, float]]
    record: TrainingRecord
    seconds: float
    finished: bool = True
    loaded: bool = False

    def summary(self) -> str:
        """One line: steps against the official schedule, the convergence verdict of the book's rule and the
        training time (the recorded one of the shipped file, or this run's)."""
        r = self.record
        official = "no official schedule" if r.official_steps is None else f"official {r.official_steps:,}"
        verdict = "converged" if r.converged else "not converged"
        where = "recorded with the shipped file" if self.loaded else "trained here"
        return (f"{r.name}: {r.steps:,} optimiser steps ({official}); loss change over the last fifth "
                f"{r.change:+.1%}: {verdict} by the book's rule; {self.seconds:.0f} s of training ({where})")

    def plot(self, ax: Any = None) -> Any:
        """The whole recorded training curve: loss (and held-out loss) against optimiser steps, the last fifth
        (where the convergence rule looks) shaded and the official schedule's length marked when it is in view."""
        import matplotlib.pyplot as plt

        ax = plt.subplots(figsize=(5, 3))[1] if ax is None else ax
        r = self.record
        per_epoch = r.steps / max(1, len(r.loss))
        steps = [per_epoch * (i + 1) for i in range(len(r.loss))]
        ax.plot(steps, r.loss, marker=".", label="training loss")
        if r.held_out:
            ax.plot(steps, r.held_out, marker=".", label="held-out loss")
        ax.axvspan(steps[-max(1, len(steps) // 5)], steps[-1], color="grey", alpha=0.15, label="last fifth")
        if r.official_steps is not None and r.official_steps <= 1.2 * r.steps:
            ax.axvline(r.official_steps, color="black", ls="--", lw=1, label="official schedule")
        ax.set(xlabel="optimiser steps", ylabel="loss", title=r.name)
        ax.legend(fontsize=8)
        return ax


def all_recipes() -> dict[str, CheckpointRecipe]:
    """Every chapter recipe by registry name (the modules of :data:`RECIPE_MODULES` imported first).

    Used by: ``adlib.recipes.checkpoints.recipe``.
    """
    for module in RECIPE_MODULES:
        importlib.import_module(module)
    return CHECKPOINT_RECIPES


def recipe(name: str) -> CheckpointRecipe:
    """The recipe of a registry name, or an error listing them.

    Used by: ``python -m adlib train-checkpoint``.
    """
    if name not in all_recipes():
        raise ValueError(f"No checkpoint recipe {name!r}; choose from {sorted(CHECKPOINT_RECIPES)}.")
    return CHECKPOINT_RECIPES[name]


def _record(name: str, training: Training, history: list[dict[str, float]]) -> TrainingRecord:
    steps = len(training.loader) * len(history)  # a recipe's loader knows its steps per epoch
    has = lambda key: bool(history) and key in history[-1]  # noqa: E731
    return training_record(name, history, steps=steps, official_steps=training.official_steps,
                           held_out="held_out" if has("held_out") else None, lr="lr" if has("lr") else None)


def train(spec: CheckpointRecipe, checkpoint: str | Path, *, budget_s: float | None = None,
          progress: bool = False) -> TrainedCheckpoint:
    """Train ``spec`` through :func:`adlib.training.loop.fit`, saving every epoch to ``checkpoint``; with ``budget_s``
    stop after the first epoch past it (``finished`` False) and continue from there on the next call.

    Used by: ``adlib.recipes.checkpoints.load_or_train``, ``python -m adlib train-checkpoint``.
    """
    training = spec.setup(spec.seed)
    t0 = time.perf_counter()
    history = fit(training.step, training.loader, epochs=training.epochs, checkpoint=checkpoint,
                  state=training.state, seed=spec.seed, config=training.config | {"recipe": spec.name},
                  progress=progress, budget_s=budget_s, until=training.until)
    training.model.eval()
    finished = len(history) == training.epochs or (training.until is not None and training.until(history))
    if spec.half and finished:
        with torch.no_grad():  # what ships: the same numbers loaded or retrained
            for tensor in training.model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half())
    return TrainedCheckpoint(training.model, history, _record(spec.name, training, history),
                             time.perf_counter() - t0, finished)


def ship(spec: CheckpointRecipe, trained: TrainedCheckpoint, runs: list[dict[str, Any]],
         weights_dir: str | Path | None = None) -> dict[str, Any]:
    """Write a finished training's model to ``<weights_dir>/<name>.safetensors`` (fp32; fp16 for a ``half`` recipe)
    and its entry to the registry there (default: the package's ``adlib/weights``): sha256, the rebuild command, the
    card and the record
    (steps, official steps, loss, held-out loss and learning rate per epoch, and ``runs``: every run made for it,
    with ``"discarded"`` saying why one was not shipped). An entry shipped before under the name moves into ``runs``
    as discarded. Returns the entry.

    Used by: ``adlib.recipes.checkpoints.build``.
    """
    if not trained.finished:
        raise ValueError(f"{spec.name}: the training stopped after {len(trained.history)} epochs; resume it first.")
    folder = registry.registry_folder(weights_dir)
    path = folder / f"{spec.name}.safetensors"
    stored = lambda v: v.half() if spec.half and v.is_floating_point() else v  # noqa: E731
    save_file({k: stored(v.detach().cpu()).contiguous() for k, v in trained.model.state_dict().items()}, str(path))
    with exclusive(folder / "registry.lock"):  # two trainings may finish together: neither entry may be lost
        return _register(spec, trained, runs, folder, path)


def _register(spec: CheckpointRecipe, trained: TrainedCheckpoint, runs: list[dict[str, Any]], folder: Path,
              path: Path) -> dict[str, Any]:
    table = registry.shipped_weights(folder)
    replaced = f"replaced by a later run of python -m adlib train-checkpoint {spec.name}"
    earlier = [run | {"discarded": run["discarded"] or replaced}
               for run in table.get(spec.name, {}).get("record", {}).get("runs", [])]
    r = trained.record
    table[spec.name] = {
        "file": path.name, "kind": "checkpoint", "sha256": sha256sum(path), "bytes": path.stat().st_size,
        "command": f"python -m adlib train-checkpoint {spec.name}", "card": spec.card,
        "record": {"steps": r.steps, "official_steps": r.official_steps, "loss": list(r.loss),
                   "held_out": list(r.held_out), "lr": list(r.lr), "seconds": round(sum(x["seconds"] for x in runs), 1),
                   "runs": earlier + runs}}
    (folder / "registry.json").write_text(json.dumps(table, indent=1) + "\n")
    return table[spec.name]


def load_or_train(name: str, retrain: bool = False, weights_dir: str | Path | None = None) -> TrainedCheckpoint:
    """A chapter's model: the shipped checkpoint ``name`` (sha256-checked) with its recorded training, or, with
    ``retrain``, the same recipe trained again here (its seconds measured), which gives the same tensors.
    ``weights_dir``: another registry folder than the package's (tests).

    Used by: ``adlib.recipes.checkpoints.build``.
    """
    spec = recipe(name)
    if retrain:
        with tempfile.TemporaryDirectory() as tmp:
            return train(spec, Path(tmp) / "training.pt")
    entry = registry.shipped_weights(weights_dir).get(name)
    if entry is None or entry.get("kind") != "checkpoint":
        raise FileNotFoundError(f"No shipped checkpoint {name!r}; build it with: python -m adlib train-checkpoint "
                                f"{name}, or pass retrain=True.")
    model = spec.model(spec.seed) if spec.model is not None else spec.setup(spec.seed).model
    model.load_state_dict(load_file(str(registry.weights_file(name, weights_dir))))
    model.eval()
    rec = entry["record"]
    record = TrainingRecord(name, rec["steps"], rec["official_steps"], tuple(rec["loss"]), tuple(rec["held_out"]),
                            tuple(rec["lr"]))
    history = [{"epoch": i + 1, "loss": v} | ({"held_out": rec["held_out"][i]} if rec["held_out"] else {})
               | ({"lr": rec["lr"][i]} if rec["lr"] else {}) for i, v in enumerate(rec["loss"])]
    return TrainedCheckpoint(model, history, record, float(rec["seconds"]), loaded=True)


def build(name: str, state_file: str | Path | None = None, budget_s: float | None = None,
          weights_dir: str | Path | None = None) -> dict[str, Any] | None:
    """One invocation of ``python -m adlib train-checkpoint NAME``: train the recipe for at most about ``budget_s``
    seconds from its training state (``state_file``, default ``NAME.training.pt``; every chunk's seconds go to
    ``NAME.training.json`` beside it). Stopped by the budget: None, and the same call goes on. Finished: ship the
    model and its record (:func:`ship`), load it back through :func:`load_or_train` to check that the registry gives
    the same tensors, delete the training state and return the registry entry.

    Used by: ``python -m adlib train-checkpoint``.
    """
    spec = recipe(name)
    folder = registry.registry_folder(weights_dir)
    if not (folder / spec.card).is_file():  # before hours of training, not after
        raise FileNotFoundError(f"{name}: its card {folder / spec.card} is missing; write it first.")
    state = Path(state_file) if state_file is not None else Path(f"{name}.training.pt")
    log = state.with_suffix(".json")
    chunks = json.loads(log.read_text()) if log.exists() and state.exists() else []
    trained = train(spec, state, budget_s=budget_s, progress=True)
    chunks.append({"to_epoch": len(trained.history), "seconds": round(trained.seconds, 1),
                   "threads": torch.get_num_threads()})
    log.write_text(json.dumps(chunks, indent=1) + "\n")
    if not trained.finished:
        return None
    run = {"epochs": len(trained.history), "seconds": round(sum(c["seconds"] for c in chunks), 1), "chunks": chunks,
           "cpu": cpu_model(), "discarded": ""}
    entry = ship(spec, trained, [run], weights_dir)
    if problems := registry_problems(weights_dir):
        raise RuntimeError("the registry is incomplete: " + "; ".join(problems))
    loaded = load_or_train(name, weights_dir=weights_dir).model.state_dict()
    for key, value in trained.model.state_dict().items():
        if not torch.equal(loaded[key], value.cpu()):
            raise RuntimeError(f"{name}: the shipped file does not give back the trained tensor {key}.")
    state.unlink()
    log.unlink()
    return entry


#: The registry's size budgets (bytes): one file, and all of them together.
MAX_FILE_BYTES, MAX_TOTAL_BYTES = 8 * 10**6, 40 * 10**6


def registry_problems(weights_dir: str | Path | None = None) -> list[str]:
    """What is wrong with the registry: a missing file, a file over :data:`MAX_FILE_BYTES` or all of them over
    :data:`MAX_TOTAL_BYTES`, a checkpoint entry without its record or its card.

    Used by: ``adlib.recipes.checkpoints.build``.
    """
    folder = registry.registry_folder(weights_dir)
    table = registry.shipped_weights(folder)
    problems = [f"{name}: file {e['file']} missing" for name, e in table.items() if not (folder / e["file"]).is_file()]
    sizes = {name: (folder / e["file"]).stat().st_size for name, e in table.items() if (folder / e["file"]).is_file()}
    problems += [f"{name}: {size / 1e6:.1f} MB, over {MAX_FILE_BYTES / 1e6:.0f} MB" for name, size in sizes.items()
                 if size > MAX_FILE_BYTES]
    if sum(sizes.values()) > MAX_TOTAL_BYTES:
        problems.append(f"the registry holds {sum(sizes.values()) / 1e6:.1f} MB, over {MAX_TOTAL_BYTES / 1e6:.0f} MB")
    for name, e in table.items():
        if e.get("kind") == "checkpoint":
            missing = {"steps", "official_steps", "loss", "runs"} - set(e.get("record", {}))
            problems += [f"{name}: record lacks {sorted(missing)}"] if missing else []
            problems += [] if (folder / e.get("card", "")).is_file() else [f"{name}: card {e.get('card')} missing"]
    return problems

