"""Reconstruction models: a convolutional autoencoder, a VAE and GANomaly, with their losses and scores.

All three share one DCGAN backbone: an encoder of stride-2 ``4x4`` convolutions (BatchNorm, LeakyReLU 0.2)
that halves the image down to ``4x4`` and maps it to a latent vector, and a mirror-image decoder of
transposed convolutions. Images are floats in ``[0, 1]``, so decoders end in a sigmoid. (The official
GANomaly code normalises images to ``[-1, 1]`` and ends in ``tanh``; the two differ only by an affine
rescaling of the pixels.)

Training goes through :func:`adlib.training.loop.fit`, which calls one of the step functions below once per batch:
:func:`ae_step`, :func:`vae_step` or :func:`ganomaly_step`.

Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adlib.core.runtime import preserved_random_state
from adlib.methods.base import PatchScores, TrainedDetector
from adlib.methods.dcgan import DCGANDecoder, DCGANEncoder, check_images, dcgan_init
from adlib.methods.vae import ConvVAE, vae_step
from adlib.training.loop import StepFn, batch_images, fit, model_device


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder: (N, C, S, S) in [0, 1] -> reconstruction (N, C, S, S) in [0, 1].

    ``image_size`` S is a power of two >= 8 (8 for 8x8 digits with ``in_channels=1``; 32, 64, 128, ...).

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 64, latent_dim: int = 64, base_channels: int = 32):
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.encoder = DCGANEncoder(in_channels, image_size, latent_dim, base_channels)
        self.decoder = DCGANDecoder(in_channels, image_size, latent_dim, base_channels)
        self.apply(dcgan_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_channels, self.image_size)
        return self.decoder(self.encoder(x))


def ae_step(model: ConvAutoencoder, optimizer: torch.optim.Optimizer) -> StepFn:
    """A step function for :func:`adlib.training.loop.fit`: one optimisation step of the mean squared error.

    Returns ``step(batch) -> {"loss": float}``; batches hold (N, C, S, S) images in [0, 1].

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    device = model_device(model)

    def step(batch: Any) -> dict[str, float]:
        x = batch_images(batch).to(device)
        model.train()
        loss = F.mse_loss(model(x), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    return step


def residual_map(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-pixel anomaly map: squared error averaged over channels, (N, C, H, W) x2 -> (N, H, W).

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    if x.shape != recon.shape or x.ndim != 4:
        raise ValueError(f"x and recon must both be (N, C, H, W); got {tuple(x.shape)} and {tuple(recon.shape)}.")
    return (x - recon).pow(2).mean(dim=1)


def image_score_from_map(amap: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Image score from an anomaly map, (N, H, W) -> (N,).

    ``"mean"`` (default) is the image's mean squared reconstruction error, the quantity the AE was trained
    to make small on normal images; ``"max"`` reacts to a single bad pixel, better for small defects but
    noisier.

    Used by: ``adlib.methods.autoencoder.AutoencoderDetector``.
    """
    if amap.ndim != 3:
        raise ValueError(f"amap must be (N, H, W), got shape {tuple(amap.shape)}.")
    if reduction == "mean":
        return amap.mean(dim=(1, 2))
    if reduction == "max":
        return amap.amax(dim=(1, 2))
    raise ValueError(f"reduction must be 'mean' or 'max', got {reduction!r}.")


class AutoencoderDetector(TrainedDetector):
    """An autoencoder (``kind="ae"``) or a VAE (``kind="vae"``) behind the detector protocol: trained on the
    normal images with :func:`adlib.training.loop.fit`; the map is the residual (:func:`residual_map`), blurred like
    every map, and the image score the mean residual (:func:`image_score_from_map`).

    Images must be square with a power-of-two side (the DCGAN encoder halves it down to 4 px). Defaults are the
    texture settings of the reconstruction chapter's book profile (8 base channels, latent 100 as GANomaly's nz,
    Adam lr 3e-3, 50 epochs of batches of 16); no backbone is used.

    Used by: ``adlib.methods.catalog.METHODS``.
    """

    method = "ae"

    def __init__(self, kind: str = "ae", latent_dim: int = 100, base_channels: int = 8, epochs: int = 50,
                 lr: float = 3e-3, train_batch_size: int = 16, beta: float = 1.0, sigma: float = 4.0,
                 device: str = "cpu", seed: int = 0, batch_size: int = 32):
        if kind not in ("ae", "vae"):
            raise ValueError(f"kind must be 'ae' or 'vae', got {kind!r}.")
        super().__init__(None, sigma=sigma, device=device, seed=seed, batch_size=batch_size)
        self.kind, self.latent_dim, self.base_channels, self.epochs = kind, latent_dim, base_channels, epochs
        self.lr, self.train_batch_size, self.beta = lr, train_batch_size, beta
        self.model: nn.Module | None = None

    def hparams(self) -> dict:
        return super().hparams() | {"kind": self.kind, "latent_dim": self.latent_dim,
                                    "base_channels": self.base_channels, "epochs": self.epochs, "lr": self.lr,
                                    "train_batch_size": self.train_batch_size, "beta": self.beta}

    def _new_model(self, image_size: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            cls = ConvAutoencoder if self.kind == "ae" else ConvVAE
            return cls(3, image_size, self.latent_dim, self.base_channels).to(self.device)

    def train_model(self, images: torch.Tensor) -> list[dict[str, float]]:
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"the autoencoder needs square images, got {tuple(images.shape[-2:])}.")
        self.model = self._new_model(images.shape[-1])
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        step = ae_step(self.model, opt) if self.kind == "ae" else vae_step(self.model, opt, beta=self.beta)
        loader = DataLoader(TensorDataset(images), batch_size=self.train_batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(self.seed))
        # fit seeds the global generators with the detector's seed; the caller's random state is given back
        with preserved_random_state():
            return fit(step, loader, epochs=self.epochs, seed=self.seed, progress=False)

    def score_inputs(self, images: torch.Tensor) -> PatchScores:
        out = torch.cat([self._reconstruct(batch) for batch in torch.split(images, self.batch_size)])
        amap = residual_map(images, out)
        return PatchScores(amap, image_score_from_map(amap))

    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out if self.kind == "ae" else out[0]

    def rebuild_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        return self._new_model(self.image_shape[-1])
