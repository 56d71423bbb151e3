"""SimCLR encoders on coloured digits, trained offline to convergence and shipped (``adlib/weights/SIMCLR_DIGITS.md``).

Each recipe trains a :class:`adlib.methods.simclr.ConvEncoder` and its projection head with NT-Xent on the training
split of :func:`coloured_digits`, under one augmentation policy of :data:`POLICIES` and one seed. The chapter loads
them with ``checkpoints.load_or_train("simclr-digits-<policy>-s<seed>")``.

Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from adlib.methods import simclr
from adlib.recipes import checkpoints
from adlib.training.loop import RandomSteps

IMAGE_SIZE = 16  # the 8x8 digits upscaled twice
WIDTH = 16  # ConvEncoder width: 4 x 16 = 64 features
BATCH_SIZE = 128
TEMPERATURE = 0.5
JITTER = 0.5  # colour-jitter strength s: the paper's CIFAR-10 setting (ImageNet: 1.0)
LR = 1e-3
STEPS_PER_EPOCH = 25  # one record row (and one checkpoint) per 25 steps
EPOCHS = 120  # 3,000 steps
#: The paper's default schedule for its studies: 100 epochs of ImageNet's 1,281,167 images at batch 4,096.
OFFICIAL_STEPS = 100 * 1_281_167 // 4096

#: The augmentation policies: (first view, second view) options of :func:`adlib.methods.simclr.simclr_augmentation`.
#: Every view is cropped and resized first, as in the paper's composition study (its Fig. 5); "colour" distorts the
#: colour of the second branch only, the paper's protocol for one transformation.
POLICIES: dict[str, tuple[dict, dict]] = {
    "crop-colour": ({}, {}),
    "crop50-colour": ({"min_scale": 0.5}, {"min_scale": 0.5}),
    "colour": ({"colour": False}, {}),
    "crop": ({"colour": False}, {"colour": False}),
}


def coloured_digits(seed: int = 0) -> tuple[Tensor, Tensor, np.ndarray, np.ndarray]:
    """scikit-learn's digits, split 75/25 (stratified, ``seed``) and painted (:func:`simclr.digit_images`):
    training images (1347, 3, 16, 16), test images (450, 3, 16, 16), training and test labels.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.data / 16.0, digits.target, test_size=0.25,
                                              stratify=digits.target, random_state=seed)
    return (simclr.digit_images(x_tr, IMAGE_SIZE, colour_seed=seed),
            simclr.digit_images(x_te, IMAGE_SIZE, colour_seed=seed + 1), y_tr, y_te)


def augmentations(policy: str) -> tuple:
    """The two views' augmentations of ``policy`` (blur off, as the paper for small images; jitter s = 0.5).

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    first, second = POLICIES[policy]
    return tuple(simclr.simclr_augmentation(IMAGE_SIZE, s=JITTER, blur=False, **o) for o in (first, second))


def setup(policy: str, seed: int) -> checkpoints.Training:
    """A fresh encoder + head (``nn.Sequential``: [0] the encoder f, [1] the head g) and its NT-Xent training.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    images = coloured_digits()[0]
    torch.manual_seed(seed)
    encoder = simclr.ConvEncoder(width=WIDTH)
    model = nn.Sequential(encoder, simclr.ProjectionHead(encoder.feature_dim))
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-6)
    view1, view2 = augmentations(policy)
    inner = simclr.simclr_step(model[0], model[1], opt, view1, temperature=TEMPERATURE, augment2=view2)
    loader = RandomSteps(STEPS_PER_EPOCH, seed)

    def step(generator: torch.Generator) -> dict[str, float]:
        return inner(images[torch.randperm(len(images), generator=generator)[:BATCH_SIZE]])

    return checkpoints.Training(model, step, loader, {"model": model, "opt": opt}, epochs=EPOCHS,
                                official_steps=OFFICIAL_STEPS, config={"policy": policy, "jitter": JITTER})


def name(policy: str, seed: int) -> str:
    """The registry name of a policy's run with ``seed``.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    return f"simclr-digits-{policy}-s{seed}"


#: The shipped runs: three seeds of every policy, so that every decisive comparison has intervals over seeds.
RUNS = [(p, s) for p in ("crop-colour", "colour", "crop50-colour", "crop") for s in range(3)]

for _policy, _seed in RUNS:
    checkpoints.CHECKPOINT_RECIPES[name(_policy, _seed)] = checkpoints.CheckpointRecipe(
        name(_policy, _seed), f"SimCLR ConvEncoder on coloured digits, policy {_policy}, seed {_seed}",
        "SIMCLR_DIGITS.md", lambda seed, p=_policy: setup(p, seed), seed=_seed, half=True)
