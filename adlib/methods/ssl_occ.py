"""SSL-OCC (Sohn et al., ICLR 2021): rotation prediction, and one-class heads on learned features."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlib.methods.classic import Scorer
from adlib.methods.simclr import grey_level, random_grayscale, random_uniform, rotate, rotate_hue
from adlib.training.loop import StepFn, batch_images, model_device


def rotation_step(
    encoder: nn.Module,
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    augment: Callable[[Tensor], Tensor] | None = None,
    independent_views: bool = False,
) -> StepFn:
    """A step function for :func:`adlib.training.loop.fit`: 4-way rotation prediction (0, 90, 180, 270 degrees).

    Every image of the batch (optionally ``augment``-ed first) appears in its four rotations; the
    ``classifier`` (features -> 4 logits) learns which one it sees. ``independent_views``: each of the four
    copies is augmented on its own before its rotation, as the official code's augmentation list
    (``cnr0.5+...,+rotate90,+rotate180,+rotate270``); otherwise one augmented image is rotated four times.
    Returns ``step(batch) -> {"loss": float, "acc": float}``.

    Used by: ``adlib.recipes.ssl_occ_digits.setup``.
    """
    device = model_device(encoder)

    def step(batch: Any) -> dict[str, float]:
        x = batch_images(batch)
        k = torch.arange(4).repeat_interleave(len(x))
        if augment is None:
            x4 = x.repeat(4, 1, 1, 1)
        else:
            x4 = augment(x.repeat(4, 1, 1, 1)) if independent_views else augment(x).repeat(4, 1, 1, 1)
        x4 = rotate(x4, k).to(device)
        k = k.to(device)
        encoder.train()
        classifier.train()
        logits = classifier(encoder(x4))
        loss = F.cross_entropy(logits, k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "acc": (logits.argmax(1) == k).float().mean().item()}

    return step


@torch.no_grad()
def rotation_score(encoder: nn.Module, classifier: nn.Module, images: Tensor, batch_size: int = 512) -> np.ndarray:
    """The rotation classifier's own anomaly score of ``images`` (N, 3, S, S) -> (N,): minus the summed
    log-probability of the true rotation over the four rotations, in eval mode. The official code's
    ``dscore`` is the product of those probabilities (anomaly score one minus it): the same ranking.

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    encoder.eval()
    classifier.eval()
    device = model_device(encoder)
    scores = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        total = torch.zeros(len(x), device=device)
        for r in range(4):
            k = torch.full((len(x),), r)
            total += F.log_softmax(classifier(encoder(rotate(x, k))), dim=1)[:, r]
        scores.append(-total.cpu())
    return torch.cat(scores).numpy().astype(np.float64)


