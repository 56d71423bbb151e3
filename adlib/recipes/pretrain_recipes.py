"""The pretraining recipes by name, light enough for ``python -m adlib pretrain --help`` (no torch):
:mod:`adlib.recipes.pretrain` runs them.

Used by: ``adlib.recipes.pretrain.train``, ``python -m adlib pretrain``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """One pretraining run. ``arch``: timm name; ``stages``: the trunk stages (a ViT: blocks) trained and shipped.

    Used by: ``adlib.recipes.pretrain.train``, ``adlib.recipes.pretrain.validation_model``.
    """

    kind: str  # one of KINDS
    arch: str = "resnet18"
    stages: int = 2
    patch_size: int = 8  # ViTs only
    optimizer: str = "sgd"  # "sgd" (Nesterov, wd 5e-4) or "adamw" (wd 0.05, as ViTs are usually trained)
    steps: int = 1500
    batch_size: int = 64
    crop: int = 32
    n_classes: int = 256
    per_class: int = 32
    lr: float = 0.05
    temperature: float = 0.2
    seed: int = 0
    threads: int = 1


KINDS = ("fractal", "simclr", "fractal_simclr", "random")
# The candidates compared in MODEL_CARD.md; "fractal" is the shipped book-resnet18, "fractal_vit" book-vit-tiny.
RECIPES = {"fractal": Recipe("fractal", steps=3000, n_classes=256, per_class=16, lr=0.1),
           "fractal_vit": Recipe("fractal", arch="vit_tiny_patch16_224", stages=4, crop=64, steps=3000,
                                 n_classes=256, per_class=16, lr=1e-3, optimizer="adamw"),
           "simclr": Recipe("simclr", steps=600),
           "fractal_simclr": Recipe("fractal_simclr", steps=600, per_class=16),
           "random": Recipe("random", steps=0)}
