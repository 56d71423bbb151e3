"""SynthTex's defects: scratch, crack, hole, stain and cut-paste, drawn on a texture with their masks."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

DEFECTS: tuple[str, ...] = ("scratch", "crack", "hole", "stain", "cut_paste")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: Defect area as a fraction of the image: from a few pixels' scratch to a medium blob.
AREA_RANGE = (0.003, 0.08)


# --------------------------------------------------------------------------- defects


def add_defect(
    image: np.ndarray, defect: str, rng: np.random.Generator, donor: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one ``defect`` on a copy of ``image``; return ``(defective, mask)``.

    ``image``: (H, W, 3) float32 in [0, 1]; ``defective``: same shape and dtype; ``mask``: (H, W) bool,
    True exactly where pixels were changed (pixels outside it are bit-identical to ``image``). The area
    is within ``AREA_RANGE`` of H*W and the contrast is drawn at random from subtle to obvious.
    ``cut_paste`` needs ``donor``: another (H, W, 3) image, of the same or another category.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    if defect not in DEFECTS:
        raise ValueError(f"Unknown SynthTex defect {defect!r}; choose from {DEFECTS}.")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 32:
        raise ValueError(f"image must be (H, W, 3) with H, W >= 32, got shape {image.shape}.")
    if defect == "cut_paste" and (donor is None or donor.shape != image.shape):
        got = None if donor is None else donor.shape
        raise ValueError(f"cut_paste needs donor=, an image of the same shape {image.shape}; got {got}.")
    image = image.astype(np.float32)
    for _ in range(100):  # redraw the rare shape whose area falls outside AREA_RANGE
        out, mask = _DRAW[defect](image, rng, donor)
        if AREA_RANGE[0] <= mask.mean() <= AREA_RANGE[1]:
            # Defects reuse the image's own range of values per channel, so no empty histogram bin
            # fills up to give them away; their shape and place must.
            lo, hi = np.quantile(image.reshape(-1, 3), [0.01, 0.99], axis=0)
            return np.where(mask[..., None], np.clip(out, lo, hi), image).astype(np.float32), mask
    raise RuntimeError(f"Could not draw a {defect} of area {AREA_RANGE} on an image of shape {image.shape}.")


def _stroke(shape: tuple[int, int], paths: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Opacity (H, W) in [0, 1] of polylines ``(points (n, 2) row/col, widths (n,))``, anti-aliased.

    Below 1/4 the opacity is set to 0, so the binarised stroke (> 0) is exactly where pixels change.
    """
    centre = np.zeros(shape, bool)
    width = np.zeros(shape, np.float32)
    for pts, w in paths:
        rc = np.round(pts).astype(int)
        keep = (rc[:, 0] >= 0) & (rc[:, 0] < shape[0]) & (rc[:, 1] >= 0) & (rc[:, 1] < shape[1])
        centre[rc[keep, 0], rc[keep, 1]] = True
        width[rc[keep, 0], rc[keep, 1]] = np.maximum(width[rc[keep, 0], rc[keep, 1]], w[keep])
    if not centre.any():
        return width
    dist, (ri, ci) = ndimage.distance_transform_edt(~centre, return_indices=True)
    alpha = np.clip(width[ri, ci] / 2 + 0.5 - dist, 0, 1).astype(np.float32)
    alpha[alpha < 0.25] = 0
    return alpha


def _blob(shape: tuple[int, int], centre: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Signed "insideness" (H, W) of an irregular blob: > 0 inside, about 1 at its centre."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    rho2 = ((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / radius**2
    wobble = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), radius / 2.5, mode="wrap")
    wobble /= wobble.std() + 1e-8
    return np.where(rho2 < 2.25, 1 - rho2 + 0.45 * wobble, -1.0)


