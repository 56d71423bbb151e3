"""Uninformed Students (Bergmann et al., CVPR 2020): a teacher of local patch descriptors and students that
regress it on normal images; anomalies are where the students miss the teacher or disagree with each other.

Dense descriptors. ``PatchNet`` has no pooling: a first convolution of kernel ``2 * stride + 1`` and
stride ``stride``, then 3x3 convolutions dilated 1, 2, 4, ..., so the descriptor of grid cell (i, j) sees
exactly one ``patch_size`` x ``patch_size`` patch. With ``stride=1`` the dense output is *exact* (one
descriptor per pixel, equal to the network run on the patch around that pixel, what the paper gets with
fast dense feature extraction). With ``stride > 1`` it is the stride-and-upsample approximation: exact
descriptors on a grid of step ``stride``, upsampled to pixels afterwards (``knn.to_pixel_maps``).

Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adlib.arrays import as_images, to_numpy
from adlib.detectors import FeatureDetector
from adlib.train import fit


def patch_net_depth(patch_size: int, stride: int) -> int:
    """The number L of dilated 3x3 layers that gives receptive field ``patch_size = 2 * stride * 2**L + 1``.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}.")
    depth = math.log2(max(patch_size - 1, 1) / (2 * stride))
    if patch_size < 2 * stride + 1 or depth != int(depth):
        options = [2 * stride * 2**k + 1 for k in range(4)]
        raise ValueError(f"patch_size {patch_size} is not reachable with stride {stride}: use one of {options} "
                         f"(2 * stride * 2**L + 1), or another stride.")
    return int(depth)


