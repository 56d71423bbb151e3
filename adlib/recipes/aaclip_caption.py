"""Chapter 10's converged AA-CLIP adapters: the book profile's trainings on the caption world, run offline.

The official schedule is 5 epochs of stage 1 at batch 16 and 20 of stage 2 at batch 2 on VisA's 2,162 training
images: 680 and 21,620 optimiser steps (:func:`official_steps`). On the caption world's 320 training images that is
136 epochs of stage 2, ten minutes or more of one CPU thread per training, and the chapter uses ten such trainings
and 18 few-shot ones; so they are trained here (``python -m adlib train-checkpoint NAME``, names from
:func:`name_of`), each for at least the official steps and then on until its loss is flat by the book's rule
(:func:`adlib.methods.cfa.is_flat`), at most :data:`MAX_SHARE` times the official steps, and shipped with their
training records. The chapter loads them, else trains them.

Stage 2 keeps the official batch of 2 and learning rate of 5e-4. Stage 1 keeps the values of earlier versions of
chapter 10, a batch of 64 at 1e-2 with four cached augmented views (the official 1e-5 at batch 16 was not tried on
the tiny CLIP). Card: ``AACLIP_CAPTION.md``.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

import adlib
from adlib.data import captionworld
from adlib.data.imageset import ImageSet
from adlib.features import clip
from adlib.methods.aaclip import adapters, scoring, training
from adlib.methods.base import PatchScores, ZeroShotDetector
from adlib.methods.cfa import is_flat
from adlib.recipes.checkpoints import CHECKPOINT_RECIPES, CheckpointRecipe, TrainedCheckpoint, Training, load_or_train

#: The book profile's setting (chapter 10): ten training objects with the four seen defects, (normal, per defect)
#: images per object, the data seed, the adapters' placement in the tiny CLIP.
N_POOL, DATA_SEED = (16, 4), 0
ADAPT = dict(text_adapt_until=1, image_adapt_until=1, levels=(1, 2, 3))
#: Stage 1 (the book's values) and stage 2 (the official values); :data:`JOINT`: the one-stage row, each side at its
#: stage's learning rate, stage 2's batches.
STAGE1 = dict(lr=1e-2, batch_size=64, cached_views=4)
STAGE2 = dict(lr=5e-4, batch_size=2)
JOINT = dict(lr=STAGE2["lr"], text_lr=STAGE1["lr"], batch_size=STAGE2["batch_size"])
#: Training seeds of the full-pool rows, shots per object of the k-shot rows (three seeds each).
SEEDS, SHOTS = (0, 1, 2), (2, 4, 8)
#: The images of VisA's training metadata (full shot) and its number of categories (k-shot: k + k per category).
VISA_IMAGES, VISA_CATEGORIES = 2162, 12
#: A training stops at the latest after this many times the official steps (its record then says whether it is flat).
MAX_SHARE = 1.5
#: The doubling check's trainings (``-x2``, ``-x4``): the joint runs that reached :data:`MAX_SHARE` unconverged,
#: trained again for :data:`FACTORS` times that length with no stop on the way (the first half of each is the
#: next shorter run, step for step).
DOUBLED, FACTORS = {"joint": (0, 1)}, (2, 4)
#: variant -> its stage: stage 1 on the full pool; stage 2 after it; stage 2 on plain CLIP's anchors; the one-stage
#: alternative; stage 1 with the image-level loss of the paper's text (seed 0 only).
VARIANTS = {"text": "stage 1", "image": "stage 2", "alone": "stage 2", "joint": "stage 2", "text-imageloss": "stage 1"}


def official_steps(stage: str, shots: int | None = None) -> int:
    """The official schedule of ``stage`` in optimiser steps: 5 epochs of batch 16 (stage 1) or 20 of batch 2
    (stage 2) on VisA's full training metadata, or on ``shots`` normal and anomalous images of each of its 12
    categories.

    Used by: ``adlib.recipes.aaclip_caption.setup``.
    """
    n = VISA_IMAGES if shots is None else 2 * shots * VISA_CATEGORIES
    epochs, batch = (5, 16) if stage == "stage 1" else (20, 2)
    return epochs * math.ceil(n / batch)


@lru_cache(maxsize=len(SHOTS) * len(SEEDS) + 1)
def training_set(shots: int | None = None, seed: int = 0) -> ImageSet:
    """Chapter 10's training pool (:data:`N_POOL` images of each of ``captionworld.TRAIN_OBJECTS``, the four seen
    defects, data seed :data:`DATA_SEED`), or its k-shot subset of ``seed`` (``training.few_shot_indices``).

    Used by: ``adlib.recipes.aaclip_caption.setup``.
    """
    pool = captionworld.labelled_set(captionworld.TRAIN_OBJECTS, *N_POOL, DATA_SEED,
                                     defects=captionworld.SEEN_DEFECTS)
    return pool if shots is None else pool[training.few_shot_indices(pool, shots, seed=seed)]


class StageModules(nn.Module):
    """What a checkpoint of one stage ships: the modules that stage trains (``parts``: attribute names of the
    :class:`adlib.methods.aaclip.adapters.AACLIP`), sharing their tensors with ``aaclip``, which is kept as a plain
    attribute so that the frozen CLIP is not part of the state.

    Used by: ``adlib.recipes.aaclip_caption.setup``.
    """

    def __init__(self, aaclip: adapters.AACLIP, parts: tuple[str, ...]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({p: getattr(aaclip, p) for p in parts})
        self.__dict__["aaclip"] = aaclip  # not a submodule: its frozen CLIP does not ship


TEXT_PARTS, IMAGE_PARTS = ("text_adapters", "text_proj"), ("image_adapters", "seg_proj", "det_proj")


def name_of(variant: str, seed: int, shots: int | None = None, factor: int = 1) -> str:
    """The registry name ``aaclip-caption-<variant>[-k<shots>]-s<seed>[-x<factor>]``.

    Used by: ``adlib.recipes.aaclip_caption``.
    """
    return (f"aaclip-caption-{variant}{'' if shots is None else f'-k{shots}'}-s{seed}"
            + ("" if factor == 1 else f"-x{factor}"))


def setup(variant: str, seed: int, shots: int | None = None, factor: int = 1) -> Training:
    """The :class:`adlib.recipes.checkpoints.Training` of one variant (:data:`VARIANTS`) with ``seed``: a fresh
    AA-CLIP seeded by ``seed``; a stage 2 after stage 1 starts from the shipped stage 1 of the same seed (and
    shots). At least the official steps, then until :func:`adlib.methods.cfa.is_flat`, at most :data:`MAX_SHARE`
    times the official steps; ``factor`` > 1 (the doubling check): ``factor`` times that most, without the stop.

    Used by: ``adlib.recipes.aaclip_caption.recipe_of``.
    """
    stage = VARIANTS[variant]
    train = training_set(shots, seed)
    if variant == "image":  # stage 2 continues the shipped stage 1 of this seed
        model = load_or_train(name_of("text", seed, shots)).model.aaclip
    else:
        # A fresh CLIP each time, built after seeding: building one draws from the generator before the adapters'
        # start, as it did in the runs that made the shipped files (a cached CLIP would start them elsewhere).
        adlib.seed_everything(seed)
        model = adapters.AACLIP(clip.load_tiny_clip(None), **ADAPT)
    if stage == "stage 1":
        t = training.text_adapter_training(model, train, **STAGE1, image_loss=variant == "text-imageloss",
                                           seed=seed)
        parts = TEXT_PARTS
    elif variant == "joint":
        t = training.joint_adapter_training(model, train, **JOINT, seed=seed)
        parts = TEXT_PARTS + IMAGE_PARTS
    else:
        t = training.image_adapter_training(model, train, **STAGE2, adapted_anchors=variant != "alone", seed=seed)
        parts = IMAGE_PARTS
    official = official_steps(stage, shots)
    per_epoch = len(t.loader)
    return Training(StageModules(model, parts), t.step, t.loader, t.state,
                    epochs=factor * math.ceil(MAX_SHARE * official / per_epoch), official_steps=official,
                    config=t.config | {"variant": variant, "shots": shots} | ({"factor": factor} if factor > 1 else {}),
                    until=None if factor > 1 else (lambda h: is_flat(h, per_epoch, official)))


def recipe_of(variant: str, seed: int, shots: int | None = None, factor: int = 1) -> CheckpointRecipe:
    """The :class:`adlib.recipes.checkpoints.CheckpointRecipe` of one training (card ``AACLIP_CAPTION.md``).

    Used by: ``adlib.recipes.aaclip_caption``.
    """
    pool = "full pool" if shots is None else f"{shots} shots per object"
    length = "" if factor == 1 else f", {factor} x the longest run"
    summary = f"AA-CLIP {VARIANTS[variant]} ({variant}), caption world, {pool}, seed {seed}{length}"
    return CheckpointRecipe(name_of(variant, seed, shots, factor), summary, "AACLIP_CAPTION.md",
                            lambda s: setup(variant, s, shots, factor), seed=seed)


def trained_aaclip(variant: str, seed: int, shots: int | None = None, retrain: bool = False, factor: int = 1
                   ) -> tuple[adapters.AACLIP, list[TrainedCheckpoint]]:
    """A trained AA-CLIP of the book profile and the trainings it rests on: ``variant`` "both" (stage 1, then
    stage 2), "alone" (stage 2 on plain anchors), "joint" (one stage) or "text-imageloss" (stage 1 alone, with the
    image-level loss); ``shots``: the k-shot pool; ``factor`` 2 or 4: the doubling check's trainings
    (:data:`DOUBLED`).
    Loaded from the shipped checkpoints (``retrain``: trained here again, which gives the same tensors).

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    names = {"both": ("text", "image")}.get(variant, (variant,))
    trained = [load_or_train(name_of(n, seed, shots, factor), retrain=retrain) for n in names]
    # a retrained stage 2 builds on the shipped stage 1, so the last training's model holds both stages
    return trained[-1].model.aaclip, trained