def _scratch(image: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    s = h / 128
    length = rng.uniform(0.25, 0.7) * h
    p0 = rng.uniform(0.1, 0.9, 2) * (h, w)
    heading = rng.uniform(0, 2 * np.pi)
    p3 = p0 + length * np.array([np.sin(heading), np.cos(heading)])
    normal = np.array([np.cos(heading), -np.sin(heading)])
    p1, p2 = (p0 + (p3 - p0) * f + normal * rng.uniform(-0.3, 0.3) * length for f in (1 / 3, 2 / 3))
    t = np.linspace(0, 1, int(4 * length))[:, None]
    pts = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
    alpha = _stroke((h, w), [(pts, np.full(len(pts), max(1.0, rng.uniform(1.0, 2.2) * s)))])
    sign = 1.0 if rng.random() < 0.6 else -1.0  # mostly bright: a scratch exposes lighter material
    return image + sign * rng.uniform(0.12, 0.45) * alpha[..., None], alpha > 0


def _walk(start: np.ndarray, heading: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random walk of ``n`` unit steps with persistent heading: (n, 2) row/col points."""
    headings = heading + np.cumsum(rng.normal(0, 0.25, n))
    return start + np.cumsum(np.stack([np.sin(headings), np.cos(headings)], 1), 0)


def _crack(image: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    s = h / 128
    n = int(rng.uniform(0.25, 0.6) * h)
    main = _walk(rng.uniform(0.15, 0.85, 2) * (h, w), rng.uniform(0, 2 * np.pi), n, rng)
    width = max(1.0, rng.uniform(1.2, 2.5) * s)
    paths = [(main, np.linspace(width, 1.0, n))]  # tapers towards its tip
    for _ in range(rng.integers(1, 4)):
        k = rng.integers(n // 5, n)
        step = main[k] - main[k - 1]
        heading = np.arctan2(step[0], step[1]) + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0)
        m = int(n * rng.uniform(0.2, 0.5))
        paths.append((_walk(main[k], heading, m, rng), np.linspace(max(1.0, width * 0.7), 1.0, m)))
    alpha = _stroke((h, w), paths)
    return image * (1 - rng.uniform(0.35, 0.8) * alpha[..., None]), alpha > 0


def _hole(image: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    s = h / 128
    radius = max(2.5, rng.uniform(4.5, 14) * s)
    centre = rng.uniform(radius, (h - radius, w - radius))
    inside = _blob((h, w), centre, radius, rng)
    rim = max(1.0, 2 * s) * 2 / radius  # a raised, lit rim of ~2 px (``inside`` drops 2/radius per px)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    light = np.cos(np.arctan2(y - centre[0], x - centre[1]) - rng.uniform(0, 2 * np.pi))
    depth = rng.uniform(0.35, 0.85)
    pit = depth * (0.6 + 0.4 * np.clip(inside / 0.35, 0, 1)) * (0.8 + 0.2 * light)
    factor = np.where(inside > 0, 1 - pit, np.where(inside > -rim, 1 + 0.15 * depth * light, 1.0))
    return image * factor[..., None].astype(np.float32), inside > -rim


def _stain(image: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    radius = rng.uniform(5, 18) * h / 128
    inside = _blob((h, w), rng.uniform(radius, (h - radius, w - radius)), radius, rng)
    alpha = (np.clip(inside / 0.3, 0, 1) * rng.uniform(0.4, 0.9))[..., None].astype(np.float32)
    if rng.random() < 0.5:
        # A hue shift orthogonal to luma: brightness (and so the global mean) stays put.
        shift = rng.standard_normal(3).astype(np.float32)
        shift -= shift @ _LUMA / (_LUMA @ _LUMA) * _LUMA
        out = image + alpha * rng.uniform(0.12, 0.35) * shift / np.linalg.norm(shift)
    else:
        out = image * (1 - alpha * (1 - rng.uniform(0.4, 0.85, 3).astype(np.float32)))
    return out, inside > 0


def _cut_paste(image: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    if rng.random() < 0.5:
        bh, bw = (rng.uniform(0.08, 0.28, 2) * (h, w)).astype(int) + 1
        shape = np.ones((bh, bw), bool)
    else:
        r = rng.uniform(0.06, 0.16) * h
        bh = bw = int(2 * 1.5 * r) + 1
        shape = _blob((bh, bw), np.array([bh / 2, bw / 2]), r, rng) > 0
    ty, tx = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
    sy, sx = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
    patch = donor[sy : sy + bh, sx : sx + bw][shape]
    if rng.random() < 0.5:  # colour-matched: each channel mapped onto the image's own distribution
        ranks = (patch.argsort(0).argsort(0) + 0.5) / len(patch)
        patch = np.stack([np.quantile(image[..., c], ranks[:, c]) for c in range(3)], 1)
    out = image.copy()
    out[ty : ty + bh, tx : tx + bw][shape] = patch
    mask = np.zeros((h, w), bool)
    mask[ty : ty + bh, tx : tx + bw] = shape
    return out, mask


_DRAW = {"scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _stain, "cut_paste": _cut_paste}
