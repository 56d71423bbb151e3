"""Chapter 7's converged CFA descriptors: one per SynthTex category and training seed, in the book profile's setting.

The official 30 epochs are about 1,800 optimiser steps on an average MVTec AD category (:data:`cfa.OFFICIAL_STEPS`),
but only 390 on a SynthTex category of 60 training images, and the loss still falls there. Each recipe trains
:class:`adlib.methods.cfa.CFADetector`'s default schedule instead: at least the official steps, then on until the
loss of a held-out tenth of the normal training images is flat by the book's rule (:func:`cfa.is_flat`), at most
:data:`cfa.MAX_EPOCHS` epochs. That takes minutes per run, more than the chapter's three, so the descriptors are
trained offline (``python -m adlib train-checkpoint cfa-synthtex-<category>-s<seed>``) and shipped in fp16 with
their training records; the chapter loads them, else trains them. The runs that reach the cap still falling are
trained again with twice the cap (:data:`DOUBLED`, the doubling check of chapter 7's claims). The bench's ``cfa``
(:class:`ShippedCFADetector`) loads a shipped descriptor where it is given the very features it was trained on.
Card: ``CFA_SYNTHTEX.md``.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from adlib.data import mvtec, synthtex
from adlib.methods import cfa
from adlib.recipes.checkpoints import CHECKPOINT_RECIPES, CheckpointRecipe, TrainedCheckpoint, Training, load_or_train
from adlib.weights import registry

#: The book profile's setting (chapter 7): SynthTex at 128 px, ImageNet EfficientNet-Lite0 stages 1 and 2 on an
#: 8-px grid, three training seeds per category.
IMAGE_SIZE, BACKBONE, LAYERS, STRIDE, SEEDS = 128, "effnet-lite0", (1, 2), 8, (0, 1, 2)
#: The doubling check: the runs that reached :data:`cfa.MAX_EPOCHS` with their held-out loss still falling, trained
#: again with twice the cap (the same rule, so they may stop flat on the way): category -> seeds.
DOUBLED = {"tile": (0, 1, 2), "wood": (0, 1), "grass": (0, 1), "gravel": (1,)}


def detector(seed: int, factor: int = 1) -> cfa.CFADetector:
    """An unfitted CFA detector with the book profile's setting and the paper's hyperparameters; ``factor`` times
    the cap of epochs.

    Used by: ``adlib.recipes.cfa_synthtex.setup``, ``adlib.recipes.cfa_synthtex.fitted_detector``.
    """
    return cfa.CFADetector(BACKBONE, LAYERS, STRIDE, seed=seed, max_epochs=factor * cfa.MAX_EPOCHS)


@lru_cache(maxsize=len(synthtex.CATEGORIES))  # every seed of a category reads the same frozen features
def training_features(category: str) -> torch.Tensor:
    """The frozen patch features (N, C, 16, 16) of the book profile's SynthTex training images of ``category``.

    Used by: ``adlib.recipes.cfa_synthtex.setup``.
    """
    train = mvtec.load_split(mvtec.benchmark_root("book"), category, "train", IMAGE_SIZE)
    return detector(0).inputs(train.tensor())


def setup(category: str, seed: int, factor: int = 1) -> Training:
    """The :class:`Training` of the descriptor of ``category`` with ``seed`` (the detector's own schedule, its cap
    of epochs times ``factor``).

    Used by: ``adlib.recipes.cfa_synthtex.recipe_of``.
    """
    t = detector(seed, factor).training(training_features(category))
    config = {"category": category, "image_size": IMAGE_SIZE} | ({"factor": factor} if factor > 1 else {})
    return Training(t.model, t.step, t.loader, t.state, epochs=t.epochs, official_steps=cfa.OFFICIAL_STEPS,
                    config=config, until=t.until)


def name_of(category: str, seed: int, factor: int = 1) -> str:
    """The registry name of a descriptor: ``cfa-synthtex-<category>-s<seed>[-x<factor>]``.

    Used by: ``adlib.recipes.cfa_synthtex``.
    """
    return f"cfa-synthtex-{category}-s{seed}" + ("" if factor == 1 else f"-x{factor}")


def fitted_detector(category: str, seed: int, retrain: bool = False, factor: int = 1
                    ) -> tuple[cfa.CFADetector, TrainedCheckpoint]:
    """The detector of ``category`` and ``seed`` fitted with the shipped descriptor (``retrain``: trained here
    again, the same tensors; ``factor`` 2: the doubling check's run, :data:`DOUBLED`), and its
    :class:`adlib.recipes.checkpoints.TrainedCheckpoint` (record, seconds).

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
    """
    trained = load_or_train(name_of(category, seed, factor), retrain=retrain)
    det = detector(seed, factor)
    det.model, det.history, det.image_shape = trained.model, trained.history, (IMAGE_SIZE, IMAGE_SIZE)
    return det, trained


class ShippedCFADetector(cfa.CFADetector):
    """CFA with its default schedule (until a held-out loss is flat) that loads chapter 7's shipped descriptor where
    that was trained with these settings on these very frozen features: a SynthTex category of the book profile
    (its 60 training images at 128 px), a seed of :data:`SEEDS` and the settings of :func:`detector`. That gives the
    training's result minutes sooner. Anywhere else it trains as :class:`adlib.methods.cfa.CFADetector`.
    ``shipped`` is the loaded :class:`adlib.recipes.checkpoints.TrainedCheckpoint` (its record and training seconds),
    None when trained here.

    Used by: ``adlib.methods.catalog.METHODS``.
    """

    shipped: TrainedCheckpoint | None = None

    def train_model(self, features: torch.Tensor) -> list[dict[str, float]]:
        name = self.shipped_name(features)
        self.shipped = None if name is None else load_or_train(name)
        if self.shipped is None:
            return super().train_model(features)
        self.model = self.shipped.model.to(self.device)
        return self.shipped.history

    def shipped_name(self, features: torch.Tensor) -> str | None:
        """The registry name of the shipped descriptor trained with these settings on these frozen patch features
        (N, C, h, w), or None. The memory bank is built from the features before training and never changes, so
        the bank this detector would build identifies them (equal to the shipped one to its fp16 rounding; another
        CPU model may round a few entries the other way, hence the tolerance)."""
        untrained = ("sigma", "device", "batch_size")  # post-processing and inference batching only
        settings = {k: v for k, v in self.hparams().items() if k not in untrained}
        if self.seed not in SEEDS or settings != {k: v for k, v in detector(self.seed).hparams().items()
                                                  if k not in untrained}:
            return None
        fit_part, _ = cfa.held_out_split(len(features))
        bank = self._new_model(features.shape[1]).init_bank(features[fit_part], self.seed).bank.cpu()
        for category in synthtex.CATEGORIES:
            shipped = registry.load_weights(name_of(category, self.seed))["bank"]
            if shipped.shape == bank.shape and torch.allclose(shipped, bank, rtol=1e-2, atol=1e-3):
                return name_of(category, self.seed)
        return None


def recipe_of(category: str, seed: int, factor: int = 1) -> CheckpointRecipe:
    """The :class:`CheckpointRecipe` of one descriptor (its card: ``CFA_SYNTHTEX.md``), shipped in fp16.

    Used by: ``adlib.recipes.cfa_synthtex``.
    """
    length = "" if factor == 1 else f", {factor} x the cap of epochs"
    summary = f"CFA descriptor, SynthTex {category}, seed {seed}, {IMAGE_SIZE} px, {BACKBONE} {LAYERS}{length}"
    return CheckpointRecipe(name_of(category, seed, factor), summary, "CFA_SYNTHTEX.md",
                            lambda s: setup(category, s, factor), seed=seed, half=True)


for _c in synthtex.CATEGORIES:
    for _s in SEEDS:
        CHECKPOINT_RECIPES[name_of(_c, _s)] = recipe_of(_c, _s)
for _c, _seeds in DOUBLED.items():
    for _s in _seeds:
        CHECKPOINT_RECIPES[name_of(_c, _s, 2)] = recipe_of(_c, _s, 2)
