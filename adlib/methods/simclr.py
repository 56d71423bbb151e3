"""Self-supervised representations and one-class heads on them.

SimCLR (Chen et al., 2020): the NT-Xent loss, the augmentation pipeline, a projection head, a small
encoder and linear evaluation. Defined in: "SimCLR: contrastive representations"
(``notebooks/04_simclr.ipynb``).

SSL-OCC (Sohn et al., 2021): rotation prediction, contrastive learning with distribution augmentation,
and shallow one-class heads (OC-SVM, KDE, Gaussian) on L2-normalised frozen features. Defined in:
"SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlib.training.loop import StepFn, batch_images, model_device


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent loss of SimCLR: two views ``z1``, ``z2`` (n, d) of the same n images -> scalar.

    Each of the 2n embeddings has one positive (the other view of its image) and 2n - 2 negatives
    (every other embedding in the batch); similarities are cosines divided by ``temperature``. The loss
    is the mean over all 2n anchors of the cross-entropy of picking the positive.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must both be (n, d) with the same shape; got {tuple(z1.shape)} and {tuple(z2.shape)}."
        )
    if len(z1) < 2:
        raise ValueError("NT-Xent needs at least 2 images per batch (otherwise there is no negative).")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    # an embedding is never its own negative
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, positive)


def cross_view_nce(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """The SSL-OCC official code's contrastive loss: views ``z1`` (anchors) against ``z2``, (n, d) each -> scalar.

    One direction only: anchor ``z1[i]`` must pick its partner ``z2[i]`` among the n second views, so it has
    n - 1 negatives (NT-Xent: both directions, 2n - 2 negatives each). Cosines divided by ``temperature``;
    the mean cross-entropy over the n anchors.

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    if z1.ndim != 2 or z1.shape != z2.shape or len(z1) < 2:
        raise ValueError(f"z1 and z2 must both be (n, d), n >= 2, with one shape; got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    sim = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T / temperature
    return F.cross_entropy(sim, torch.arange(len(z1), device=z1.device))


CONTRASTIVE_LOSSES = {"nt_xent": nt_xent, "cross_view": cross_view_nce}


def simclr_augmentation(
    size: int, s: float = 1.0, min_scale: float = 0.08, blur: bool = True, crop: bool = True, colour: bool = True
) -> Callable[[Tensor], Tensor]:
    """SimCLR's random view of an image: float (3, H, W) or (N, 3, H, W) in [0, 1] -> (3 or N, 3, size, size).

    As the paper (appendix A): random resized crop (area ``min_scale``-1 of the image, aspect 3/4-4/3)
    resized to ``size``, horizontal flip (p 0.5), colour jitter of strength ``s`` (brightness, contrast,
    saturation 0.8 s, hue 0.2 s, in a random order per batch) applied with p 0.8, grayscale (p 0.2) and Gaussian
    blur (kernel about 10% of ``size``, sigma 0.1-2) with p 0.5. ``blur=False`` drops the blur, as the
    paper does for CIFAR-10. Every image of a batch gets its own random parameters. For the paper's
    composition study (its Fig. 5), ``crop=False`` replaces crop and flip by a plain resize and
    ``colour=False`` drops colour jitter and grayscale.

    The operations are torchvision's (``transforms.v2``) drawn with the same distributions, but computed
    for the whole batch at once: per image, v2 costs about 2-20 ms on a busy CPU, more than the training
    step of a small CNN. Two approximations: the crop is resampled bilinearly without antialiasing, and
    hue is shifted by a rotation of the chroma plane (YIQ) instead of in HSV.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    if size < 2:
        raise ValueError(f"size must be >= 2 pixels, got {size!r}.")
    if s < 0:
        raise ValueError(f"colour-jitter strength s must be >= 0, got {s!r}.")
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale!r}.")
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, ~10% of the side

    def augment(x: Tensor) -> Tensor:
        single = x.ndim == 3
        if single:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"Expected a float image (3, H, W) or batch (N, 3, H, W) in [0, 1]; got {x.dtype} {tuple(x.shape)}."
            )
        if crop:
            out = _resized_crop_flip(x, size, min_scale)
        elif x.shape[-2:] == (size, size):
            out = x
        else:
            out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if colour:
            out = _colour_jitter(out, s, p=0.8)
            out = random_grayscale(out, p=0.2)
        if blur:
            out = _gaussian_blur(out, kernel, p=0.5)
        return out[0] if single else out

    return augment


def random_uniform(n: int, low: float, high: float, device: torch.device) -> Tensor:
    """(n,) draws from U(low, high): one random parameter per image of a batch.

    Used by: ``adlib.methods.simclr``, ``adlib.methods.ssl_occ``.
    """
    return torch.empty(n, device=device).uniform_(low, high)


def _resized_crop_flip(x: Tensor, size: int, min_scale: float) -> Tensor:
    """v2.RandomResizedCrop (10 tries, else the whole image) + v2.RandomHorizontalFlip, as one affine warp."""
    n, dev = len(x), x.device
    area = torch.empty(n, 10, device=dev).uniform_(min_scale, 1.0)
    ratio = torch.exp(torch.empty(n, 10, device=dev).uniform_(np.log(3 / 4), np.log(4 / 3)))
    ratio = ratio * x.shape[2] / x.shape[3]  # the aspect ratio is in pixels; w and h are fractions of the sides
    w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    ok = (w <= 1) & (h <= 1)
    first, found = ok.float().argmax(dim=1, keepdim=True), ok.any(dim=1)
    w = torch.where(found, w.gather(1, first)[:, 0], 1.0)
    h = torch.where(found, h.gather(1, first)[:, 0], 1.0)
    cx = (torch.rand(n, device=dev) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates
    cy = (torch.rand(n, device=dev) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grey_level(x: Tensor) -> Tensor:
    """The luma (ITU-R 601) of a batch (N, 3, H, W) -> (N, 1, H, W).

    Used by: ``adlib.methods.simclr``, ``adlib.methods.ssl_occ``.
    """
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def rotate_hue(x: Tensor, angle: Tensor) -> Tensor:
    """A batch (N, 3, H, W) with its chroma (the I, Q plane of YIQ) rotated by ``angle`` (N,) radians per image.

    Used by: ``adlib.methods.simclr``, ``adlib.methods.ssl_occ``.
    """
    n = len(x)
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device)
    yiq = torch.einsum("ij,njhw->nihw", rgb2yiq, x)
    c, si = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], c * i - si * q, si * i + c * q], dim=1)
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(rgb2yiq), yiq)


def _colour_jitter(x: Tensor, s: float, p: float) -> Tensor:
    """v2.ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) on a random subset (p) of the batch, ops in a random order."""
    n, dev = len(x), x.device
    apply = (torch.rand(n, device=dev) < p).view(n, 1, 1, 1)
    y = x
    for op in torch.randperm(4).tolist():
        if op == 0:  # brightness
            y = y * random_uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, dev).view(n, 1, 1, 1)
        elif op == 1:  # contrast: blend with the mean grey level
            f = random_uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, dev).view(n, 1, 1, 1)
            y = f * y + (1 - f) * grey_level(y).mean(dim=(2, 3), keepdim=True)
        elif op == 2:  # saturation: blend with the grey image
            f = random_uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, dev).view(n, 1, 1, 1)
            y = f * y + (1 - f) * grey_level(y)
        else:  # hue: rotate the chroma (I, Q) plane by 2 pi h
            y = rotate_hue(y, 2 * np.pi * random_uniform(n, -min(0.5, 0.2 * s), min(0.5, 0.2 * s), dev))
        y = y.clamp(0, 1)
    return torch.where(apply, y, x)


def random_grayscale(x: Tensor, p: float) -> Tensor:
    """v2.RandomGrayscale(p) on a batch (N, 3, H, W): each image grey with probability p.

    Used by: ``adlib.methods.simclr``, ``adlib.methods.ssl_occ``.
    """
    apply = (torch.rand(len(x), device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(apply, grey_level(x).expand_as(x), x)


def _gaussian_blur(x: Tensor, kernel: int, p: float) -> Tensor:
    """v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2))], p): separable, reflect padding."""
    n, c, hgt, wid = x.shape
    apply = (torch.rand(n, device=x.device) < p).view(n, 1, 1, 1)
    sigma = random_uniform(n, 0.1, 2.0, x.device)
    t = torch.arange(kernel, device=x.device, dtype=x.dtype) - kernel // 2
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n * c, kernel)
    y = F.pad(x.reshape(1, n * c, hgt, wid), (kernel // 2,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return torch.where(apply, y.reshape(n, c, hgt, wid), x)


class ConvEncoder(nn.Module):
    """A small CNN for small images: (N, 3, S, S) -> (N, ``feature_dim``) after global average pooling.

    Four 3x3 conv-BN-ReLU blocks (the last three with stride 2), widths w, 2w, 4w, 4w; quick enough to
    train on two CPU cores in a minute.

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for i in range(4):
            blocks += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
        self.body = nn.Sequential(*blocks)
        self.feature_dim = chans[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))


