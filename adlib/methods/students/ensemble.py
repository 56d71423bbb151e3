"""Uninformed Students (Bergmann et al., CVPR 2020): a teacher of local patch descriptors and students that
regress it on normal images; anomalies are where the students miss the teacher or disagree with each other.

Dense descriptors. ``PatchNet`` has no pooling: a first convolution of kernel ``2 * stride + 1`` and
stride ``stride``, then 3x3 convolutions dilated 1, 2, 4, ..., so the descriptor of grid cell (i, j) sees
exactly one ``patch_size`` x ``patch_size`` patch. With ``stride=1`` the dense output is *exact* (one
descriptor per pixel, equal to the network run on the patch around that pixel, what the paper gets with
fast dense feature extraction). With ``stride > 1`` it is the stride-and-upsample approximation: exact
descriptors on a grid of step ``stride``, upsampled to pixels afterwards (``base.to_pixel_maps``).

Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adlib.core.arrays import to_numpy
from adlib.features.cnn import feature_extractor
from adlib.methods.base import PatchScores, TrainedDetector
from adlib.methods.students.teacher import PatchNet, load_teacher, train_teacher
from adlib.training.loop import fit

STUDENT_EPOCHS = 50  # the students' epochs (lr 1e-3, one image per step) in chapter 6's book profile


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
        # The students' own input standardisation (per colour channel, over their training images): one texture
        # varies little around its mean brightness, and raw inputs bury that variation under the mean.
        self.register_buffer("x_mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("x_std", torch.ones(1, 3, 1, 1))
        self.register_buffer("calibration", torch.full((4,), float("nan")))  # e mean, e std, v mean, v std

    def fit(self, images: torch.Tensor, *, epochs: int = 100, batch_size: int = 1, lr: float = 1e-4,
            weight_decay: float = 1e-5, seed: int = 0, val: torch.Tensor | None = None,
            progress: bool = True) -> list[dict]:
        """Train the students on normal images (N, 3, H, W) (paper: Adam, lr 1e-4, weight decay 1e-5, batch 1).

        Returns the per-epoch history: ``loss`` (training, mean over the epoch's steps) and, with ``val``
        (held-out normal images), ``val_loss``: the same loss on them after the epoch's last step, what the book's
        convergence rule (:class:`adlib.eval.claims.TrainingRecord`) reads, with no test data."""
        t = _dense(self.teacher, images)
        self.x_mean.copy_(images.mean(dim=(0, 2, 3), keepdim=True))
        self.x_std.copy_(images.std(dim=(0, 2, 3), keepdim=True) + 1e-6)
        self.t_mean.copy_(t.mean(dim=(0, 2, 3), keepdim=True))
        self.t_std.copy_(t.std(dim=(0, 2, 3), keepdim=True) + 1e-8)
        t = (t - self.t_mean) / self.t_std
        opt = torch.optim.Adam(self.students.parameters(), lr=lr, weight_decay=weight_decay)
        loader = DataLoader(TensorDataset(images, t), batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        val_t = None if val is None else (_dense(self.teacher, val) - self.t_mean) / self.t_std
        steps = {"done": 0}

        def regression_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            pred = self.students(self.student_input(x)).unflatten(1, (self.students.n, -1))  # (B, M, d, h, w)
            return (pred - y[:, None]).pow(2).sum(2).mean()

        def step(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
            x, y = batch
            loss = regression_loss(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps["done"] += 1
            out = {"loss": loss.item()}
            if val is not None and steps["done"] % len(loader) == 0:  # the epoch's last step
                with torch.no_grad():
                    out["val_loss"] = regression_loss(val, val_t).item()
            return out

        self.students.train()
        history = fit(step, loader, epochs=epochs, seed=seed, progress=progress)
        self.students.eval()
        return history

    def student_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) standardised per colour channel with the students' training statistics."""
        return (images - self.x_mean) / self.x_std

    @torch.no_grad()
    def errors_and_variances(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw e and v (N, h, w) for images (N, 3, H, W): see :func:`errors_and_variances`."""
        t = (_dense(self.teacher, images) - self.t_mean) / self.t_std
        pred = _dense(self.students, self.student_input(images)).unflatten(1, (self.students.n, -1)).transpose(0, 1)
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


class StudentsDetector(TrainedDetector):
    """Uninformed Students behind the detector protocol: a teacher (``teacher``: a shipped one, e.g.
    ``"teacher-p17"``, distilled from the ImageNet EfficientNet-Lite0 on natural images; or None: distilled from
    ``backbone`` on random ``patch_size`` patches of the training images), ``n_students`` students regressing it,
    and the score e + v normalised on ``n_val`` training images held out from training (the paper's validation
    images).

    Defaults follow the book profile of its chapter (p = 17 at 128 px, d = 128, width 64, an 8 px grid); the
    paper's are p = 17/33/65, d = 128, width 128, stride 1, 100 student epochs at lr 1e-4 (pass them as keywords
    on a GPU). The networks train on the CPU; only the backbone runs on ``device``.

    Used by: ``adlib.methods.catalog.METHODS``.
    """

    method = "students"

    def __init__(self, backbone: str = "effnet-lite0", layers: tuple[int, ...] | None = None,
                 teacher: str | None = "teacher-p17", patch_size: int = 17, stride: int = 8, dim: int = 128,
                 width: int = 64, n_students: int = 3, n_patches: int = 1024, target_size: int = 32,
                 teacher_epochs: int = 3, student_epochs: int = STUDENT_EPOCHS, lr: float = 1e-3, n_val: int = 10,
                 sigma: float = 4.0, device: str = "cpu", seed: int = 0, batch_size: int = 32):
        super().__init__(None, sigma=sigma, device=device, seed=seed, batch_size=batch_size)
        self.backbone, self.layers, self.stride = backbone, layers, stride
        self.teacher, self.patch_size, self.dim, self.width = teacher, patch_size, dim, width
        self.n_students, self.n_patches, self.target_size = n_students, n_patches, target_size
        self.teacher_epochs, self.student_epochs, self.lr, self.n_val = teacher_epochs, student_epochs, lr, n_val
        self.model: StudentTeacher | None = None

    def hparams(self) -> dict:
        return super().hparams() | {
            "backbone": self.backbone, "layers": self.layers, "teacher": self.teacher, "patch_size": self.patch_size,
            "stride": self.stride, "dim": self.dim, "width": self.width, "n_students": self.n_students,
            "n_patches": self.n_patches, "target_size": self.target_size, "teacher_epochs": self.teacher_epochs,
            "student_epochs": self.student_epochs, "lr": self.lr, "n_val": self.n_val}

    @torch.no_grad()
    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The students see the images themselves, on the CPU (the networks are small); the backbone, on
        ``device``, only teaches a teacher distilled here (``teacher=None``)."""
        return images.cpu()

    def train_model(self, images: torch.Tensor) -> list[dict[str, float]]:
        if len(images) <= self.n_val:
            raise ValueError(f"need more than n_val={self.n_val} training images (held out to normalise the "
                             f"scores), got {len(images)}; lower n_val.")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        val, train = images[order[:self.n_val]], images[order[self.n_val:]]
        if self.teacher is not None:
            teacher, _ = load_teacher(self.teacher)
            shape = (teacher.patch_size, teacher.dim, teacher.width, teacher.stride)
            if shape != (self.patch_size, self.dim, self.width, self.stride):
                raise ValueError(f"teacher {self.teacher!r} has patch_size, dim, width, stride = {shape}; pass "
                                 "those, or teacher=None to distil one from the backbone on the training images.")
        else:  # the backbone is loaded only here, where it teaches
            extractor = feature_extractor(self.backbone, self.layers, seed=self.seed, device=self.device)
            teacher, _, _ = train_teacher(train, extractor, self.patch_size, dim=self.dim, width=self.width,
                                          stride=self.stride, n_patches=self.n_patches, target_size=self.target_size,
                                          epochs=self.teacher_epochs, seed=self.seed, progress=False)
        self.model = StudentTeacher(teacher, self.n_students, self.seed)
        history = self.model.fit(train, epochs=self.student_epochs, lr=self.lr, seed=self.seed, val=val,
                                 progress=False)
        with torch.no_grad():
            self.model.calibrate(val)
        return history

    def score_inputs(self, images: torch.Tensor) -> PatchScores:
        return PatchScores(self.model.score_maps(images))

    def rebuild_model(self, state: dict[str, torch.Tensor]) -> StudentTeacher:
        return StudentTeacher(PatchNet(self.patch_size, self.dim, self.width, self.stride), self.n_students, self.seed)
