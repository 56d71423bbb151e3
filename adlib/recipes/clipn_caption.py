"""Chapter 9's converged "no" encoders: the claims' protocol (without privileges) trained offline for the official
number of optimiser steps.

The official run (``run.sh`` of the CLIPN code) takes 10 epochs of CC3M's 2,891,445 pairs at a global batch of
2,048: 14,120 steps (:data:`OFFICIAL_STEPS`), with AdamW and a cosine schedule to zero over all of them. On one CPU
thread that is about ten minutes per training at the book's batch of 128, more than chapter 9's three minutes for its
three seeds, so each seed's encoder is trained here (``python -m adlib train-checkpoint clipn-caption-s<seed>``) and
shipped with its training record. A cosine schedule flattens any loss at its end, so the book's convergence rule
cannot pass these runs on their loss; only the doubling check can: ``setup(seed, factor=2)`` trains twice the steps
with its own cosine schedule, shipped as ``clipn-caption-s<seed>-x2`` (every factor of :data:`FACTORS`). Card:
``CLIPN_CAPTION.md``.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import open_clip
import torch

from adlib.data import captionworld
from adlib.features import clip
from adlib.methods import clipn
from adlib.methods.base import PatchScores, ZeroShotDetector
from adlib.recipes.checkpoints import CHECKPOINT_RECIPES, CheckpointRecipe, TrainedCheckpoint, Training, load_or_train
from adlib.training.loop import steps_per_epoch

#: Chapter 9's book-profile setting: its six in-distribution shapes, the caption world's ten held-out objects as
#: distractor concepts, pairs and their seed, batch and learning rate (the official 3e-4 is for a batch of 2,048).
ID_CLASSES = ("circle", "square", "triangle", "star", "cross", "heart")
DISTRACTORS = captionworld.HELD_OUT_OBJECTS
N_PAIRS, PAIR_SEED, BATCH, LR = 3000, 12, 128, 1e-3
OFFICIAL_STEPS = 10 * math.ceil(2_891_445 / (4 * 512))
#: Training seeds, and the lengths shipped, in multiples of :data:`OFFICIAL_STEPS` (2: the doubling check).
SEEDS, FACTORS = (0, 1, 2), (1, 2)


@lru_cache(maxsize=1)
def training_pairs() -> tuple[open_clip.CLIP, torch.Tensor, list[str]]:
    """The shipped tiny CLIP, the unit image embeddings (N, D) of chapter 9's caption-world pairs without
    privileges (pictures of the ID shapes and the distractor objects, backgrounds and digits; no OOD shape) and
    their N captions.

    Used by: ``adlib.recipes.clipn_caption.setup``.
    """
    model = clip.load_tiny_clip(None)
    for p in model.parameters():
        p.requires_grad_(False)
    pairs = captionworld.sample(N_PAIRS, seed=PAIR_SEED, image_size=clip.image_size(model),
                                objects=(*ID_CLASSES, *DISTRACTORS))
    return model, clip.encode_images(model, pairs.images)[0], list(pairs.captions)


def setup(seed: int, factor: int = 1) -> Training:
    """The untrained :class:`adlib.recipes.checkpoints.Training` of one "no" encoder: ``factor`` times the official
    steps with the official optimiser, diagonal positives.

    Used by: ``adlib.recipes.clipn_caption.recipe_of``.
    """
    model, image_emb, captions = training_pairs()
    torch.manual_seed(seed)
    encoder = clipn.NoTextEncoder(model)
    steps = factor * OFFICIAL_STEPS
    per_epoch = steps_per_epoch(steps)
    t = clipn.no_encoder_training(model, encoder, image_emb, captions, steps=steps, steps_per_epoch=per_epoch,
                                  batch_size=BATCH, lr=LR, seed=seed)
    return Training(encoder, t.step, t.loader, t.state, epochs=steps // per_epoch, official_steps=OFFICIAL_STEPS,
                    config=t.config | {"pairs": N_PAIRS, "pair_seed": PAIR_SEED})


def name_of(seed: int, factor: int = 1) -> str:
    """The registry name ``clipn-caption-s<seed>`` (``-x2`` for twice the steps).

    Used by: ``adlib.recipes.clipn_caption``.
    """
    return f"clipn-caption-s{seed}" + ("" if factor == 1 else f"-x{factor}")


def recipe_of(seed: int, factor: int = 1) -> CheckpointRecipe:
    """The :class:`adlib.recipes.checkpoints.CheckpointRecipe` of one encoder (card ``CLIPN_CAPTION.md``).

    Used by: ``adlib.recipes.clipn_caption``.
    """
    summary = f"CLIPN no-encoder, caption world without privileges, {factor} x the official steps, seed {seed}"
    return CheckpointRecipe(name_of(seed, factor), summary, "CLIPN_CAPTION.md", lambda s: setup(s, factor), seed=seed,
                            model=lambda s: clipn.NoTextEncoder(clip.load_tiny_clip(None)))  # no pairs to load it


def trained_no_encoder(seed: int, factor: int = 1, retrain: bool = False) -> TrainedCheckpoint:
    """The shipped "no" encoder of ``seed`` and length ``factor`` with its training record (``retrain``: trained
    here again, the same tensors).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    return load_or_train(name_of(seed, factor), retrain=retrain)


class CLIPNDetector(ZeroShotDetector):
    """Chapter 9's CLIPN asked a defect question: "is this *not* a photo of ``object_name``?". The shipped "no"
    encoder of training seed ``seed`` (:func:`trained_no_encoder`, official steps) over the shipped tiny CLIP, with
    ``object_name`` as the only ID class; the image score is competing-to-win (:func:`adlib.methods.clipn.ctw_score`:
    the class's "no" logit minus its "yes" logit; with one ID class agreeing-to-differ ranks the images the same
    way), the map the same difference for every projected patch token, upsampled bilinearly. ``fit`` learns nothing.
    The encoder was trained on captions that name objects, colours and backgrounds, never a defect.

    Used by: ``adlib.methods.catalog.METHODS``.
    """

    method = "clipn"

    def __init__(self, object_name: str = "object", seed: int = 0, sigma: float = 4.0, device: str = "cpu",
                 batch_size: int = 32):
        super().__init__(object_name, sigma=sigma, device=device, seed=seed, batch_size=batch_size)
        self.clip_model = clip.load_tiny_clip(None).to(device).eval()  # not self.model: nothing to save
        self.no_encoder = trained_no_encoder(seed).model.to(device).eval()

    def score_images(self, images: torch.Tensor) -> PatchScores:
        global_emb, patch_emb = clip.encode_images(self.clip_model, images)
        n, p, d = patch_emb.shape
        tokens = torch.cat([global_emb, patch_emb.view(-1, d)])  # (N + N * P, D): image first, then every patch
        with torch.no_grad():
            yes, no = clipn.yes_no_logits(self.clip_model, self.no_encoder, tokens, [self.object_name])
        scores = clipn.ctw_score(yes, no)
        maps = clip.patch_maps(torch.from_numpy(scores[n:]).view(n, p), tuple(images.shape[-2:]))
        return PatchScores(maps.numpy(), scores[:n].astype(np.float64))


for _s in SEEDS:
    for _f in FACTORS:
        CHECKPOINT_RECIPES[name_of(_s, _f)] = recipe_of(_s, _f)
