"""The variational autoencoder (Kingma and Welling 2014) on the DCGAN backbone: its likelihoods, loss and step."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adlib.methods.dcgan import DCGANDecoder, DCGANEncoder, check_images, dcgan_init
from adlib.training.loop import StepFn, batch_images, model_device


class ConvVAE(nn.Module):
    """Variational autoencoder on the same backbone: x (N, C, S, S) -> (recon, mu, logvar).

    ``recon`` is (N, C, S, S) in [0, 1]; ``mu`` and ``logvar`` are (N, latent_dim). In ``train()`` mode the
    decoder sees a sample ``z = mu + exp(logvar / 2) * eps`` (reparameterisation); in ``eval()`` mode it
    decodes ``z = mu``, so anomaly scores are deterministic.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 64, latent_dim: int = 64, base_channels: int = 32):
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.encoder = DCGANEncoder(in_channels, image_size, 2 * latent_dim, base_channels)
        self.decoder = DCGANDecoder(in_channels, image_size, latent_dim, base_channels)
        self.apply(dcgan_init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_images(x, self.in_channels, self.image_size)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        return self.decoder(z), mu, logvar


LIKELIHOODS = ("gaussian", "bernoulli")


def reconstruction_nll(x: torch.Tensor, recon: torch.Tensor, likelihood: str = "gaussian") -> torch.Tensor:
    """Minus the log-likelihood of images under the decoder's output, up to a constant: (N, C, H, W) x2 -> (N,).

    ``"gaussian"``: ``sum_i (x_i - recon_i)^2``, which is ``-log N(x; recon, sigma^2 I)`` with ``sigma^2 = 1/2``
    up to a constant (for another ``sigma^2``, the KL weight ``beta = 2 sigma^2`` gives the same optimum).
    ``"bernoulli"``: ``sum_i BCE(recon_i, x_i)``, pixels as probabilities of "ink"; for grey levels in [0, 1]
    it is the cross-entropy, minimised by ``recon = x``.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    if x.shape != recon.shape:
        raise ValueError(f"x {tuple(x.shape)} and recon {tuple(recon.shape)} must have the same shape.")
    if likelihood == "gaussian":
        return (recon - x).pow(2).flatten(1).sum(1)
    if likelihood == "bernoulli":
        return F.binary_cross_entropy(recon, x, reduction="none").flatten(1).sum(1)
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}.")


def kl_per_image(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL divergence of the encoder's Gaussian from the prior, in nats: (N, d) x2 -> (N,),
    ``sum_j -0.5 (1 + logvar_j - mu_j^2 - exp(logvar_j))``. Near 0 for every image: the code carries nothing.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1)


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    """How many code dimensions the encoder uses: those whose mean ``mu`` (N, d) varies across the N images with a
    variance above ``threshold`` (Burda et al. 2016's measure of a collapsed code; 0 = a constant code).

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    return int((mu.var(dim=0) > threshold).sum())


def vae_loss(
    x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float = 1.0,
    likelihood: str = "gaussian",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Negative ELBO of a VAE: returns ``(total, recon_term, kl_term)``, scalars.

    Convention: each term is summed over a sample's elements and averaged over the batch.
    ``recon_term = mean_n reconstruction_nll(x, recon, likelihood)`` (by default the sum of squared errors, a
    Gaussian decoder with sigma^2 = 1/2); ``kl_term = mean_n KL(N(mu, exp(logvar)) || N(0, I))
    = mean_n sum_j -0.5 (1 + logvar - mu^2 - exp(logvar))``; ``total = recon_term + beta * kl_term``.
    ``x``, ``recon``: (N, C, H, W); ``mu``, ``logvar``: (N, latent_dim).

    Used by: ``adlib.methods.vae.vae_step``.
    """
    if x.shape != recon.shape or mu.shape != logvar.shape:
        raise ValueError(
            f"Shapes must match: x {tuple(x.shape)} vs recon {tuple(recon.shape)}, "
            f"mu {tuple(mu.shape)} vs logvar {tuple(logvar.shape)}."
        )
    recon_term = reconstruction_nll(x, recon, likelihood).mean()
    kl_term = kl_per_image(mu, logvar).mean()
    return recon_term + beta * kl_term, recon_term, kl_term


def vae_step(model: ConvVAE, optimizer: torch.optim.Optimizer, *, beta: float = 1.0,
             likelihood: str = "gaussian") -> StepFn:
    """A step function for :func:`adlib.training.loop.fit`: one optimisation step of :func:`vae_loss`.

    Returns ``step(batch) -> {"loss", "recon", "kl"}`` (floats).

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    device = model_device(model)

    def step(batch: Any) -> dict[str, float]:
        x = batch_images(batch).to(device)
        model.train()
        total, recon_term, kl_term = vae_loss(x, *model(x), beta=beta, likelihood=likelihood)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return {"loss": total.item(), "recon": recon_term.item(), "kl": kl_term.item()}

    return step
