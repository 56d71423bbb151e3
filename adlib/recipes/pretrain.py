"""The book's small pretrained backbones, reproducible offline on a CPU.

ImageNet weights cannot be downloaded on the book's build machines, and random-init features are a weak
floor for patch-kNN detection. This module trains stand-ins on data that ship with scikit-image and
scikit-learn or are rendered from formulas, disjoint from the SynthTex evaluation textures:

- ``fractal``: formula-driven supervised pretraining (FractalDB, Kataoka et al., ACCV 2020): classify
  images rendered from many random iterated-function-system (IFS) fractals, in colour, at several scales;
- ``simclr``: SimCLR (NT-Xent) on random crops of bundled natural photographs;
- ``fractal_simclr``: both losses at every step.

Recipes are chosen by patch-kNN AUROC on :func:`adlib.data.heldout.validation_set` (defects on textures that are
neither SynthTex categories nor training data), never on SynthTex. A run is a fixed number of steps with fixed
seeds and thread count, so it repeats bit for bit on the same machine and library versions::

    python -m adlib pretrain fractal --out adlib/weights/book-resnet18.safetensors

Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from adlib.bench.backbone_probe import patch_knn_scores
from adlib.core.checksum import sha256sum
from adlib.data.fractals import fractal_dataset
from adlib.data.heldout import bundled_image, validation_set
from adlib.features.cnn import Backbone, feature_extractor
from adlib.features.vit import ViTStages, vit_backbone
from adlib.methods.simclr import nt_xent
from adlib.recipes.pretrain_recipes import KINDS, Recipe
from adlib.training.loop import RandomSteps, fit, steps_per_epoch
from adlib.weights import registry

NATURAL_IMAGES = ("astronaut", "coffee", "chelsea", "camera", "coins", "retina", "rocket", "cat", "page",
                  "clock", "colorwheel", "china", "flower")


def natural_images() -> list[torch.Tensor]:
    """The SimCLR training photographs, each (3, H, W) float32; none is a SynthTex or validation source.

    Used by: ``adlib.recipes.pretrain._train``.
    """
    out = []
    for name in NATURAL_IMAGES:
        img = torch.from_numpy(bundled_image(name)).permute(2, 0, 1)[None]
        scale = min(1.0, 512 / max(img.shape[-2:]))  # large photos are shrunk once, so crops stay cheap
        out.append(F.interpolate(img, scale_factor=scale, mode="area")[0] if scale < 1 else img[0])
    return out


def _random_crops(sources: list[torch.Tensor], n: int, size: int, scale: tuple[float, float],
                  gen: torch.Generator) -> torch.Tensor:
    """``n`` random resized crops (n, 3, size, size) from random ``sources`` (area fraction in ``scale``)."""
    out = []
    for _ in range(n):
        img = sources[int(torch.randint(len(sources), (1,), generator=gen))]
        h, w = img.shape[-2:]
        frac = float(torch.empty(1).uniform_(*scale, generator=gen))
        side = max(8, int(min(h, w) * frac ** 0.5))
        top = int(torch.randint(h - side + 1, (1,), generator=gen))
        left = int(torch.randint(w - side + 1, (1,), generator=gen))
        crop = img[None, :, top:top + side, left:left + side]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(out)


def augment(x: torch.Tensor, gen: torch.Generator, strength: float = 0.5) -> torch.Tensor:
    """Per-image flips, 90-degree rotations, colour jitter and grayscale (SimCLR's colour distortion, p 0.8/0.2).

    ``x``: (N, 3, H, W) in [0, 1] -> same shape.

    Used by: ``adlib.recipes.pretrain._train``.
    """
    n = len(x)
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    x = torch.where(u(n, 1, 1, 1) < 0.5, x.flip(-1), x)
    x = torch.stack([torch.rot90(xi, int(k), (1, 2)) for xi, k in zip(x, torch.randint(4, (n,), generator=gen))])
    jitter = u(n, 1, 1, 1) < 0.8
    bright = 1 + strength * 0.8 * (2 * u(n, 1, 1, 1) - 1)
    contrast = 1 + strength * 0.8 * (2 * u(n, 1, 1, 1) - 1)
    sat = 1 + strength * 0.8 * (2 * u(n, 1, 1, 1) - 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    y = (x - mean) * contrast + mean * bright
    gray = y.mean(1, keepdim=True)
    y = gray + (y - gray) * sat
    x = torch.where(jitter, y, x)
    x = torch.where(u(n, 1, 1, 1) < 0.2, x.mean(1, keepdim=True).expand_as(x), x)
    return x.clamp(0, 1)


# ------------------------------------------------------------------------------------------ training
def trunk(recipe: Recipe) -> nn.Module:
    """The network being trained: images (N, 3, crop, crop) -> a list of one map (N, C, h, w), its last stage.

    CNNs: timm's ``features_only`` model up to stage ``recipe.stages``; ViTs: a ``recipe.stages``-block
    timm ViT with ``recipe.patch_size`` patches on ``recipe.crop`` px images, wrapped in
    :class:`adlib.features.vit.ViTStages` (the last block's patch tokens; the ViT's final ``norm`` is not used,
    so it stays at its initial values in the saved weights).

    Used by: ``adlib.recipes.pretrain._train``.
    """
    if recipe.arch.startswith("vit"):
        vit = vit_backbone(recipe.arch, recipe.crop, patch_size=recipe.patch_size, depth=recipe.stages,
                           seed=recipe.seed)
        return ViTStages(vit, (recipe.stages - 1,)).train()
    return feature_extractor(recipe.arch, (recipe.stages,), seed=recipe.seed).train()


def shipped_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict that is saved: the trunk's, under the names ``adlib.features.cnn`` loads (a ViT: timm's).

    Used by: ``adlib.recipes.pretrain._train``.
    """
    net = model.net if isinstance(model, Backbone) else model
    return (net.vit if isinstance(net, ViTStages) else net).state_dict()


def train(recipe: Recipe, log_every: int = 100, checkpoint: str | Path | None = None
          ) -> tuple[dict[str, torch.Tensor], dict]:
    """Run ``recipe``; returns the trunk's state dict (float32) and a log: ``history``
    (:func:`adlib.training.loop.fit`'s, one row per epoch of :func:`adlib.training.loop.steps_per_epoch`
    steps), ``loss`` (its losses) and ``seconds``.
    ``log_every``: print about every that many steps (0: silent); ``checkpoint``: a file to save to after every
    epoch and resume from after an interruption.

    Used by: ``adlib.recipes.pretrain.pretrain_weights``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)  # float sums depend on the thread count: fixed for repeatability
    try:
        return _train(recipe, log_every, checkpoint)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: Recipe, log_every: int, checkpoint: str | Path | None) -> tuple[dict[str, torch.Tensor], dict]:
    if recipe.kind not in KINDS:
        raise ValueError(f"Unknown recipe kind {recipe.kind!r}; choose from {KINDS}.")
    torch.manual_seed(recipe.seed)
    model = trunk(recipe)
    log = {"history": [], "loss": [], "seconds": 0.0}
    if recipe.kind == "random" or recipe.steps == 0:
        return shipped_state(model), log
    # In train mode this probe also moves batch-norm statistics; the shipped weights include that step.
    with torch.no_grad():
        width = model(torch.zeros(1, 3, recipe.crop, recipe.crop))[-1].shape[1]
    heads = nn.ModuleDict()
    use_fractal = recipe.kind in ("fractal", "fractal_simclr")
    use_simclr = recipe.kind in ("simclr", "fractal_simclr")
    start = time.perf_counter()
    if use_fractal:
        images, labels = fractal_dataset(recipe.n_classes, recipe.per_class, recipe.crop + recipe.crop // 4,
                                         recipe.seed)
        heads["cls"] = nn.Linear(width, recipe.n_classes)
    if use_simclr:
        photos = natural_images()
        heads["proj"] = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 128))
    params = list(model.parameters()) + list(heads.parameters())
    if recipe.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    embed = lambda x: model(x)[-1].mean(dim=(2, 3))  # noqa: E731

    def step(gen: torch.Generator) -> dict[str, float]:
        loss = torch.zeros(())
        if use_fractal:
            idx = torch.randint(len(images), (recipe.batch_size,), generator=gen)
            off = torch.randint(recipe.crop // 4 + 1, (2,), generator=gen).tolist()
            x = images[idx, :, off[0]:off[0] + recipe.crop, off[1]:off[1] + recipe.crop].float() / 255
            loss = loss + F.cross_entropy(heads["cls"](embed(augment(x, gen))), labels[idx])
        if use_simclr:
            x = _random_crops(photos, recipe.batch_size, recipe.crop, (0.005, 0.25), gen)
            z = heads["proj"](embed(torch.cat([augment(x, gen), augment(x, gen)])))
            loss = loss + nt_xent(*z.chunk(2), recipe.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": loss.item()}

    per_epoch = steps_per_epoch(recipe.steps)
    model.train()
    log["history"] = fit(step, RandomSteps(per_epoch, recipe.seed), epochs=recipe.steps // per_epoch,
                         checkpoint=checkpoint, state={"model": model, "heads": heads, "optimizer": opt,
                                                       "schedule": sched},
                         seed=recipe.seed, config=asdict(recipe), progress=log_every > 0,
                         log_every=max(1, log_every // per_epoch))
    log["loss"] = [row["loss"] for row in log["history"]]
    log["seconds"] = time.perf_counter() - start
    return shipped_state(model.eval()), log


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> str:
    """Write ``state`` as fp16 safetensors (integer buffers unchanged); returns the file's sha256.

    Used by: ``adlib.recipes.pretrain.pretrain_weights``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(path))
    return sha256sum(path)


