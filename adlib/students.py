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
        for conv in self.convs:  # He initialisation for the leaky ReLU: PyTorch's default shrinks the activations
            nn.init.kaiming_normal_(conv.weight, a=5e-3, nonlinearity="leaky_relu")  # layer by layer, and students
            nn.init.zeros_(conv.bias)  # regressing a teacher then start slowly
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


def explained_variance(teacher: PatchNet, decoder: nn.Module, patches: torch.Tensor,
                       targets: torch.Tensor) -> float:
    """How much of the pretrained descriptors the teacher carries: 1 - L_k / (total variance of ``targets``),
    for patches (B, 3, p, p) and their targets (B, D) from :func:`pretrained_descriptors` (1 = all of it,
    0 = no better than predicting their mean).

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    with torch.no_grad():
        pred = torch.cat([decoder(teacher(b, dense=False).flatten(1)) for b in torch.split(patches, 256)])
    return float(1 - (pred - targets).pow(2).sum(1).mean() / targets.var(0).sum())


def train_teacher(images: torch.Tensor, extractor: nn.Module, patch_size: int = 65, *, dim: int = 128,
                  width: int = 128, stride: int = 1, n_patches: int = 50_000, target_size: int = 224,
                  epochs: int = 10, batch_size: int = 64, lr: float = 2e-4, weight_decay: float = 1e-5,
                  lambda_c: float = 1.0, seed: int = 0,
                  progress: bool = True) -> tuple[PatchNet, nn.Linear, list[dict]]:
    """Distil ``extractor`` into a ``PatchNet`` teacher on random patches of images (N, 3, H, W).

    Loss = L_k + lambda_c * L_c: L_k = ||D(T(patch)) - pretrained(patch)||^2 with a linear decoder D from
    ``dim`` to the pretrained width; L_c = :func:`compactness_loss`. (The paper's optional metric-learning
    term L_m is left out.) Returns the teacher in eval mode, the decoder and the per-epoch history (L_k, L_c
    and ``explained``, the fraction of the targets' variance the epoch's L_k leaves out subtracted from 1).

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    patches = random_patches(images, patch_size, n_patches, seed)
    targets = pretrained_descriptors(extractor, patches, target_size)
    total = targets.var(0).sum().item()
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
        return {"L_k": loss_k.item(), "L_c": loss_c.item(), "explained": 1 - loss_k.item() / total}

    teacher.train()
    history = fit(step, loader, epochs=epochs, seed=seed, progress=progress)
    return teacher.eval(), decoder.eval(), history


