"""CFA: coupled-hypersphere-based feature adaptation (Lee et al., 2022), as the official code.

A frozen CNN gives patch features (three stages, 3x3 average pooled, resized to one grid: see
:func:`adlib.features.cnn.patch_features`); a trainable *patch descriptor* (CoordConv + 1x1 conv) maps them
to target-oriented features; a *memory bank* of normal descriptors is built once before training;
the loss pulls each descriptor into the hyperspheres of radius ``r`` around its ``k`` nearest memory
features and pushes the next ``j`` ones out by a margin ``alpha``. The anomaly score of a patch is the
softmin-weighted distance to its nearest memory feature.

Every paper hyperparameter is a keyword argument whose default is the paper's (official code):
``k = j = 3``, ``alpha = 0.1``, ``r`` initialised at ``1e-5`` and learned, ``nu = 1e-3``,
``gamma_c = gamma_d = 1``; AdamW (lr 1e-3, weight decay 5e-4, AMSGrad), batch size 4; at least the official
steps (:data:`OFFICIAL_STEPS`), then on until a held-out loss is flat (:func:`is_flat`).

Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adlib.eval.claims import CONVERGED_CHANGE
from adlib.features.cnn import aggregate_patches
from adlib.methods.base import PatchScores, TrainedDetector
from adlib.training.loop import fit, loss_change

#: The official schedule in optimiser steps on an average MVTec AD category: its 15 categories hold 3,629 training
#: images (about 242 each), 60 batches of 4 an epoch, 30 epochs (the official code's default).
OFFICIAL_STEPS = 30 * (round(3629 / 15) // 4)
#: Passes over the images per epoch (a history row; the stopping rule is asked after each): a flat loss takes thousands.
PASSES = 10
#: The most epochs a run "until flat" may train; a run stopped here keeps a record that says it is not flat.
MAX_EPOCHS = 500
#: The share of the normal training images held out for the stopping rule's loss (never a test image).
HELD_OUT_SHARE = 0.1


def add_coords(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, C + 2, h, w): append the row and column coordinate, each scaled to [-1, 1].

    CoordConv's trick: a 1x1 conv that sees where a patch is can treat a corner differently from the
    centre (objects in MVTec AD are roughly aligned).

    Used by: ``adlib.methods.cfa.PatchDescriptor``.
    """
    n, _, h, w = x.shape
    rows = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
    cols = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
    return torch.cat([x, rows, cols], dim=1)


class PatchDescriptor(nn.Module):
    """The trainable patch descriptor: CoordConv then a 1x1 conv, (N, C, h, w) -> (N, C // gamma_d, h, w).

    ``gamma_d`` compresses the descriptor's dimension (1 = as many channels as the input).

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
    """

    def __init__(self, in_channels: int, gamma_d: int = 1):
        super().__init__()
        if gamma_d < 1 or in_channels // gamma_d < 1:
            raise ValueError(f"gamma_d must be in 1..in_channels ({in_channels}), got {gamma_d}.")
        self.conv = nn.Conv2d(in_channels + 2, in_channels // gamma_d, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(add_coords(features))


@torch.no_grad()
def memory_bank(descriptors: torch.Tensor, gamma_c: int = 1, beta: float | None = None,
                seed: int = 0) -> torch.Tensor:
    """The memory bank (M, D) of normal descriptors (N, D, h, w), M = h * w // gamma_c, built as in CFA.

    ``C_0``: K-means of the first image's h * w patch descriptors into M centres (with ``gamma_c = 1``
    the patches themselves). Then, for each next image i, ``C_i^NN`` holds, for every memory feature,
    its nearest patch descriptor of image i, and ``C_i = (1 - beta) C_{i-1} + beta C_i^NN`` (EMA).
    ``beta=None`` uses ``1 / (i + 1)``, a running mean, as the official code averages over the training
    set (it averages position by position, then runs K-means; we match by nearest neighbour as the
    paper describes, which also suits unaligned textures). The bank's size does not grow with N.

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
    """
    if descriptors.ndim != 4 or len(descriptors) == 0:
        raise ValueError(f"descriptors must be (N, D, h, w) with N >= 1, got shape {tuple(descriptors.shape)}.")
    if beta is not None and not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1] or None (running mean), got {beta}.")
    n, d, h, w = descriptors.shape
    rows = descriptors.permute(0, 2, 3, 1).reshape(n, h * w, d)
    size = h * w // gamma_c if gamma_c >= 1 else 0
    if size < 1:
        raise ValueError(f"gamma_c must be in 1..h*w ({h * w}), got {gamma_c}.")
    if gamma_c == 1:
        bank = rows[0].clone()
    else:
        km = KMeans(n_clusters=size, n_init=1, random_state=seed).fit(rows[0].double().cpu().numpy())
        bank = torch.as_tensor(km.cluster_centers_, dtype=descriptors.dtype, device=descriptors.device)
    for i in range(1, n):
        nearest = rows[i][torch.cdist(bank, rows[i]).argmin(dim=1)]
        b = 1.0 / (i + 1) if beta is None else beta
        bank = (1 - b) * bank + b * nearest
    return bank