def candidates() -> list[dict]:
    """Every pretraining candidate measured when the shipped weights were made (``weights/candidates.json``,
    the table of ``weights/MODEL_CARD.md``): name, arch, recipe (the arguments of ``python -m adlib pretrain``),
    training seconds, final loss, validation and SynthTex patch-kNN AUROC / AUPRO, and ``shipped_as``.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    return json.loads((registry.WEIGHTS_DIR / "candidates.json").read_text())


def validation_model(recipe: Recipe, weights: str | Path | None, image_size: int = 128) -> nn.Module:
    """The trunk of ``recipe`` as the detectors use it, with ``weights`` (a file, a shipped name, or ``None`` for
    random init seeded by ``recipe.seed``): a CNN's stages (1, 2) (those of chapter 2, whatever
    ``recipe.stages``); a ViT's blocks (1, last) for ``image_size`` px. Returns a module mapping images
    (N, 3, S, S) to a list of feature maps, as :func:`adlib.features.cnn.patch_features` expects.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    weights = None if weights is None else str(weights)
    if recipe.arch.startswith("vit"):
        vit = vit_backbone(recipe.arch, image_size, weights=weights, patch_size=recipe.patch_size,
                           depth=recipe.stages, seed=recipe.seed)
        return ViTStages(vit, (1, recipe.stages - 1))
    return feature_extractor(recipe.arch, (1, 2), weights=weights, seed=recipe.seed)


def pretrain_weights(recipe: Recipe, out: str | Path, checkpoint: str | Path | None = None,
                     validate: bool = False) -> dict:
    """Train ``recipe`` (:func:`train`), write its weights to ``out`` (:func:`save_weights`) and return the run's
    summary: the recipe, training seconds, the file's sha256, the last epoch's mean loss and, with ``validate``,
    the patch-kNN AUROC (image and pixel) on :func:`adlib.data.heldout.validation_set`.

    Used by: ``python -m adlib pretrain``.
    """
    state, log = train(recipe, checkpoint=checkpoint)
    sha = save_weights(state, out)
    summary = {"recipe": asdict(recipe), "seconds": round(log["seconds"], 1), "sha256": sha,
               "final_loss": log["loss"][-1] if log["loss"] else None}  # the last epoch's mean
    if validate:
        model = validation_model(recipe, out)
        scores = patch_knn_scores(model, validation_set())
        summary["validation"] = {k: float(np.mean([s[k] for s in scores.values()]))
                                 for k in ("image_auroc", "pixel_auroc")}
    return summary