class AACLIPDetector(ZeroShotDetector):
    """Chapter 10's AA-CLIP, zero-shot on whatever object ``object_name`` names: the shipped adapters of training
    seed ``seed`` (:func:`trained_aaclip`: both stages, adapted on the caption world's ten training objects
    with four defect types), over the shipped tiny CLIP. ``fit`` learns nothing from the normal images (they are not
    used, as in the paper's zero-shot setting); ``predict`` gives the official maps (logit differences blurred by one
    patch) and the fused image score, normalised with the ranges of the training objects' normal images. The book's
    post-processing then blurs the maps by ``sigma`` pixels, as every detector's.

    Used by: ``adlib.methods.catalog.METHODS``.
    """

    method = "aaclip"

    def __init__(self, object_name: str = "object", seed: int = 0, sigma: float = 4.0, device: str = "cpu",
                 batch_size: int = 32):
        super().__init__(object_name, sigma=sigma, device=device, seed=seed, batch_size=batch_size)
        self.aaclip = trained_aaclip("both", seed)[0].to(device)  # not self.model: nothing to save
        self.scorer = scoring.fused_scorer(self.aaclip, 2, training_set())

    def score_images(self, images: torch.Tensor) -> PatchScores:
        image_scores, maps = self.scorer(images, self.object_name)
        return PatchScores(maps, image_scores)  # maps at image size already: the shared post-processing only blurs


for _s in SEEDS:
    for _v in ("text", "image", "alone", "joint"):
        CHECKPOINT_RECIPES[name_of(_v, _s)] = recipe_of(_v, _s)
    for _k in SHOTS:
        for _v in ("text", "image"):
            CHECKPOINT_RECIPES[name_of(_v, _s, _k)] = recipe_of(_v, _s, _k)
CHECKPOINT_RECIPES[name_of("text-imageloss", 0)] = recipe_of("text-imageloss", 0)
for _v, _seeds in DOUBLED.items():
    for _s in _seeds:
        for _f in FACTORS:
            CHECKPOINT_RECIPES[name_of(_v, _s, factor=_f)] = recipe_of(_v, _s, factor=_f)
