"""Feature extractors: a timm CNN with hooks on chosen stages, turned into a grid of patch features.

Offline, the book can only use networks it initialises or trains itself; ``weights=None`` gives the
random-init network that serves as the floor every learned feature must beat, and ``weights="book-resnet18"``
the backbone the book pretrains offline (``adlib.pretrain``, shipped in ``adlib/weights`` with a model card).

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = Path(__file__).parent / "weights"


def shipped_weights() -> dict[str, dict]:
    """The backbones shipped with the package (``adlib/weights/registry.json``): name -> file, arch, sha256, ...

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    registry = WEIGHTS_DIR / "registry.json"
    return json.loads(registry.read_text()) if registry.exists() else {}


def load_weights(weights: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A float32 state dict from a shipped name (e.g. ``"book-resnet18"``, sha256-checked) or a local file.

    Local files may be ``.safetensors`` or a ``torch.save`` checkpoint (``.pth``/``.bin``/``.pt``).

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    registry = shipped_weights()
    if str(weights) in registry:
        entry = registry[str(weights)]
        path = WEIGHTS_DIR / entry["file"]
        if not path.exists():
            raise FileNotFoundError(f"The weights file {path} of {weights!r} is missing; reinstall adlib or "
                                    f"rebuild it with: {entry['command']}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            raise ValueError(f"sha256 mismatch for {path}: expected {entry['sha256']}, got {digest}. The file "
                             f"is corrupt or was replaced; reinstall adlib or rebuild it with: {entry['command']}")
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"No weights {str(weights)!r}: neither a shipped name "
                                    f"({sorted(registry)}) nor an existing file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _timm_pretrained(name: str, caller: str, **options) -> nn.Module:
    """timm's ImageNet weights from the hub (or its cache), with an actionable error offline.

    ``caller`` names the public function, so the message says which call to repeat with a local file.
    """
    try:
        return timm.create_model(name, pretrained=True, **options)
    except Exception as err:  # timm raises hub, OS or runtime errors depending on what is missing
        cfg = timm.models.get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None) or name
        raise RuntimeError(
            f"Could not get timm's pretrained weights of {name!r} ({type(err).__name__}). Offline (or with "
            f"HF_HUB_OFFLINE=1), download 'model.safetensors' from https://huggingface.co/{repo} on a machine "
            f"with internet and pass its path: {caller}({name!r}, ..., weights='/path/to/"
            f"model.safetensors'), or copy that machine's ~/.cache/huggingface/hub here."
        ) from err


def _shipped_entry(weights: str | None, name: str, caller: str) -> dict | None:
    """The registry entry of a shipped ``weights`` name (None for any other weights), checked against ``name``."""
    entry = shipped_weights().get(str(weights)) if weights is not None else None
    if entry is not None and entry["arch"] != name:
        raise ValueError(f"{weights!r} is a {entry['arch']!r}; call {caller}({entry['arch']!r}, ...).")
    return entry


def feature_extractor(name: str = "resnet18", layers: tuple[int, ...] = (1, 2), weights: str | None = None,
                      seed: int = 0) -> nn.Module:
    """A timm model returning the feature maps of stages ``layers`` (timm's ``features_only``), in eval mode.

    ``weights``: ``None`` = random initialisation, seeded by ``seed`` so the features repeat exactly; a
    shipped name (:func:`shipped_weights`, e.g. ``"book-resnet18"``, trained offline by ``adlib.pretrain``);
    ``"imagenet"`` = timm's pretrained weights (paper profile; needs the hub or its cache); or the path of a
    local weights file. Shipped backbones expect images in [0, 1] without ImageNet normalisation.
    """
    if weights == "imagenet":
        return _timm_pretrained(name, "feature_extractor", features_only=True, out_indices=layers).eval()
    entry = _shipped_entry(weights, name, "feature_extractor")
    if entry is not None:
        if max(layers) > entry["max_stage"]:
            raise ValueError(f"{weights!r} ships stages 0-{entry['max_stage']} only; got layers={layers}.")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, features_only=True, out_indices=layers)
    if weights is not None:
        # Extra keys (a classifier, stages beyond the last requested one) are expected; missing ones are not.
        missing, _ = model.load_state_dict(load_weights(weights), strict=False)
        if missing:
            raise ValueError(f"weights {str(weights)!r} lack {len(missing)} tensors of {name!r} stages {layers}, "
                             f"e.g. {missing[:3]}; they were trained for another architecture or fewer stages.")
    return model.eval()