def mlp_head(in_dim: int, dims: Sequence[int], num_class: int = 0) -> nn.Sequential:
    """The official code's projection head (``model/resnet_util.get_head``): (N, in_dim) -> (N, out).

    Every entry of ``dims`` but the last is Linear (no bias)-BatchNorm-ReLU; the last is a linear layer of
    ``dims[-1]`` units (with a bias only when a classifier follows); ``num_class`` > 0 adds a linear classifier
    of that many logits (rotation prediction: ``dims`` eight times 512, ``num_class`` 4; contrastive: eight
    times 512 then 128, no classifier).

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    if not dims:
        raise ValueError("dims needs at least one layer width.")
    layers: list[nn.Module] = []
    width = in_dim
    for d in dims[:-1]:
        layers += [nn.Linear(width, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True)]
        width = d
    layers.append(nn.Linear(width, dims[-1], bias=num_class > 0))
    if num_class > 0:
        layers.append(nn.Linear(dims[-1], num_class))
    return nn.Sequential(*layers)


def official_augmentation(size: int, min_scale: float = 0.5, jitter: float = 0.4, gray: float = 0.2,
                          flip: bool = True) -> Callable[[Tensor], Tensor]:
    """The official ``cnr0.5+hflip+jitter_b0.4_c0.4_s0.4_h0.4+gray0.2+blur0.5`` view of a batch (N, 3, S, S) in
    [0, 1] -> (N, 3, size, size), each image with its own random parameters.

    ``cnr``: a *square* crop whose side is a whole number of pixels drawn uniformly from ``floor(min_scale * S)``
    to ``S``, at a uniform position, resized bilinearly to ``size``; a horizontal flip (p 0.5); colour jitter
    *always* applied, its four operations in a random order (per batch here, per image there): brightness
    *additive* (``x + d``, ``d ~ U(-j, j)``), contrast per channel around the channel's mean (factor
    ``U(1 - j, 1 + j)``), saturation (a blend with the grey image, as torchvision; TF scales S in HSV) and hue
    (a rotation of the chroma plane by ``U(-j, j)`` of a turn, clipped to half a turn), clamped to [0, 1]
    after each; grayscale with p ``gray``. No blur: the official ``RandomBlur`` returns the image unchanged
    when training (``data/augment_ops.py``), so ``blur0.5`` never acts.

    Used by: ``adlib.recipes.ssl_occ_digits.setup``.
    """
    if size < 2 or not 0 < min_scale <= 1 or jitter < 0:
        raise ValueError(f"Need size >= 2, min_scale in (0, 1], jitter >= 0; got {size}, {min_scale}, {jitter}.")

    def augment(x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3] or not x.is_floating_point():
            raise ValueError(f"Expected a float batch (N, 3, S, S) in [0, 1]; got {x.dtype} {tuple(x.shape)}.")
        out = _square_crop(x, size, min_scale, flip)
        out = _additive_jitter(out, jitter)
        return random_grayscale(out, p=gray)

    return augment


def _square_crop(x: Tensor, size: int, min_scale: float, flip: bool) -> Tensor:
    """RandomCropAndResize (integer side, TF's ``random_crop`` offsets) and RandomFlipLeftRight as one warp."""
    n, side, dev = len(x), x.shape[-1], x.device
    low = int(side * min_scale)
    w = torch.randint(low, side + 1, (n,), device=dev).float()
    ox = torch.floor(torch.rand(n, device=dev) * (side - w + 1))
    oy = torch.floor(torch.rand(n, device=dev) * (side - w + 1))
    sign = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=dev)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = sign * w / side, (2 * ox + w) / side - 1
    theta[:, 1, 1], theta[:, 1, 2] = w / side, (2 * oy + w) / side - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    # TF resizes the cropped image, so samples beyond the crop's outer pixel centres take its edge, not a neighbour
    corner = torch.stack([ox, oy], 1)
    low, high = (2 * corner + 1) / side - 1, (2 * corner + 2 * w[:, None] - 1) / side - 1
    grid = torch.minimum(torch.maximum(grid, low[:, None, None]), high[:, None, None])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _additive_jitter(x: Tensor, j: float) -> Tensor:
    """The official ColorJitter(j, j, j, j) on every image: TF's random_brightness/contrast/saturation/hue."""
    n, dev = len(x), x.device
    y = x
    for op in torch.randperm(4).tolist():
        if op == 0:
            y = y + random_uniform(n, -j, j, dev).view(n, 1, 1, 1)
        elif op == 1:
            mean = y.mean(dim=(2, 3), keepdim=True)
            y = (y - mean) * random_uniform(n, 1 - j, 1 + j, dev).view(n, 1, 1, 1) + mean
        elif op == 2:
            f = random_uniform(n, 1 - j, 1 + j, dev).view(n, 1, 1, 1)
            y = f * y + (1 - f) * grey_level(y)
        else:
            y = rotate_hue(y, 2 * np.pi * random_uniform(n, -min(0.5, j), min(0.5, j), dev))
        y = y.clamp(0, 1)
    return y


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows of ``features`` (n, d) scaled to unit length (float64), as SSL-OCC before every head.

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"Expected features as an (n, d) array, got shape {f.shape}.")
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def _paper_gamma(f: np.ndarray) -> float:
    # official code: "10 times larger value of gamma" than sklearn's 'scale' (1 / (var * d))
    return 10.0 / (f.var() * f.shape[1])


def ocsvm_head(features: np.ndarray, nu: float = 0.5, gamma: float | None = None) -> Scorer:
    """OC-SVM (RBF) on L2-normalised features (n, d) -> ``score(x) -> (m,)``, higher = more anomalous.

    As the official code: ``gamma = 10 / (var(f) * d)`` over the normalised training features (ten
    times sklearn's ``"scale"``), sklearn's default ``nu`` 0.5, score = minus ``score_samples``.

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    from sklearn.svm import OneClassSVM

    f = l2_normalize(features)
    svm = OneClassSVM(kernel="rbf", nu=nu, gamma=_paper_gamma(f) if gamma is None else gamma).fit(f)
    return lambda x: -svm.score_samples(l2_normalize(x))


def kde_head(features: np.ndarray, gamma: float | None = None) -> Scorer:
    """Gaussian KDE on L2-normalised features (n, d) -> ``score(x) -> (m,)``, higher = more anomalous.

    As the official code: with unit vectors ``|x - f|^2 = 2 - 2 x.f``, so the score is
    ``-logsumexp(2 gamma x.f) / gamma`` over the training features ``f``, a monotone transform of the
    negative log-density with kernel ``exp(-gamma |x - f|^2)``; ``gamma`` as :func:`ocsvm_head`.

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    from scipy.special import logsumexp

    f = l2_normalize(features)
    g = _paper_gamma(f) if gamma is None else gamma

    def score(x: np.ndarray) -> np.ndarray:
        return -logsumexp(2 * g * (l2_normalize(x) @ f.T), axis=1) / g

    return score


def gaussian_head(features: np.ndarray, reg_covar: float = 1e-6) -> Scorer:
    """Gaussian density (full covariance) on L2-normalised features (n, d) -> ``score(x) -> (m,)``.

    As the official code: a one-component ``GaussianMixture`` (``reg_covar`` added to the diagonal);
    score = minus the log-likelihood, i.e. half the squared Mahalanobis distance plus a constant.

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(n_components=1, covariance_type="full", reg_covar=reg_covar, random_state=0)
    gmm.fit(l2_normalize(features))
    return lambda x: -gmm.score_samples(l2_normalize(x))


ONE_CLASS_HEADS: dict[str, Callable[..., Scorer]] = {"OC-SVM": ocsvm_head, "KDE": kde_head, "Gaussian": gaussian_head}