def squared_distances(descriptors: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N, h * w, M) between descriptors (N, D, h, w) and a bank (M, D).

    Used by: ``adlib.methods.cfa.CFA``.
    """
    if descriptors.shape[1] != bank.shape[1]:
        raise ValueError(f"descriptors have {descriptors.shape[1]} channels, the bank has {bank.shape[1]}.")
    phi = descriptors.flatten(2).transpose(1, 2)  # (N, h*w, D)
    # |f|^2 + |c|^2 - 2 f.c is one matmul; rounding can make it slightly negative, hence the clamp.
    sq = phi.pow(2).sum(-1, keepdim=True) + bank.pow(2).sum(-1) - 2 * phi @ bank.T
    return sq.clamp_min(0)


def cfa_loss(sq_dist: torch.Tensor, radius: torch.Tensor | float, k: int = 3, j: int = 3, alpha: float = 0.1,
             nu: float = 1e-3) -> dict[str, torch.Tensor]:
    """L_CFA = (L_att + L_rep) / nu from squared distances (N, P, M) to the memory bank, as the official code.

    Per patch, sort the M squared distances D ascending. ``L_att`` = mean over patches and the k nearest
    of max(0, D - r^2): pull a descriptor inside the hyperspheres of its k nearest memory features.
    ``L_rep`` = mean over the next j (ranks k+1..k+j) of max(0, r^2 - D - alpha): push hard negatives
    out. ``1 / nu`` is the soft-boundary weight of the official code. Note that ``L_rep`` is zero
    while r^2 <= alpha (always at the start, r = 1e-5). Returns {"loss", "att", "rep"} (scalars).

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
    """
    if sq_dist.shape[-1] < k + j:
        raise ValueError(f"the memory bank has {sq_dist.shape[-1]} features, fewer than k + j = {k + j}; "
                         "use a smaller gamma_c or a finer grid.")
    nearest = sq_dist.topk(k + j, dim=-1, largest=False).values
    r2 = torch.as_tensor(radius, dtype=sq_dist.dtype, device=sq_dist.device) ** 2
    att = F.relu(nearest[..., :k] - r2).mean()
    rep = F.relu(r2 - nearest[..., k:] - alpha).mean()
    return {"loss": (att + rep) / nu, "att": att, "rep": rep}


def softmin_scores(sq_dist: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Patch scores (N, P) from squared distances (N, P, M): softmin over the k nearest distances,
    the weight of the nearest times its (Euclidean) distance, as the official code.

    A patch close to one memory feature and far from the others gets a weight near 1; a patch in a
    region where several memory features are equally near gets a lower weight, so a lower score.

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
    """
    d = sq_dist.topk(k, dim=-1, largest=False).values.sqrt()
    return F.softmin(d, dim=-1)[..., 0] * d[..., 0]