def teacher_images(size: int = 256) -> torch.Tensor:
    """The teacher's training images: the colour photographs that ship with scikit-image and scikit-learn
    (astronaut, coffee, a cat, a rocket, the Hubble deep field, a stained tissue, a retina, a Chinese temple,
    a flower), each resized so its shorter side is ``size`` px and centre-cropped to a square: (9, 3, size, size)
    in [0, 1]. A stand-in for the paper's ImageNet: generic natural images, none of the textures SynthTex is
    made from, so the teacher never sees the benchmark.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
    photos = [getattr(skimage.data, n)() for n in names] + list(load_sample_images().images)
    out = []
    for photo in photos:
        x = torch.from_numpy(np.array(photo[..., :3])).permute(2, 0, 1)[None].float() / 255
        h, w = x.shape[-2:]
        x = F.interpolate(x, scale_factor=size / min(h, w), mode="area" if min(h, w) > size else "bilinear")
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        out.append(x[0, :, top:top + size, left:left + size])
    return torch.stack(out).clamp(0, 1)


# The shipped teachers (``python -m adlib.students``): distilled from the ImageNet EfficientNet-Lite0's last stage
# on 64 px views of patches of :func:`teacher_images`; d = 128 as the paper, width 64 (the paper: 128) and descriptors
# on an 8 px grid (the paper: every pixel), so that three students per patch size train for tens of epochs within a
# chapter's CPU budget (whether they converge is measured in the chapter, by the book's rule).
# lambda_c = 0.01: summed over 128 * 127 channel pairs, L_c at weight 1 outweighs L_k at the start and the teacher
# collapses to predicting the targets' mean (its explained variance stays at 0); lr 1e-3 (the paper's 2e-4 is
# for 50,000 ImageNet patches over more steps).
TEACHER_RECIPE = dict(dim=128, width=64, stride=8, n_patches=20_000, target_size=64, epochs=80, batch_size=64,
                      lr=1e-3, lambda_c=0.01)
TEACHER_BACKBONE, TEACHER_LAYERS = "effnet-lite0", (4,)
STUDENT_EPOCHS = 50  # the students' epochs (lr 1e-3, one image per step) in chapter 6's book profile


def load_teacher(weights: str) -> tuple[PatchNet, nn.Linear]:
    """A shipped teacher (e.g. ``"teacher-p17"``, sha256-checked) or a file written by ``python -m
    adlib.students``: the ``PatchNet`` and its decoder, in eval mode.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    from adlib.backbones import load_weights

    state = load_weights(weights)
    stored = state.pop("options")  # patch_size, dim, width, stride, as written by main()
    options = dict(zip(("patch_size", "dim", "width", "stride"), map(int, stored)))
    teacher = PatchNet(**options)
    decoder = nn.Linear(options["dim"], state["decoder.weight"].shape[0])
    teacher.load_state_dict({k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")})
    decoder.load_state_dict({k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")})
    return teacher.eval(), decoder.eval()


def main(argv: list[str] | None = None) -> None:
    """``python -m adlib.students --patch-size P --out FILE``: distil a teacher with :data:`TEACHER_RECIPE` and
    write it (safetensors, fp32) with a JSON summary: history, held-out explained variance, sha256.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    import argparse
    import json
    import time
    from pathlib import Path

    from safetensors.torch import save_file

    from adlib.backbones import feature_extractor
    from adlib.download import sha256sum
    from adlib.train import loss_change

    parser = argparse.ArgumentParser(prog="python -m adlib.students", description="Distil a Uninformed "
                                     "Students teacher from the ImageNet EfficientNet-Lite0.")
    parser.add_argument("--patch-size", type=int, required=True, help="receptive field p (17, 33 or 65)")
    parser.add_argument("--out", required=True, help="file to write (.safetensors); refused if it exists")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs (e.g. a smoke run)")
    parser.add_argument("--n-patches", type=int, help="override the recipe's number of training patches")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; choose another file or delete it first.")
    recipe = TEACHER_RECIPE | {k: v for k, v in (("epochs", args.epochs), ("n_patches", args.n_patches)) if v}
    extractor = feature_extractor(TEACHER_BACKBONE, TEACHER_LAYERS)
    images = teacher_images()
    t0 = time.perf_counter()
    teacher, decoder, history = train_teacher(images, extractor, args.patch_size, seed=0, progress=False, **recipe)
    seconds = time.perf_counter() - t0
    held_out = random_patches(images, args.patch_size, max(256, recipe["n_patches"] // 10), seed=1)
    explained = explained_variance(teacher, decoder, held_out,
                                   pretrained_descriptors(extractor, held_out, recipe["target_size"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {f"teacher.{k}": v for k, v in teacher.state_dict().items()}
    state |= {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    state["options"] = torch.tensor([args.patch_size, recipe["dim"], recipe["width"], recipe["stride"]])
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    change = round(loss_change(history, "L_k"), 4) if len(history) > 1 else None
    print(json.dumps({"patch_size": args.patch_size, "recipe": recipe, "seconds": round(seconds, 1),
                      "held_out_explained": round(explained, 4), "loss_change": change, "sha256": sha256sum(out),
                      "history": [{k: round(v, 4) for k, v in row.items()} for row in history]}, indent=1))


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
        convergence rule (:class:`adlib.claims.TrainingRecord`) reads, with no test data."""
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


class StudentsDetector(FeatureDetector):
    """Uninformed Students behind the detector protocol: a teacher (``teacher``: a shipped one, e.g.
    ``"teacher-p17"``, distilled from the ImageNet EfficientNet-Lite0 on natural images; or None: distilled from
    ``backbone`` on random ``patch_size`` patches of the training images), ``n_students`` students regressing it,
    and the score e + v normalised on ``n_val`` training images held out from training (the paper's validation
    images).

    Defaults follow the book profile of its chapter (p = 17 at 128 px, d = 128, width 64, an 8 px grid); the
    paper's are p = 17/33/65, d = 128, width 128, stride 1, 100 student epochs at lr 1e-4 (pass them as keywords
    on a GPU). The networks train on the CPU; only the backbone runs on ``device``.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """

    summary = "Uninformed Students (Bergmann et al. 2020): students regress a distilled teacher; error + variance"
    method = "students"

    def __init__(self, backbone: str = "effnet-lite0", layers: tuple[int, ...] | None = None,
                 teacher: str | None = "teacher-p17", patch_size: int = 17, stride: int = 8, dim: int = 128,
                 width: int = 64, n_students: int = 3, n_patches: int = 1024, target_size: int = 32,
                 teacher_epochs: int = 3, student_epochs: int = STUDENT_EPOCHS, lr: float = 1e-3, n_val: int = 10,
                 sigma: float = 4.0, device: str = "cpu", seed: int = 0, batch_size: int = 32):
        super().__init__(backbone, layers, stride, sigma, device, seed, batch_size)
        self.teacher, self.patch_size, self.dim, self.width = teacher, patch_size, dim, width
        self.n_students, self.n_patches, self.target_size = n_students, n_patches, target_size
        self.teacher_epochs, self.student_epochs, self.lr, self.n_val = teacher_epochs, student_epochs, lr, n_val
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
            if self.teacher is not None:
                teacher, _ = load_teacher(self.teacher)
                shape = (teacher.patch_size, teacher.dim, teacher.width, teacher.stride)
                if shape != (self.patch_size, self.dim, self.width, self.stride):
                    raise ValueError(f"teacher {self.teacher!r} has patch_size, dim, width, stride = {shape}; pass "
                                     "those, or teacher=None to distil one from the backbone on the training images.")
            else:
                teacher, _, _ = train_teacher(train, self.extractor, self.patch_size, dim=self.dim, width=self.width,
                                              stride=self.stride, n_patches=self.n_patches,
                                              target_size=self.target_size, epochs=self.teacher_epochs,
                                              seed=self.seed, progress=False)
            self.model = StudentTeacher(teacher, self.n_students, self.seed)
            self.history = self.model.fit(train, epochs=self.student_epochs, lr=self.lr, seed=self.seed, val=val,
                                          progress=False)
        self.model.calibrate(val)

    def score_features(self, images: torch.Tensor) -> tuple[np.ndarray, None]:
        return self.model.score_maps(images), None

    def build_model(self, state: dict[str, torch.Tensor]) -> StudentTeacher:
        return StudentTeacher(PatchNet(self.patch_size, self.dim, self.width, self.stride), self.n_students, self.seed)


if __name__ == "__main__":
    main()
