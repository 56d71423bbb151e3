"""The one conversion of any result to numpy: a torch tensor on any device, an array or a list.

Results cross from torch to numpy here (a CUDA tensor cannot go to numpy directly).

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_numpy(x: Any, dtype: type | None = None) -> np.ndarray:
    """A numpy copy (or view) of ``x``: a torch tensor on any device (detached), an array or a list.

    Used by: ``adlib.methods.base.postprocess``, ``adlib.methods.base.to_pixel_maps``, ``adlib.methods.spade.SPADE``.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)