class CFA(nn.Module):
    """Patch descriptor + learnable radius + memory bank; works on precomputed patch features (N, C, h, w).

    Call :meth:`init_bank` on the normal training features, train with :func:`train_cfa`, then
    :meth:`score_maps` gives patch score maps. The backbone stays outside: it is frozen, so its features
    are computed once.

    Used by: ``adlib.methods.cfa.CFADetector``.
    """

    def __init__(self, in_channels: int, *, gamma_c: int = 1, gamma_d: int = 1, k: int = 3, j: int = 3,
                 alpha: float = 0.1, nu: float = 1e-3, radius: float = 1e-5, beta: float | None = None):
        super().__init__()
        self.descriptor = PatchDescriptor(in_channels, gamma_d)
        self.radius = nn.Parameter(torch.tensor([radius]))  # learned, as in the official code
        self.register_buffer("bank", torch.empty(0))
        self.gamma_c, self.k, self.j, self.alpha, self.nu, self.beta = gamma_c, k, j, alpha, nu, beta

    @torch.no_grad()
    def init_bank(self, features: torch.Tensor, seed: int = 0) -> "CFA":
        """Build the memory bank from normal training features (N, C, h, w) through the current descriptor."""
        self.bank = memory_bank(self.descriptor(features), self.gamma_c, self.beta, seed)
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Squared distances (N, h * w, M) of the descriptors of ``features`` (N, C, h, w) to the bank."""
        if self.bank.numel() == 0:
            raise RuntimeError("The memory bank is empty: call init_bank(normal_features) first.")
        return squared_distances(self.descriptor(features), self.bank)

    def loss(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """:func:`cfa_loss` of a batch of normal features (N, C, h, w)."""
        return cfa_loss(self(features), self.radius, self.k, self.j, self.alpha, self.nu)

    @torch.no_grad()
    def score_maps(self, features: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """Patch score maps (N, h, w), float64, >= 0 (higher = more anomalous)."""
        h, w = features.shape[-2:]
        scores = [softmin_scores(self(batch), self.k) for batch in torch.split(features, batch_size)]
        return torch.cat(scores).reshape(-1, h, w).double().cpu().numpy()


def held_out_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(fit, held_out)`` of ``n`` normal training images: :data:`HELD_OUT_SHARE` of them held out for the
    loss curve (seeded with 0 whatever the training seed, so every run and arm sees the same split; none when
    ``n < 10``).

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
    """
    held = np.sort(np.random.default_rng(0).permutation(n)[: int(n * HELD_OUT_SHARE)])
    return np.setdiff1d(np.arange(n), held), held


def is_flat(history: list[dict[str, float]], steps_per_epoch: int, min_steps: int = OFFICIAL_STEPS) -> bool:
    """CFA's stopping rule: at least ``min_steps`` optimiser steps, and the held-out loss (else the training loss)
    flat by the book's rule: it moves less than ``CONVERGED_CHANGE`` from the second-last fifth of the epochs to
    the last (:func:`adlib.training.loop.loss_change`).

    Used by: ``adlib.methods.cfa.cfa_training``.
    """
    if len(history) < 5 or len(history) * steps_per_epoch < min_steps:
        return False
    return abs(loss_change(history, "held_out" if "held_out" in history[-1] else "loss")) < CONVERGED_CHANGE


