"""``show_versions``: printed at the end of every chapter so a result can be traced to its setup; ``cpu_model``:
the CPU a run's numbers come from (bit-for-bit repeats hold on the same model only)."""
from __future__ import annotations

import importlib.metadata as md
import platform

_PACKAGES = ("adlib", "torch", "torchvision", "timm", "open_clip_torch", "numpy", "scikit-learn",
             "scikit-image", "faiss-cpu", "matplotlib")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name", else what ``platform`` knows).

    Used by: ``adlib.eval.scorecard.environment``, ``adlib.recipes.checkpoints.build``.
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def versions(profile: str | None = None, seed: int | None = None) -> dict[str, str]:
    """Python/package versions, the compute device, the seed and the profile, as a dict.

    Used by: ``adlib.core.versions.show_versions``.
    """
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = "not installed"
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    info["seed"] = str(seed)
    info["profile"] = str(profile)
    return info


def show_versions(profile: str | None = None, seed: int | None = None) -> None:
    """Print :func:`versions` as an aligned two-column list (the last cell of every chapter).

    Defined in: "How a chapter is built" (``book/chapter_template.ipynb``).
    """
    info = versions(profile, seed)
    width = max(map(len, info))
    print("\n".join(f"{key:<{width}} : {value}" for key, value in info.items()))
