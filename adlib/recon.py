"""Reconstruction models: a convolutional autoencoder, a VAE and GANomaly, with their losses and scores.

All three share one DCGAN backbone: an encoder of stride-2 ``4x4`` convolutions (BatchNorm, LeakyReLU 0.2)
that halves the image down to ``4x4`` and maps it to a latent vector, and a mirror-image decoder of
transposed convolutions. Images are floats in ``[0, 1]``, so decoders end in a sigmoid. (The official
GANomaly code normalises images to ``[-1, 1]`` and ends in ``tanh``; the two differ only by an affine
rescaling of the pixels.)

Training goes through :func:`adlib.train.fit`, which calls one of the step functions below once per batch:
:func:`ae_step`, :func:`vae_step` or :func:`ganomaly_step`.

Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adlib.arrays import as_images
from adlib.detectors import FeatureDetector
from adlib.train import batch_images, fit, model_device

StepFn = Callable[[Any], dict[str, float]]


def _n_stages(image_size: int) -> int:
    """Number of stride-2 stages that take ``image_size`` down to ``4x4``."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(
            f"image_size must be a power of two >= 8 (8, 16, 32, 64, 128, ...), got {image_size!r}; "
            "resize the images, e.g. with torchvision.transforms.Resize."
        )
    return int(math.log2(image_size)) - 2


def _check_images(x: torch.Tensor, in_channels: int, image_size: int) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != (in_channels, image_size, image_size):
        raise ValueError(
            f"Expected images of shape (N, {in_channels}, {image_size}, {image_size}), got {tuple(x.shape)}; "
            "resize the images or build the model with matching in_channels and image_size."
        )


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation, as the official GANomaly ``weights_init``: use ``model.apply(dcgan_init)``.

    (Transposed) convolution weights ~ N(0, 0.02) and biases 0; BatchNorm weights ~ N(1, 0.02), biases 0.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGANEncoder(nn.Module):
    """(N, C, S, S) images -> (N, latent_dim) codes; ``features`` gives the last (N, C', 4, 4) feature map.

    ``C' = base_channels * 2 ** (log2(S) - 3)``. The first convolution has no BatchNorm (DCGAN).

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """

    def __init__(self, in_channels: int, image_size: int, latent_dim: int, base_channels: int) -> None:
        super().__init__()
        n = _n_stages(image_size)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2),
        ]
        ch = base_channels
        for _ in range(n - 1):
            layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * ch), nn.LeakyReLU(0.2)]
            ch *= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(ch, latent_dim, 4, 1, 0, bias=False)  # 4x4 -> 1x1
        self.out_channels = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).flatten(1)


class DCGANDecoder(nn.Module):
    """(N, latent_dim) codes -> (N, C, S, S) images in [0, 1] (sigmoid output).

    Unlike DCGAN, the last layer has a bias: with a sigmoid on [0, 1] data (rather than tanh on [-1, 1]),
    the output needs its own offset, or dark images stay stuck near 0.5 early in training.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """

    def __init__(self, out_channels: int, image_size: int, latent_dim: int, base_channels: int) -> None:
        super().__init__()
        n = _n_stages(image_size)
        ch = base_channels * 2 ** (n - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, ch, 4, 1, 0, bias=False),  # 1x1 -> 4x4
            nn.BatchNorm2d(ch),
            nn.ReLU(),
        ]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU()]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, out_channels, 4, 2, 1, bias=True), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


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
        _check_images(x, self.in_channels, self.image_size)
        return self.decoder(self.encoder(x))


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
        _check_images(x, self.in_channels, self.image_size)
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

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    if x.shape != recon.shape or mu.shape != logvar.shape:
        raise ValueError(
            f"Shapes must match: x {tuple(x.shape)} vs recon {tuple(recon.shape)}, "
            f"mu {tuple(mu.shape)} vs logvar {tuple(logvar.shape)}."
        )
    recon_term = reconstruction_nll(x, recon, likelihood).mean()
    kl_term = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean()
    return recon_term + beta * kl_term, recon_term, kl_term


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
        _check_images(x, self.in_channels, self.image_size)
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
        _check_images(x, self.in_channels, self.image_size)
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

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
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