@torch.no_grad()
def patch_features(model: nn.Module, images: torch.Tensor, pool: int = 3, grid: int | None = None,
                   batch_size: int = 32) -> torch.Tensor:
    """Patch features (N, C, grid, grid) for images (N, 3, H, W): every stage resized to one grid.

    Each stage's map is averaged over a ``pool`` x ``pool`` neighbourhood (stride 1) first, so a patch
    feature describes its surroundings (as PatchCore's local aggregation), then resized bilinearly to
    ``grid`` x ``grid`` (default: the first stage's grid) and concatenated along channels. A coarser grid
    costs less: a kNN search grows with the square of the number of patches.
    """
    out = []
    for batch in torch.split(images, batch_size):
        maps = model(batch)
        maps = [F.avg_pool2d(m, pool, stride=1, padding=pool // 2) for m in maps]
        size = maps[0].shape[-2:] if grid is None else (grid, grid)
        out.append(torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                              for m in maps], dim=1))
    return torch.cat(out)


def vit_backbone(name: str = "vit_base_patch16_224", image_size: int = 224, weights: str | None = None,
                 patch_size: int | None = None, depth: int | None = None, seed: int = 0) -> nn.Module:
    """A timm Vision Transformer for ``image_size`` px inputs, without classifier, in eval mode (for
    :func:`vit_patch_tokens`).

    ``weights`` as in :func:`feature_extractor`: ``None`` = random init seeded by ``seed``, ``"imagenet"`` =
    timm's pretrained weights (needs the hub or its cache), a shipped name (e.g. ``"book-vit-tiny"``, whose
    patch size and depth come from the registry) or a local file. Position embeddings are resized to
    ``image_size``. ``patch_size`` and ``depth`` (number of blocks) override the architecture's; pretrained
    weights fix them. Tensors of a weights file that the model lacks (e.g. a classifier head) are ignored;
    tensors the model needs but the file lacks are an error.

    Defined in: "ViT-KNN" (``notebooks/08_vit_knn.ipynb``).
    """
    options = {"img_size": image_size, "num_classes": 0} | ({"patch_size": patch_size} if patch_size else {}) | (
        {"depth": depth} if depth else {})
    if weights == "imagenet":
        if patch_size or depth:
            raise ValueError("patch_size and depth cannot change with pretrained weights; leave them None.")
        return _timm_pretrained(name, "vit_backbone", **options).eval()
    entry = _shipped_entry(weights, name, "vit_backbone")
    if entry is not None:
        fixed = entry.get("options", {})
        clash = {k: v for k, v in fixed.items() if k in options and options[k] != v}
        if clash:
            raise ValueError(f"{weights!r} was trained with {fixed}; leave {sorted(clash)} unset.")
        options |= fixed
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **options)
    if weights is not None:
        state = load_weights(weights)
        if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
            from timm.layers import resample_abs_pos_embed
            prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(model.patch_embed.grid_size),
                                                        num_prefix_tokens=prefix)
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"weights {str(weights)!r} lack {len(missing)} tensors of {name!r}, e.g. "
                             f"{missing[:3]}; they were trained for another architecture.")
    return model.eval()


class ViTStages(nn.Module):
    """A timm ViT seen like a ``features_only`` CNN: ``forward`` returns the patch-token maps of ``blocks``.

    images (N, 3, H, W) -> list of (N, C, H / patch, W / patch), class token dropped; blocks after the
    last requested one are not run. :func:`patch_features` and ``adlib.pretrain`` use it like a CNN trunk.

    Defined in: "ViT-KNN" (``notebooks/08_vit_knn.ipynb``).
    """

    def __init__(self, vit: nn.Module, blocks: tuple[int, ...]):
        super().__init__()
        depth = len(vit.blocks)
        if not blocks or min(blocks) < 0 or max(blocks) >= depth:
            raise ValueError(f"blocks must be indices in 0..{depth - 1} of the model's {depth} blocks, got {blocks}.")
        self.vit, self.blocks = vit, tuple(blocks)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.vit.forward_intermediates(images, indices=list(self.blocks), stop_early=True,
                                              output_fmt="NCHW", intermediates_only=True)


@torch.no_grad()
def vit_patch_tokens(model: nn.Module, images: torch.Tensor, blocks: tuple[int, ...] = (5, 8),
                     batch_size: int = 32) -> torch.Tensor:
    """Patch tokens of the ViT blocks ``blocks`` (0-based) as a feature grid: images (N, 3, H, W) ->
    (N, C * len(blocks), H / patch, W / patch), blocks concatenated along channels, class token dropped.

    Defined in: "ViT-KNN" (``notebooks/08_vit_knn.ipynb``).
    """
    stages = ViTStages(model, blocks)
    return torch.cat([torch.cat(stages(batch), dim=1) for batch in torch.split(images, batch_size)])
