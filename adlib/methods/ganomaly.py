"""GANomaly (Akçay et al., ACCV 2018): encoder-decoder-encoder generator, discriminator, losses and score."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adlib.methods.dcgan import DCGANDecoder, DCGANEncoder, check_images, dcgan_init
from adlib.training.loop import StepFn, batch_images, model_device


class GanomalyGenerator(nn.Module):
    """GANomaly generator, encoder1 -> decoder -> encoder2: x (N, C, S, S) -> (x_hat, z, z_hat).

    ``x_hat`` (N, C, S, S) in [0, 1] is the reconstruction, ``z = encoder1(x)`` and
    ``z_hat = encoder2(x_hat)`` are (N, latent_dim). Defaults are the official code's (``nz=100``,
    ``ngf=64``, ``isize=32``); the two encoders have the same architecture but separate weights.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, latent_dim: int = 100, base_channels: int = 64):
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.encoder1 = DCGANEncoder(in_channels, image_size, latent_dim, base_channels)
        self.decoder = DCGANDecoder(in_channels, image_size, latent_dim, base_channels)
        self.encoder2 = DCGANEncoder(in_channels, image_size, latent_dim, base_channels)
        self.apply(dcgan_init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_images(x, self.in_channels, self.image_size)
        z = self.encoder1(x)
        x_hat = self.decoder(z)
        return x_hat, z, self.encoder2(x_hat)


class GanomalyDiscriminator(nn.Module):
    """DCGAN discriminator: x (N, C, S, S) -> (logit (N,), features (N, C', 4, 4)).

    As in the official ``NetD``: an encoder with a 1-dimensional head; ``features`` is the output of the
    layer before the head (used by the adversarial feature-matching loss). It returns a logit, not a
    probability, so the BCE is computed stably with :func:`torch.nn.functional.binary_cross_entropy_with_logits`.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, base_channels: int = 64):
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.encoder = DCGANEncoder(in_channels, image_size, 1, base_channels)
        self.apply(dcgan_init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(x, self.in_channels, self.image_size)
        features = self.encoder.features(x)
        return self.encoder.head(features).flatten(), features


def ganomaly_generator_loss(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    z: torch.Tensor,
    z_hat: torch.Tensor,
    feat_real: torch.Tensor,
    feat_fake: torch.Tensor,
    *,
    w_adv: float = 1.0,
    w_con: float = 50.0,
    w_enc: float = 1.0,
) -> dict[str, torch.Tensor]:
    """GANomaly generator loss ``w_adv * adv + w_con * con + w_enc * enc``: a dict of scalars.

    As the official ``backward_g``: ``adv = mean((feat_real - feat_fake)^2)``, feature matching between the
    discriminator features of each real image and of its reconstruction (all elements averaged, pairs
    matched by index); ``con = mean|x - x_hat|`` (L1); ``enc = mean((z - z_hat)^2)``.
    ``x``, ``x_hat``: (N, C, H, W); ``z``, ``z_hat``: (N, d); ``feat_*``: (N, C', h, w).
    Returns ``{"total", "adv", "con", "enc"}``.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    adv = (feat_real - feat_fake).pow(2).mean()
    con = (x - x_hat).abs().mean()
    enc = (z - z_hat).pow(2).mean()
    return {"total": w_adv * adv + w_con * con + w_enc * enc, "adv": adv, "con": con, "enc": enc}


def ganomaly_discriminator_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> dict[str, torch.Tensor]:
    """GANomaly discriminator loss: ``total = (BCE(real, 1) + BCE(fake, 0)) / 2``, a dict of scalars.

    As the official ``backward_d`` (BCE on real images labelled 1 and reconstructions labelled 0, averaged),
    computed from logits. ``logit_*``: (N,). Returns ``{"total", "real", "fake"}``. The official
    re-initialisation of D when ``total < 1e-5`` happens in :func:`ganomaly_step`, after D's update.

    Used by: ``adlib.methods.ganomaly.ganomaly_step``.
    """
    real = F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
    fake = F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
    return {"total": 0.5 * (real + fake), "real": real, "fake": fake}


def ganomaly_optimizers(
    generator: nn.Module, discriminator: nn.Module, *, lr: float = 2e-4, beta1: float = 0.5, beta2: float = 0.999
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for the generator and for the discriminator, the official defaults: returns ``(opt_g, opt_d)``.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    return (
        torch.optim.Adam(generator.parameters(), lr=lr, betas=(beta1, beta2)),
        torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(beta1, beta2)),
    )


def ganomaly_step(
    generator: GanomalyGenerator,
    discriminator: GanomalyDiscriminator,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    *,
    w_adv: float = 1.0,
    w_con: float = 50.0,
    w_enc: float = 1.0,
    d_reinit_below: float = 1e-5,
) -> StepFn:
    """A step function for :func:`adlib.training.loop.fit`: one GANomaly step, in the official code's order.

    Per batch: forward G; update G with :func:`ganomaly_generator_loss`; update D with
    :func:`ganomaly_discriminator_loss` on the real batch and the detached reconstructions; then, if D's
    loss fell below ``d_reinit_below`` (D has won outright and gives G no signal), re-initialise D's
    weights with :func:`dcgan_init` (its optimiser state is kept, as in the official ``reinit_d``).
    Returns ``step(batch) -> {"loss_g", "adv", "con", "enc", "loss_d", "d_reinit"}`` (floats; the
    epoch mean of ``d_reinit`` is the fraction of steps that re-initialised D).

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    device = model_device(generator)

    def step(batch: Any) -> dict[str, float]:
        x = batch_images(batch).to(device)
        generator.train()
        discriminator.train()
        x_hat, z, z_hat = generator(x)
        logit_real, feat_real = discriminator(x)
        logit_fake, _ = discriminator(x_hat.detach())

        _, feat_fake = discriminator(x_hat)  # with gradients into G, for feature matching
        g = ganomaly_generator_loss(x, x_hat, z, z_hat, feat_real.detach(), feat_fake,
                                    w_adv=w_adv, w_con=w_con, w_enc=w_enc)
        opt_g.zero_grad(set_to_none=True)
        g["total"].backward()
        opt_g.step()

        # D's graph does not involve G's update, so D learns from the same forward pass, as officially.
        d = ganomaly_discriminator_loss(logit_real, logit_fake)
        opt_d.zero_grad(set_to_none=True)
        d["total"].backward()
        opt_d.step()
        reinit = d["total"].item() < d_reinit_below
        if reinit:
            discriminator.apply(dcgan_init)
        return {
            "loss_g": g["total"].item(),
            "adv": g["adv"].item(),
            "con": g["con"].item(),
            "enc": g["enc"].item(),
            "loss_d": d["total"].item(),
            "d_reinit": float(reinit),
        }

    return step


def ganomaly_score(z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """GANomaly anomaly score: mean squared distance between the two latent codes, (N, d) x2 -> (N,).

    As the official ``test()``: ``mean_j (z_j - z_hat_j)^2``. Codes of shape (N, d, 1, 1) are flattened
    first. Unlike the official code, no min-max scaling over the test set: that would use test
    statistics, and ranking metrics do not need it.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    if z.shape != z_hat.shape:
        raise ValueError(f"z and z_hat must have the same shape, got {tuple(z.shape)} and {tuple(z_hat.shape)}.")
    return (z - z_hat).pow(2).flatten(1).mean(dim=1)