class ProjectionHead(nn.Module):
    """SimCLR's projection head g: (N, in_dim) -> (N, out_dim), Linear-ReLU-Linear (paper: out_dim 128).

    The loss is computed on g's output, but the representation kept for downstream tasks is its input.

    Used by: ``adlib.recipes.simclr_digits.setup``.
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128) -> None:
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


def digit_images(x: np.ndarray, size: int = 32, colour_seed: int | None = None) -> Tensor:
    """sklearn digits (n, 64) in [0, 1] -> (n, 3, size, size) float images (bilinear upscaling, grey as RGB).

    With ``colour_seed``, every digit is painted instead: a random bright stroke colour (uniform in RGB,
    scaled so its largest channel is 1) on a random dark background (each channel uniform in [0, 0.3]),
    drawn per image from ``numpy.random.default_rng(colour_seed)``. Colour then carries no information about
    the class but tells images apart: the shortcut that SimCLR's colour distortion removes.

    Used by: ``adlib.recipes.simclr_digits.coloured_digits``.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != 64:
        raise ValueError(f"Expected digits as (n, 64) rows (8x8 images flattened), got shape {x.shape}.")
    img = torch.from_numpy(x).reshape(-1, 1, 8, 8)
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    if colour_seed is None:
        return img.expand(-1, 3, -1, -1).contiguous()
    rng = np.random.default_rng(colour_seed)
    stroke = rng.random((len(x), 3, 1, 1), dtype=np.float32)
    stroke = torch.from_numpy(stroke / stroke.max(axis=1, keepdims=True))
    ground = torch.from_numpy(0.3 * rng.random((len(x), 3, 1, 1), dtype=np.float32))
    return stroke * img + ground * (1 - img)


