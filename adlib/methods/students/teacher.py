"""The Uninformed Students teacher: a dense patch descriptor network distilled from a pretrained CNN."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adlib.training.loop import fit


def patch_net_depth(patch_size: int, stride: int) -> int:
    """The number L of dilated 3x3 layers that gives receptive field ``patch_size = 2 * stride * 2**L + 1``.

    Used by: ``adlib.methods.students.teacher.PatchNet``.
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

    Used by: ``adlib.methods.students.teacher.train_teacher``.
    """
    z = (d - d.mean(0)) / (d.std(0) + 1e-8)
    corr = z.T @ z / (len(d) - 1)
    return corr.pow(2).sum() - corr.diagonal().pow(2).sum()


@torch.no_grad()
def pretrained_descriptors(extractor: nn.Module, patches: torch.Tensor, size: int = 224,
                           batch_size: int = 256) -> torch.Tensor:
    """The targets the teacher distils: patches (B, 3, p, p) resized to ``size`` px through the pretrained
    ``extractor`` (a ``cnn.feature_extractor``), each stage globally average-pooled: (B, D).

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

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
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


# The shipped teachers (``python -m adlib distill-teacher``): distilled from the ImageNet EfficientNet-Lite0's last
# stage on 64 px views of patches of :func:`teacher_images`; d = 128 as the paper, width 64 (the paper: 128) and
# descriptors on an 8 px grid (the paper: every pixel), so that three students per patch size train for tens of
# epochs within a chapter's CPU budget (whether they converge is measured in the chapter, by the book's rule).
# lambda_c = 0.01: summed over 128 * 127 channel pairs, L_c at weight 1 outweighs L_k at the start and the teacher
# collapses to predicting the targets' mean (its explained variance stays at 0); lr 1e-3 (the paper's 2e-4 is
# for 50,000 ImageNet patches over more steps).
TEACHER_RECIPE = dict(dim=128, width=64, stride=8, n_patches=20_000, target_size=64, epochs=80, batch_size=64,
                      lr=1e-3, lambda_c=0.01)
TEACHER_BACKBONE, TEACHER_LAYERS = "effnet-lite0", (4,)


def load_teacher(weights: str) -> tuple[PatchNet, nn.Linear]:
    """A shipped teacher (e.g. ``"teacher-p17"``, sha256-checked) or a file written by ``python -m
    adlib.methods.students``: the ``PatchNet`` and its decoder, in eval mode.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    from adlib.weights.registry import load_weights

    state = load_weights(weights)
    stored = state.pop("options")  # patch_size, dim, width, stride, as written by main()
    options = dict(zip(("patch_size", "dim", "width", "stride"), map(int, stored)))
    teacher = PatchNet(**options)
    decoder = nn.Linear(options["dim"], state["decoder.weight"].shape[0])
    teacher.load_state_dict({k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")})
    decoder.load_state_dict({k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")})
    return teacher.eval(), decoder.eval()
