"""The two conversions every detector makes: any input to a float image batch, any result to numpy.

Detectors accept numpy arrays or torch tensors on any device; these helpers are the one place where data
crosses between them (a CUDA tensor cannot go to numpy directly).

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_numpy(x: Any, dtype: type | None = None) -> np.ndarray:
    """A numpy copy (or view) of ``x``: a torch tensor on any device (detached), an array or a list.

    Used by: ``adlib.methods.base.postprocess``, ``adlib.methods.base.to_pixel_maps``, ``adlib.methods.knn.SPADE``.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def as_images(images: Any) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] (numpy or torch, any device) as a float32 tensor on the same device.

    Refuses other shapes and values outside [0, 1] (e.g. uint8 images: divide them by 255 first; ImageNet-
    normalised ones: pass the raw images, every backbone normalises them itself).

    Used by: ``adlib.methods.autoencoder.AutoencoderDetector``, ``adlib.methods.base.FeatureDetector``.
    """
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(x.shape)}.")
    if len(x) == 0:
        raise ValueError("got no images (N = 0).")
    x = x.float()
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]: divide uint8 images by "
                         "255, and do not normalise them (the backbone does).")
    return x