class Passes(torch.utils.data.Sampler):
    """Batches of ``batch_size`` of ``n`` indices for ``passes`` passes, each a new shuffle (``generator``) whose last
    incomplete batch is dropped.

    Used by: ``adlib.methods.cfa.cfa_training``.
    """

    def __init__(self, n: int, batch_size: int, passes: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.passes, self.generator = n, batch_size, passes, generator

    def __iter__(self):
        for _ in range(self.passes):
            order = torch.randperm(self.n, generator=self.generator).tolist()
            for i in range(0, self.n - self.batch_size + 1, self.batch_size):
                yield order[i:i + self.batch_size]

    def __len__(self) -> int:
        return self.passes * (self.n // self.batch_size)


class CFATraining(NamedTuple):
    """One CFA training for :func:`adlib.training.loop.fit`: ``model``, ``step``, ``loader``, the ``state`` to
    checkpoint, the most ``epochs`` and the stopping rule ``until`` (None: all ``epochs``).

    Used by: ``adlib.methods.cfa.cfa_training``, ``adlib.methods.cfa.CFADetector``.
    """

    model: "CFA"
    step: Callable[[Any], dict[str, float]]
    loader: DataLoader
    state: dict[str, Any]
    epochs: int
    until: Callable[[list[dict[str, float]]], bool] | None


def cfa_training(model: CFA, features: torch.Tensor, held_out: torch.Tensor | None = None, *,
                 epochs: int | None = None, min_steps: int = OFFICIAL_STEPS, max_epochs: int = MAX_EPOCHS,
                 passes: int = PASSES, lr: float = 1e-3, weight_decay: float = 5e-4, batch_size: int = 4,
                 seed: int = 0) -> CFATraining:
    """The training of ``model`` on normal features (N, C, h, w): AdamW with AMSGrad, shuffled batches, the last
    incomplete batch of each pass dropped, as the official code; an epoch is ``passes`` passes (:class:`Passes`).
    ``epochs`` fixed, or None: until :func:`is_flat` (at least ``min_steps`` steps, at most ``max_epochs`` epochs).
    The last step of an epoch adds the loss of the held-out features ``held_out`` (M, C, h, w) as ``"held_out"``,
    and every step the radius.

    Used by: ``adlib.methods.cfa.train_cfa``, ``adlib.methods.cfa.CFADetector``.
    """
    if len(features) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} training images, got {len(features)}.")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, amsgrad=True)
    generator = torch.Generator().manual_seed(seed)  # the loader's: fit checkpoints its state
    loader = DataLoader(TensorDataset(features), batch_sampler=Passes(len(features), batch_size, passes, generator),
                        generator=generator)
    done = {"steps": 0}

    def step(batch: list[torch.Tensor]) -> dict[str, float]:
        opt.zero_grad()
        out = model.loss(batch[0])
        out["loss"].backward()
        opt.step()
        row = {**{key: v.item() for key, v in out.items()}, "radius": model.radius.item()}
        done["steps"] += 1
        if held_out is not None and len(held_out) and done["steps"] % len(loader) == 0:  # an epoch's last step
            with torch.no_grad():
                row["held_out"] = model.loss(held_out)["loss"].item()
        return row

    until = None if epochs is not None else (lambda h: is_flat(h, len(loader), min_steps))
    return CFATraining(model, step, loader, {"model": model, "opt": opt}, epochs or max_epochs, until)


def train_cfa(model: CFA, features: torch.Tensor, held_out: torch.Tensor | None = None, *,
              epochs: int | None = None, min_steps: int = OFFICIAL_STEPS, max_epochs: int = MAX_EPOCHS,
              passes: int = PASSES, lr: float = 1e-3, weight_decay: float = 5e-4, batch_size: int = 4, seed: int = 0,
              progress: bool = True) -> list[dict[str, float]]:
    """Train the descriptor and the radius on normal features (N, C, h, w) (:func:`cfa_training`) for ``epochs``, or
    until the held-out features' loss is flat (None). Unlike the official code, no test-set epoch selection.
    Returns the history of :func:`adlib.training.loop.fit` (loss, att, rep, radius and held-out loss per epoch).

    Used by: ``adlib.methods.cfa.CFADetector``.
    """
    t = cfa_training(model, features, held_out, epochs=epochs, min_steps=min_steps, max_epochs=max_epochs,
                     passes=passes, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed)
    history = fit(t.step, t.loader, epochs=t.epochs, seed=seed, progress=progress, until=t.until)
    model.eval()
    return history


class CFADetector(TrainedDetector):
    """CFA behind the detector protocol: frozen patch features (:func:`adlib.features.cnn.aggregate_patches`),
    a :class:`CFA` descriptor and memory bank trained with :func:`train_cfa`, softmin scores.

    The paper's hyperparameters are the keyword defaults (``gamma_c = gamma_d = 1``, ``k = j = 3``,
    ``alpha = 0.1``, ``nu = 1e-3``, ``radius = 1e-5``, AdamW lr 1e-3, weight decay 5e-4, batch 4). ``epochs`` None:
    at least ``min_steps`` (the official steps), then until the loss of a held-out tenth of the images is flat
    (:func:`is_flat`), at most ``max_epochs`` of ``passes`` passes; an int: that many. The bank and the training see
    the other nine tenths (:func:`held_out_split`). ``stride`` 8 px by default. ``adapt=False`` is the ablation
    without the adaptation (:meth:`without_descriptor`): the identity in place of the descriptor, so CFA's compact
    bank and softmin score see the frozen features, and nothing is trained.

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
    """

    method = "cfa"

    def __init__(self, backbone: str = "effnet-lite0", layers: tuple[int, ...] | None = None, stride: int | None = 8,
                 gamma_c: int = 1, gamma_d: int = 1, k: int = 3, j: int = 3, alpha: float = 0.1, nu: float = 1e-3,
                 radius: float = 1e-5, epochs: int | None = None, min_steps: int = OFFICIAL_STEPS,
                 max_epochs: int = MAX_EPOCHS, passes: int = PASSES, lr: float = 1e-3, weight_decay: float = 5e-4,
                 train_batch_size: int = 4, adapt: bool = True, sigma: float = 4.0, device: str = "cpu", seed: int = 0,
                 batch_size: int = 32):
        super().__init__(backbone, layers, stride, sigma=sigma, device=device, seed=seed, batch_size=batch_size)
        self.gamma_c, self.gamma_d, self.k, self.j, self.alpha, self.nu = gamma_c, gamma_d, k, j, alpha, nu
        self.radius, self.epochs, self.lr, self.weight_decay = radius, epochs, lr, weight_decay
        self.min_steps, self.max_epochs, self.passes = min_steps, max_epochs, passes
        self.train_batch_size, self.adapt = train_batch_size, bool(adapt)
        self.model: CFA | None = None

    def hparams(self) -> dict:
        return super().hparams() | {
            "gamma_c": self.gamma_c, "gamma_d": self.gamma_d, "k": self.k, "j": self.j, "alpha": self.alpha,
            "nu": self.nu, "radius": self.radius, "epochs": self.epochs, "min_steps": self.min_steps,
            "max_epochs": self.max_epochs, "passes": self.passes, "lr": self.lr,
            "weight_decay": self.weight_decay, "train_batch_size": self.train_batch_size, "adapt": self.adapt}

    def without_descriptor(self) -> "CFADetector":
        """A new, unfitted detector with these hyperparameters but no adaptation (``adapt=False``): the identity
        replaces the patch descriptor, the memory bank is built from the frozen patch features and nothing is
        trained. This detector (fitted or not) is left as it is."""
        return CFADetector(**(self.hparams() | {"adapt": False}), device=self.device)

    def embed(self, maps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        return aggregate_patches(maps, grid=grid)

    def _new_model(self, in_channels: int) -> CFA:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = CFA(in_channels, gamma_c=self.gamma_c, gamma_d=self.gamma_d, k=self.k, j=self.j, alpha=self.alpha,
                        nu=self.nu, radius=self.radius)
        if not self.adapt:  # the ablation: the bank and the score see the frozen features themselves
            model.descriptor = nn.Identity()
        return model.to(self.device)

    def _split(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Build ``model`` with its bank from the :func:`held_out_split` fit part of normal features (N, C, h, w);
        returns (fit part, held-out part)."""
        fit_part, held = held_out_split(len(features))
        self.model = self._new_model(features.shape[1]).init_bank(features[fit_part], self.seed)
        return features[fit_part], features[held]

    def _schedule(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "min_steps": self.min_steps, "max_epochs": self.max_epochs,
                "passes": self.passes, "lr": self.lr, "weight_decay": self.weight_decay,
                "batch_size": self.train_batch_size, "seed": self.seed}

    def training(self, features: torch.Tensor) -> CFATraining:
        """The training :meth:`fit` runs on normal features (N, C, h, w), set up but not run (``model`` is set on the
        detector), for a caller that checkpoints it (``adlib.recipes.cfa_synthtex``)."""
        fit_part, held = self._split(features)  # sets self.model first
        return cfa_training(self.model, fit_part, held, **self._schedule())

    def train_model(self, features: torch.Tensor) -> list[dict[str, float]]:
        fit_part, held = self._split(features)
        if not self.adapt:
            return []  # nothing to train without a descriptor
        return train_cfa(self.model, fit_part, held, **self._schedule(), progress=False)

    def score_inputs(self, features: torch.Tensor) -> PatchScores:
        return PatchScores(self.model.score_maps(features))

    def rebuild_model(self, state: dict[str, torch.Tensor]) -> CFA:
        in_channels = state["descriptor.conv.weight"].shape[1] - 2 if self.adapt else state["bank"].shape[1]
        model = self._new_model(in_channels)
        model.bank = state["bank"].to(self.device)  # an empty buffer until fitted: give it the saved size
        return model