class PatchNet(nn.Module):
    """A descriptor network with receptive field ``patch_size``: teacher and students share this architecture.

    ``forward(x)`` with x (N, 3, H, W), H, W >= p: dense descriptors (N, n * dim, ceil(H / stride),
    ceil(W / stride)). Borders are padded by reflection, so a border cell sees (close to) a mirrored patch of the
    same texture: zero padding would give border cells dark frames, unlike any interior patch, and their scores
    would outrank the defects. ``forward(patches, dense=False)`` with patches (B, 3, p, p): one descriptor
    each, (B, n * dim, 1, 1), equal to the dense output at the cell whose patch it is. ``n`` > 1 holds n
    independent networks (an ensemble of students); their outputs are stacked along channels.
    Defaults are the paper's (p = 65, d = 128, 128 channels, exact dense evaluation).

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """

    def __init__(self, patch_size: int = 65, dim: int = 128, width: int = 128, stride: int = 1, n: int = 1):
        super().__init__()
        depth = patch_net_depth(patch_size, stride)
        self.patch_size, self.stride, self.dim, self.width, self.n = patch_size, stride, dim, width, n
        # n independent networks as one grouped network: same maths as n separate ones, fewer kernel calls.
        convs = [nn.Conv2d(3, n * width, 2 * stride + 1, stride=stride)]
        convs += [nn.Conv2d(n * width, n * width, 3, dilation=2**k, groups=n) for k in range(depth)]
        convs += [nn.Conv2d(n * width, n * width, 1, groups=n), nn.Conv2d(n * width, n * dim, 1, groups=n)]
        self.convs = nn.ModuleList(convs)
        # Padding stride // 2 + 1 centres cell i on pixel stride*i + (stride-1)//2 (about the centre of its cell).
        self.pads = [stride // 2 + 1] + [2**k for k in range(depth)] + [0, 0]

    def forward(self, x: torch.Tensor, dense: bool = True) -> torch.Tensor:
        if not dense and x.shape[-2:] != (self.patch_size, self.patch_size):
            raise ValueError(f"dense=False expects patches of {self.patch_size} x {self.patch_size} px, "
                             f"got {tuple(x.shape[-2:])}.")
        if dense and min(x.shape[-2:]) < self.patch_size:
            raise ValueError(f"images of {tuple(x.shape[-2:])} px are smaller than patch_size {self.patch_size}; "
                             f"use larger images or a smaller patch.")
        for i, (conv, pad) in enumerate(zip(self.convs, self.pads)):
            x = conv(F.pad(x, [pad] * 4, mode="reflect") if dense and pad else x)
            if i < len(self.convs) - 1:
                x = F.leaky_relu(x, 5e-3)  # the paper's leaky ReLU slope
        return x

    def cell_origin(self, i: int) -> int:
        """Top-left pixel (row or column) of the patch that grid cell ``i`` sees in the dense output."""
        return self.stride * i + self.stride - self.pads[0] - self.patch_size // 2


def compactness_loss(d: torch.Tensor) -> torch.Tensor:
    """The compactness loss L_c: the off-diagonal entries of the descriptors' correlation matrix, squared, summed.

    d: (B, dim) descriptors of one minibatch -> scalar. Decorrelated channels carry more information per
    dimension. The paper sums the entries themselves; that sum is minimised (at -dim) by anti-correlated
    channels, not by decorrelated ones, so we sum squares, as common reimplementations do.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    z = (d - d.mean(0)) / (d.std(0) + 1e-8)
    corr = z.T @ z / (len(d) - 1)
    return corr.pow(2).sum() - corr.diagonal().pow(2).sum()


@torch.no_grad()
def pretrained_descriptors(extractor: nn.Module, patches: torch.Tensor, size: int = 224,
                           batch_size: int = 256) -> torch.Tensor:
    """The targets the teacher distils: patches (B, 3, p, p) resized to ``size`` px through the pretrained
    ``extractor`` (a ``backbones.feature_extractor``), each stage globally average-pooled: (B, D).

    The paper feeds 224 px patches to an ImageNet ResNet-18 and takes its 512-d pooled output.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    out = []
    for batch in torch.split(patches, batch_size):
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
        out.append(torch.cat([m.mean(dim=(2, 3)) for m in extractor(batch)], dim=1).cpu())  # students train on CPU
    return torch.cat(out)


def random_patches(images: torch.Tensor, patch_size: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` patches (n, 3, p, p) cropped at uniformly random positions of images (N, 3, H, W).

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``)
    """
    g = torch.Generator().manual_seed(seed)
    n_img, _, h, w = images.shape
    if h < patch_size or w < patch_size:
        raise ValueError(f"images of {h} x {w} px are smaller than patch_size {patch_size}; use a smaller patch.")
    idx = torch.randint(n_img, (n,), generator=g)
    ys = torch.randint(h - patch_size + 1, (n,), generator=g)
    xs = torch.randint(w - patch_size + 1, (n,), generator=g)
    return torch.stack([images[i, :, y:y + patch_size, x:x + patch_size] for i, y, x in zip(idx, ys, xs)])


def train_teacher(images: torch.Tensor, extractor: nn.Module, patch_size: int = 65, *, dim: int = 128,
                  width: int = 128, stride: int = 1, n_patches: int = 50_000, target_size: int = 224,
                  epochs: int = 10, batch_size: int = 64, lr: float = 2e-4, weight_decay: float = 1e-5,
                  lambda_c: float = 1.0, seed: int = 0, progress: bool = True) -> tuple[PatchNet, list[dict]]:
    """Distil ``extractor`` into a ``PatchNet`` teacher on random patches of images (N, 3, H, W).

    Loss = L_k + lambda_c * L_c: L_k = ||D(T(patch)) - pretrained(patch)||^2 with a linear decoder D from
    ``dim`` to the pretrained width; L_c = :func:`compactness_loss`. (The paper's optional metric-learning
    term L_m is left out.) Returns the teacher in eval mode and the per-epoch history.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    patches = random_patches(images, patch_size, n_patches, seed)
    targets = pretrained_descriptors(extractor, patches, target_size)
    torch.manual_seed(seed)
    teacher = PatchNet(patch_size, dim, width, stride)
    decoder = nn.Linear(dim, targets.shape[1])
    opt = torch.optim.Adam([*teacher.parameters(), *decoder.parameters()], lr=lr, weight_decay=weight_decay)
    loader = DataLoader(TensorDataset(patches, targets), batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        x, y = batch
        d = teacher(x, dense=False).flatten(1)
        loss_k = (decoder(d) - y).pow(2).sum(1).mean()
        loss_c = compactness_loss(d)
        opt.zero_grad()
        (loss_k + lambda_c * loss_c).backward()
        opt.step()
        return {"L_k": loss_k.item(), "L_c": loss_c.item()}

    teacher.train()
    history = fit(step, loader, epochs=epochs, seed=seed, progress=progress)
    return teacher.eval(), history


@torch.no_grad()
def _dense(net: nn.Module, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    return torch.cat([net(b) for b in torch.split(images, batch_size)])


def errors_and_variances(students: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression error and predictive variance per cell.

    students: (M, N, dim, h, w) predictions; target: (N, dim, h, w) normalised teacher descriptors.
    e = ||mean_m s_m - t||^2 and v = mean_m ||s_m||^2 - ||mean_m s_m||^2, each (N, h, w).

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    mean = students.mean(0)
    e = (mean - target).pow(2).sum(1)
    v = students.pow(2).sum(2).mean(0) - mean.pow(2).sum(1)
    return e, v


class StudentTeacher(nn.Module):
    """A frozen teacher and an ensemble of ``n_students`` students (paper: M = 3) of the same architecture.

    ``fit(images)`` trains the students to regress the teacher's descriptors normalised with their
    per-channel mean and std on ``images``; ``calibrate(images)`` takes the mean and std of e and v on
    held-out normal images; ``score_maps(images)`` gives the normalised e + v per grid cell.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """

    def __init__(self, teacher: PatchNet, n_students: int = 3, seed: int = 0):
        super().__init__()
        if n_students < 2:
            raise ValueError(f"n_students must be >= 2 (the variance needs an ensemble), got {n_students}.")
        self.teacher = teacher.eval().requires_grad_(False)
        if teacher.n != 1:
            raise ValueError(f"the teacher must be one network (n=1), got n={teacher.n}.")
        dim = teacher.dim
        torch.manual_seed(seed)
        self.students = PatchNet(teacher.patch_size, dim, teacher.width, teacher.stride, n=n_students)
        self.register_buffer("t_mean", torch.zeros(1, dim, 1, 1))
        self.register_buffer("t_std", torch.ones(1, dim, 1, 1))
        self.register_buffer("calibration", torch.full((4,), float("nan")))  # e mean, e std, v mean, v std

    def fit(self, images: torch.Tensor, *, epochs: int = 100, batch_size: int = 1, lr: float = 1e-4,
            weight_decay: float = 1e-5, seed: int = 0, progress: bool = True) -> list[dict]:
        """Train the students on normal images (N, 3, H, W) (paper: Adam, lr 1e-4, weight decay 1e-5)."""
        t = _dense(self.teacher, images)
        self.t_mean.copy_(t.mean(dim=(0, 2, 3), keepdim=True))
        self.t_std.copy_(t.std(dim=(0, 2, 3), keepdim=True) + 1e-8)
        t = (t - self.t_mean) / self.t_std
        opt = torch.optim.Adam(self.students.parameters(), lr=lr, weight_decay=weight_decay)
        loader = DataLoader(TensorDataset(images, t), batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))

        def step(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
            x, y = batch
            pred = self.students(x).unflatten(1, (self.students.n, -1))  # (B, M, dim, h, w)
            loss = (pred - y[:, None]).pow(2).sum(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return {"loss": loss.item()}

        self.students.train()
        history = fit(step, loader, epochs=epochs, seed=seed, progress=progress)
        self.students.eval()
        return history

    @torch.no_grad()
    def errors_and_variances(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw e and v (N, h, w) for images (N, 3, H, W): see :func:`errors_and_variances`."""
        t = (_dense(self.teacher, images) - self.t_mean) / self.t_std
        pred = _dense(self.students, images).unflatten(1, (self.students.n, -1)).transpose(0, 1)
        return errors_and_variances(pred, t)

    def calibrate(self, images: torch.Tensor) -> "StudentTeacher":
        """Mean and std of e and v over every cell of normal images unseen in training (paper: validation set)."""
        e, v = self.errors_and_variances(images)
        self.calibration.copy_(torch.stack([e.mean(), e.std(), v.mean(), v.std()]))
        return self

    def normalised_terms(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(e - mean_e) / std_e and (v - mean_v) / std_v per cell, each (N, h, w) float64, for the ablation."""
        if torch.isnan(self.calibration).any():
            raise RuntimeError("Call calibrate(held_out_normal_images) before scoring.")
        e, v = self.errors_and_variances(images)
        em, es, vm, vs = self.calibration.tolist()
        return to_numpy((e.double() - em) / es), to_numpy((v.double() - vm) / vs)

    def score_maps(self, images: torch.Tensor) -> np.ndarray:
        """The paper's score per cell: normalised error + normalised variance, (N, h, w) float64."""
        e, v = self.normalised_terms(images)
        return e + v


class StudentsDetector(FeatureDetector):
    """Uninformed Students behind the detector protocol: a teacher distilled from ``backbone`` on random
    ``patch_size`` patches of the training images, ``n_students`` students regressing it, and the score
    e + v normalised on ``n_val`` training images held out from training (the paper's validation images).

    Defaults follow the book profile of its chapter (p = 17 at 128 px, d = width = 32, a 4 px grid, short
    schedules), which fit the CPU budget; the paper's are p = 17/33/65, d = 128, stride 1, 50,000 patches,
    10 teacher and 100 student epochs (pass them as keywords on a GPU). The networks train on the CPU; only
    the backbone runs on ``device``.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """

    summary = "Uninformed Students (Bergmann et al. 2020): students regress a distilled teacher; error + variance"
    method = "students"

    def __init__(self, backbone: str = "effnet-lite0", layers: tuple[int, ...] | None = None, patch_size: int = 17,
                 stride: int = 4, dim: int = 32, width: int = 32, n_students: int = 3, n_patches: int = 1024,
                 target_size: int = 32, teacher_epochs: int = 3, student_epochs: int = 16, lr: float = 1e-3,
                 n_val: int = 10, sigma: float = 4.0, device: str = "cpu", seed: int = 0, batch_size: int = 32):
        super().__init__(backbone, layers, stride, sigma, device, seed, batch_size)
        self.patch_size, self.dim, self.width, self.n_students = patch_size, dim, width, n_students
        self.n_patches, self.target_size, self.teacher_epochs = n_patches, target_size, teacher_epochs
        self.student_epochs, self.lr, self.n_val = student_epochs, lr, n_val
        self.model: StudentTeacher | None = None

    def features(self, images) -> torch.Tensor:
        """The students see the images themselves (on the CPU); the backbone only teaches the teacher."""
        return as_images(images).cpu()

    def fit_features(self, images: torch.Tensor) -> None:
        if len(images) <= self.n_val:
            raise ValueError(f"need more than n_val={self.n_val} training images (held out to normalise the "
                             f"scores), got {len(images)}; lower n_val.")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        val, train = images[order[:self.n_val]], images[order[self.n_val:]]
        with torch.enable_grad():
            teacher, _ = train_teacher(train, self.extractor, self.patch_size, dim=self.dim, width=self.width,
                                       stride=self.stride, n_patches=self.n_patches, target_size=self.target_size,
                                       epochs=self.teacher_epochs, seed=self.seed, progress=False)
            self.model = StudentTeacher(teacher, self.n_students, self.seed)
            self.model.fit(train, epochs=self.student_epochs, batch_size=2, lr=self.lr, seed=self.seed, progress=False)
        self.model.calibrate(val)

    def score_features(self, images: torch.Tensor) -> tuple[np.ndarray, None]:
        return self.model.score_maps(images), None

    def build_model(self, state: dict[str, torch.Tensor]) -> StudentTeacher:
        return StudentTeacher(PatchNet(self.patch_size, self.dim, self.width, self.stride), self.n_students, self.seed)
