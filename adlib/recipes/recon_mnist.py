"""Chapter 3's converged models: GANomaly, both VAEs and the AE on the GANomaly paper's MNIST protocol.

One digit is the anomaly, the nine others are normal (Akçay et al. 2018, Sec. 4.1). The data are the 5,000 real MNIST
digits of :func:`adlib.data.oneclass.mnist_sample` at 32 px, the model the official DCGAN depth at 32 px (three
stride-2 stages, 32 -> 16 -> 8 -> 4) at a reduced width (:data:`WIDTH` channels instead of 64), trained with the
paper's Adam (lr 2e-4, beta1 0.5, batch 64) and losses (w_adv 1, w_con 50, w_enc 1, nz 100). Every model is a
:class:`adlib.recipes.checkpoints.CheckpointRecipe` named ``mnist-<kind>-a<digit>``,
trained with ``python -m adlib train-checkpoint NAME``; its held-out loss is measured on a tenth of the normal
training images, never on test images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from adlib.data import oneclass
from adlib.methods import autoencoder, ganomaly, vae
from adlib.recipes.checkpoints import CHECKPOINT_RECIPES, CheckpointRecipe, Training

#: Channels of the first convolution (the official ngf = ndf = 64): the shipped models are 32 times narrower, so that
#: forty of them fit the chapter's size budget (the 4x4 convolutions to and from the code of 100 dominate the size).
WIDTH = 2
LATENT, BATCH, IMAGE_SIZE = 100, 64, 32  # the paper's nz, batch size and MNIST image size
GAN_LR, BETA1 = 2e-4, 0.5  # the paper's Adam
#: Adam's learning rate for the AE and the VAEs (the paper gives none for its VAE baseline; the chapter's earlier
#: choice, by the training loss: 1e-3 left the first AE run still falling 7 % per fifth after 30 epochs).
RECON_LR = 3e-3
#: The kinds of model, each trained for GANomaly's official number of generator steps (:func:`official_steps`): the
#: paper's schedule for GANomaly, the same optimiser budget for the baselines (the paper gives none for them).
KINDS = ("ae", "vae-gauss", "vae-bern", "ganomaly")
#: The likelihood each VAE is trained and scored with (the AE and GANomaly's residual: squared error).
LIKELIHOOD = {"ae": "gaussian", "vae-gauss": "gaussian", "vae-bern": "bernoulli", "ganomaly": "gaussian"}
#: Training images per digit in MNIST's official training set: the official schedule is 15 epochs of the nine
#: normal digits at batch 64 with the last partial batch dropped (samet-akcay/ganomaly: options.py niter 15,
#: batchsize 64; lib/data.py drop_last), i.e. 15 * floor((60,000 - n_anomaly) / 64) generator steps.
MNIST_TRAIN = {0: 5923, 1: 6742, 2: 5958, 3: 6131, 4: 5842, 5: 5421, 6: 5918, 7: 6265, 8: 5851, 9: 5949}

#: GANomaly's extra training seeds (the paper reports three), on digits fixed before any result was seen: the first
#: three.
EXTRA_SEEDS, SEEDED_DIGITS = (1, 2), (0, 1, 2)
#: The book's doubling check (``mnist-<kind>-a<digit>-x2``): every seed-0 model trained again for twice the epochs with
#: the same seed, so the first half of each run is the shipped model's run. Chapter 3's claims compare GANomaly with
#: each baseline, and most of their models' held-out losses still fall at the official schedule.
DOUBLING = 2
#: The official width, trained once (``mnist-ganomaly-a0-w64``, the first digit) to measure what the narrow width costs;
#: not shipped: its file would be larger than the chapter set's budget.
FULL_WIDTH = 64


def official_steps(anomaly: int) -> int:
    """GANomaly's official MNIST schedule for anomalous digit ``anomaly``, in generator steps.

    Used by: ``adlib.recipes.recon_mnist.setup``.
    """
    return 15 * ((60_000 - MNIST_TRAIN[anomaly]) // BATCH)


def epochs(anomaly: int) -> int:
    """Epochs of our sample that reach :func:`official_steps` (an epoch is one pass over the ~2,000 normal training
    images of :func:`digit_task`, 31 steps of 64 with the last partial batch dropped).

    Used by: ``adlib.recipes.recon_mnist.setup``.
    """
    return math.ceil(official_steps(anomaly) / (len(digit_task(anomaly).x_train) // BATCH))


@dataclass(frozen=True)
class DigitTask:
    """One anomalous digit's data: ``x_train`` and ``x_val`` (normal images (n, 1, 32, 32); ``x_val`` a held-out
    tenth), ``x_test`` (n, 1, 32, 32), ``y_test`` (1 = anomaly) and ``classes_test`` (the digit of each image).

    Used by: ``adlib.recipes.recon_mnist.digit_task``.
    """

    x_train: np.ndarray
    x_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes_test: np.ndarray


@lru_cache(maxsize=10)  # every recipe of a digit reads the same arrays; nothing writes to them
def digit_task(anomaly: int) -> DigitTask:
    """The data of anomalous digit ``anomaly`` (the split is seeded with 0 whatever the training seed).

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    split = oneclass.one_class_digits([c for c in range(10) if c != anomaly], dataset="mnist", seed=0)
    as_images = lambda x: x.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)  # noqa: E731
    x = as_images(split.x_train)
    held_out = np.random.default_rng(0).permutation(len(x))[: len(x) // 10]
    return DigitTask(np.delete(x, held_out, axis=0), x[held_out], as_images(split.x_test), split.y_test,
                     split.classes_test)


#: The GANomaly terms whose epoch means :class:`GanomalyRun` keeps (the registry keeps only the loss per epoch).
CURVES = ("loss_d", "adv", "con", "enc")


class GanomalyRun(torch.nn.Module):
    """A GANomaly training as one shippable module: the generator ``gen``, the discriminator ``disc`` and the epoch
    means of :data:`CURVES` (``curves`` (epochs, 4), a buffer, so the shipped file keeps how the game went).

    Used by: ``adlib.recipes.recon_mnist.build_model``.
    """

    def __init__(self, epochs: int, width: int = WIDTH) -> None:
        super().__init__()
        self.gen = ganomaly.GanomalyGenerator(1, IMAGE_SIZE, LATENT, width)
        self.disc = ganomaly.GanomalyDiscriminator(1, IMAGE_SIZE, width)
        self.register_buffer("curves", torch.zeros(epochs, len(CURVES)))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gen(x)

    def log(self, losses: dict[str, float], steps_per_epoch: int) -> None:
        """Add one step's terms to the mean of its epoch."""
        epoch = int(self.steps_done) // steps_per_epoch
        self.curves[epoch] += torch.tensor([losses[k] for k in CURVES]) / steps_per_epoch
        self.steps_done += 1


def build_model(kind: str, epochs: int, width: int = WIDTH) -> torch.nn.Module:
    """An untrained model of ``kind`` (one of :data:`KINDS`) for 1 x 32 x 32 digits (GANomaly's records the epoch
    means of ``epochs`` epochs).

    Used by: ``adlib.recipes.recon_mnist.setup``.
    """
    if kind == "ae":
        return autoencoder.ConvAutoencoder(1, IMAGE_SIZE, LATENT, width)
    if kind.startswith("vae"):
        return vae.ConvVAE(1, IMAGE_SIZE, LATENT, width)
    return GanomalyRun(epochs, width)


@torch.no_grad()
def held_out_loss(kind: str, model: torch.nn.Module, x: torch.Tensor) -> float:
    """The loss a run is judged by on held-out normal images x (N, 1, 32, 32), in eval mode: the AE's and VAEs'
    minus log-likelihood per image (at z = mu), GANomaly's ``w_con * con + w_enc * enc`` (its generator loss without
    the adversarial term, which depends on the moving discriminator).

    Used by: ``adlib.recipes.recon_mnist.setup``.
    """
    was_training = model.training
    model.eval()
    if kind == "ganomaly":
        x_hat, z, z_hat = model(x)
        # no discriminator features: x stands in for both, and w_adv 0 drops the term
        value = ganomaly.ganomaly_generator_loss(x, x_hat, z, z_hat, x, x, w_adv=0.0)["total"]
    else:
        out = model(x)
        recon = out if kind == "ae" else out[0]
        value = vae.reconstruction_nll(x, recon, LIKELIHOOD[kind]).mean()
    model.train(was_training)
    return float(value)


def setup(kind: str, anomaly: int, seed: int, width: int = WIDTH, factor: int = 1) -> Training:
    """The :class:`Training` of one model: ``kind`` on the nine digits other than ``anomaly``, seeded by ``seed``, for
    ``factor`` times :func:`epochs`.

    Used by: ``adlib.recipes.recon_mnist.recipe_of``.
    """
    task = digit_task(anomaly)
    torch.manual_seed(seed)
    n_epochs = factor * epochs(anomaly)
    model = build_model(kind, n_epochs, width)
    x_val = torch.from_numpy(task.x_val)
    loader = DataLoader(TensorDataset(torch.from_numpy(task.x_train)), batch_size=BATCH, shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(seed))
    if kind == "ganomaly":
        opt_g, opt_d = ganomaly.ganomaly_optimizers(model.gen, model.disc, lr=GAN_LR, beta1=BETA1)
        inner = ganomaly.ganomaly_step(model.gen, model.disc, opt_g, opt_d)
        state: dict[str, Any] = {"model": model, "opt_g": opt_g, "opt_d": opt_d}
        loss_key = "loss_g"
    else:
        opt = torch.optim.Adam(model.parameters(), lr=RECON_LR)
        inner = (autoencoder.ae_step(model, opt) if kind == "ae"
                 else vae.vae_step(model, opt, likelihood=LIKELIHOOD[kind]))
        state, loss_key = {"model": model, "opt": opt}, "loss"
    done = {"steps": 0}

    def step(batch: Any) -> dict[str, float]:
        out = inner(batch)
        out["loss"] = out[loss_key]
        if kind == "ganomaly":
            model.log(out, len(loader))
        done["steps"] += 1
        if done["steps"] % len(loader) == 0:  # the last step of an epoch
            out["held_out"] = held_out_loss(kind, model, x_val)
        return out

    return Training(model, step, loader, state, epochs=n_epochs,
                    official_steps=official_steps(anomaly) if kind == "ganomaly" else None,
                    config={"kind": kind, "anomaly": anomaly, "width": width})


def name_of(kind: str, anomaly: int, seed: int = 0, factor: int = 1, width: int = WIDTH) -> str:
    """The registry name of a model: ``mnist-<kind>-a<anomaly>``, plus ``-s<seed>`` for a seed other than 0,
    ``-x<factor>`` for a run of ``factor`` times the epochs and ``-w<width>`` for a width other than :data:`WIDTH`.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    return (f"mnist-{kind}-a{anomaly}" + (f"-s{seed}" if seed else "") + (f"-x{factor}" if factor != 1 else "")
            + (f"-w{width}" if width != WIDTH else ""))


def recipe_of(kind: str, anomaly: int, seed: int = 0, factor: int = 1, width: int = WIDTH) -> CheckpointRecipe:
    """The :class:`CheckpointRecipe` of one model (its card: ``RECON_MNIST.md``), ``factor`` times the epochs.

    Used by: ``adlib.recipes.recon_mnist``.
    """
    summary = f"{kind} on MNIST, digit {anomaly} anomalous, seed {seed}, width {width}" + (
        f", {factor} times the epochs" if factor != 1 else "")
    return CheckpointRecipe(name_of(kind, anomaly, seed, factor, width), summary, "RECON_MNIST.md",
                            lambda s: setup(kind, anomaly, s, width, factor), seed, half=True)


for _a in range(10):
    for _kind in KINDS:
        CHECKPOINT_RECIPES[name_of(_kind, _a)] = recipe_of(_kind, _a)
        CHECKPOINT_RECIPES[name_of(_kind, _a, factor=DOUBLING)] = recipe_of(_kind, _a, factor=DOUBLING)
for _a in SEEDED_DIGITS:
    for _s in EXTRA_SEEDS:
        CHECKPOINT_RECIPES[name_of("ganomaly", _a, _s)] = recipe_of("ganomaly", _a, _s)
CHECKPOINT_RECIPES[name_of("ganomaly", 0, width=FULL_WIDTH)] = recipe_of("ganomaly", 0, width=FULL_WIDTH)
