"""What a detector returns: image scores, anomaly maps and any extra per-image numbers, in one object."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Scores:
    """A detector's verdict on an :class:`adlib.data.imageset.ImageSet` of N images (higher = more anomalous).

    ``image`` (N,) float64 image scores; ``maps`` (N, H, W) float64 anomaly maps at the images' size, or None for
    a method that scores whole images only; ``extras``: other (N, ...) arrays a method computes on the way (e.g.
    SPADE's distance to the nearest training images), by name.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """

    image: np.ndarray
    maps: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        image = np.asarray(self.image, dtype=np.float64).reshape(-1)
        maps = None if self.maps is None else np.asarray(self.maps, dtype=np.float64)
        if maps is not None and (maps.ndim != 3 or len(maps) != len(image)):
            raise ValueError(f"maps must be (N, H, W) for N = {len(image)} image scores, got {maps.shape}.")
        object.__setattr__(self, "image", image)
        object.__setattr__(self, "maps", maps)

    def __len__(self) -> int:
        return len(self.image)