def ae_step(model: ConvAutoencoder, optimizer: torch.optim.Optimizer) -> StepFn:
    """A step function for :func:`adlib.train.fit`: one optimisation step of the mean squared error.

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


def vae_step(model: ConvVAE, optimizer: torch.optim.Optimizer, *, beta: float = 1.0,
             likelihood: str = "gaussian") -> StepFn:
    """A step function for :func:`adlib.train.fit`: one optimisation step of :func:`vae_loss`.

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
    """A step function for :func:`adlib.train.fit`: one GANomaly step, in the official code's order.

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

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    if amap.ndim != 3:
        raise ValueError(f"amap must be (N, H, W), got shape {tuple(amap.shape)}.")
    if reduction == "mean":
        return amap.mean(dim=(1, 2))
    if reduction == "max":
        return amap.amax(dim=(1, 2))
    raise ValueError(f"reduction must be 'mean' or 'max', got {reduction!r}.")


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


class AutoencoderDetector(FeatureDetector):
    """An autoencoder (``kind="ae"``) or a VAE (``kind="vae"``) behind the detector protocol: trained on the
    normal images with :func:`adlib.train.fit`; the map is the residual (:func:`residual_map`), blurred like
    every map, and the image score the mean residual (:func:`image_score_from_map`).

    Images must be square with a power-of-two side (the DCGAN encoder halves it down to 4 px). Defaults are the
    texture settings of the reconstruction chapter's book profile (8 base channels, latent 100 as GANomaly's nz,
    Adam lr 3e-3, 50 epochs of batches of 16); no backbone is used.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """

    summary = "autoencoder / VAE (kind=vae) trained on the normal images; residual map, mean residual score"
    method = "ae"

    def __init__(self, kind: str = "ae", latent_dim: int = 100, base_channels: int = 8, epochs: int = 50,
                 lr: float = 3e-3, train_batch_size: int = 16, beta: float = 1.0, sigma: float = 4.0,
                 device: str = "cpu", seed: int = 0, batch_size: int = 32):
        if kind not in ("ae", "vae"):
            raise ValueError(f"kind must be 'ae' or 'vae', got {kind!r}.")
        super().__init__(None, None, 1, sigma, device, seed, batch_size)
        self.kind, self.latent_dim, self.base_channels, self.epochs = kind, latent_dim, base_channels, epochs
        self.lr, self.train_batch_size, self.beta = lr, train_batch_size, beta
        self.model: nn.Module | None = None

    def features(self, images: Any) -> torch.Tensor:
        """The autoencoder sees the images themselves, on ``device``."""
        return as_images(images).to(self.device)

    def _new_model(self, image_size: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            cls = ConvAutoencoder if self.kind == "ae" else ConvVAE
            return cls(3, image_size, self.latent_dim, self.base_channels).to(self.device)

    def fit_features(self, images: torch.Tensor) -> None:
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"the autoencoder needs square images, got {tuple(images.shape[-2:])}.")
        self.model = self._new_model(images.shape[-1])
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        step = ae_step(self.model, opt) if self.kind == "ae" else vae_step(self.model, opt, beta=self.beta)
        loader = DataLoader(TensorDataset(images), batch_size=self.train_batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(self.seed))
        with torch.enable_grad():
            self.history = fit(step, loader, epochs=self.epochs, seed=self.seed, progress=False)
        self.model.eval()

    def score_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.cat([self._reconstruct(batch) for batch in torch.split(images, self.batch_size)])
        amap = residual_map(images, out)
        return amap, image_score_from_map(amap)

    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out if self.kind == "ae" else out[0]

    def build_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        return self._new_model(self.image_shape[-1])