@torch.no_grad()
def extract_features(encoder: nn.Module, images: Tensor, batch_size: int = 512) -> np.ndarray:
    """Frozen features of ``images`` (N, 3, S, S) -> (N, d) float32 array, in eval mode.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    was_training = encoder.training
    encoder.eval()
    device = model_device(encoder)
    feats = [encoder(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    encoder.train(was_training)
    return torch.cat(feats).numpy().astype(np.float32)


def linear_predict(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    C: float = 1.0,
) -> np.ndarray:
    """Linear evaluation's predicted test labels (n_test,): a logistic regression on frozen features.

    Features (n, d) are standardised with the training set's statistics; ``C`` is the inverse L2
    strength. The paper trains the linear layer by SGD on ImageNet; on small data an exact convex
    solver is the same model without a learning-rate schedule to tune.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(train_features) != len(train_labels):
        raise ValueError("The training features need one label per row; the lengths differ.")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    clf.fit(np.asarray(train_features), np.asarray(train_labels))
    return clf.predict(np.asarray(test_features))


def simclr_step(
    encoder: nn.Module,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    augment: Callable[[Tensor], Tensor],
    temperature: float = 0.5,
    distribution_augmentation: bool = False,
    loss: str = "nt_xent",
    augment2: Callable[[Tensor], Tensor] | None = None,
) -> StepFn:
    """A step function for :func:`adlib.training.loop.fit`: one NT-Xent step on two augmented views of a batch.

    Returns ``step(batch) -> {"loss": float}``; batches hold (N, 3, S, S) images in [0, 1].
    ``distribution_augmentation=True`` is SSL-OCC's contrastive + DA: each image is first rotated by a
    random multiple of 90 degrees, so the model sees the training set enlarged by its rotations and the
    rotated copies are *different instances* (negatives of each other), not views of one. The official
    code rotates the data set offline (4x larger); drawing one rotation per image and step samples the
    same enlarged set. ``loss``: ``"nt_xent"`` (SimCLR, symmetric) or ``"cross_view"`` (:func:`cross_view_nce`,
    SSL-OCC's official one-directional loss). ``augment2``: the second view's own augmentation (the paper's
    composition study distorts one branch only); None: both views use ``augment``.

    Used by: ``adlib.recipes.simclr_digits.setup``.
    """
    if loss not in CONTRASTIVE_LOSSES:
        raise ValueError(f"loss must be one of {sorted(CONTRASTIVE_LOSSES)}, got {loss!r}.")
    loss_fn = CONTRASTIVE_LOSSES[loss]
    device = model_device(encoder)

    def step(batch: Any) -> dict[str, float]:
        x = batch_images(batch)
        if distribution_augmentation:
            x = rotate(x, torch.randint(0, 4, (len(x),)))
        view1, view2 = augment(x).to(device), (augment2 or augment)(x).to(device)
        encoder.train()
        head.train()
        z = head(encoder(torch.cat([view1, view2])))
        value = loss_fn(z[: len(x)], z[len(x) :], temperature)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        return {"loss": value.item()}

    return step


# SSL-OCC, from "SSL-OCC: self-supervised one-class classification" (notebooks/05_ssl_occ.ipynb).


def rotate(x: Tensor, k: Tensor) -> Tensor:
    """Rotate each image of ``x`` (N, C, H, W) by ``k[i]`` x 90 degrees counter-clockwise; H must equal W.

    Used by: ``adlib.methods.simclr.simclr_step``, ``adlib.methods.ssl_occ.rotation_step``.
    """
    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(f"Expected square images (N, C, S, S), got shape {tuple(x.shape)}.")
    k = torch.as_tensor(k).reshape(-1)
    if len(k) != len(x):
        raise ValueError(f"Need one rotation per image: {len(k)} rotations for {len(x)} images.")
    out = x.clone()
    for r in range(1, 4):
        idx = (k % 4 == r).nonzero().reshape(-1)
        out[idx] = torch.rot90(x[idx], r, dims=(2, 3))
    return out
