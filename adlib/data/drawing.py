"""Drawing the toy worlds: object shapes, backgrounds and defects, as boolean masks and float images in [0, 1].

Twenty shapes (:data:`SHAPES`: the toy world's ten first, then ten more for the caption world), the ten digits
(:data:`DIGITS`, sklearn's first handwritten example of each) and eight defects (:data:`DEFECTS`: the toy world's
four, then four more for the caption world). Every function
draws from the generator it is given, in a fixed order, so a scene is a function of its generator's seed.

Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage
from skimage.draw import polygon as _polygon

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "heart", "moon",
                           "arrow", "pentagon", "octagon", "diamond", "oval", "semicircle", "trapezoid", "drop",
                           "bolt", "flower", "house")
DIGITS: tuple[str, ...] = tuple("0123456789")
BACKGROUNDS: tuple[str, ...] = ("plain", "wood", "grass", "stone")
DEFECTS: tuple[str, ...] = ("crack", "hole", "stain", "broken", "scratch", "chip", "spots", "burn")

# outlines of the polygonal shapes, in units of the radius, before rotation (x right, y down)
_OUTLINES = {
    "cross": [(-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33), (0.33, 0.33), (0.33, 1), (-0.33, 1),
              (-0.33, 0.33), (-1, 0.33), (-1, -0.33), (-0.33, -0.33)],
    "arrow": [(-1, -0.25), (0.1, -0.25), (0.1, -0.65), (1, 0), (0.1, 0.65), (0.1, 0.25), (-1, 0.25)],
    "diamond": [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],
    "trapezoid": [(-1, 0.55), (1, 0.55), (0.5, -0.55), (-0.5, -0.55)],
    "bolt": [(-0.2, -1), (0.45, -1), (0.1, -0.15), (0.5, -0.15), (-0.3, 1), (-0.05, 0.1), (-0.45, 0.1)],
    "house": [(-0.7, 1), (0.7, 1), (0.7, -0.1), (0, -1), (-0.7, -0.1)],
}


def _regular(n: int, radius: float, angle: float, inner: float | None = None) -> np.ndarray:
    """Vertices (k, 2) of a regular polygon, or of a star when ``inner`` (radius ratio) is given."""
    k = 2 * n if inner else n
    t = angle + np.arange(k) * 2 * np.pi / k
    r = np.full(k, radius)
    if inner:
        r[1::2] *= inner
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _poly_mask(points: np.ndarray, centre: np.ndarray, size: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    rr, cc = _polygon(points[:, 1] + centre[1], points[:, 0] + centre[0], (size, size))
    mask[rr, cc] = True
    return mask


@lru_cache(maxsize=1)
def _glyphs() -> dict[str, np.ndarray]:
    """The first 8 x 8 example of each digit in sklearn's digits, in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return {d: digits.images[digits.target == int(d)][0] / 16 for d in DIGITS}


def shape_mask(shape: str, size: int, centre: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """(size, size) bool mask of one object of :data:`SHAPES` or :data:`DIGITS` (a digit turns by at most 0.3 rad,
    so a 6 stays a 6); ``centre`` is (x, y) in pixels.

    Used by: ``adlib.data.drawing.draw_object``.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    x, y = xx - centre[0], yy - centre[1]
    r = np.hypot(x, y)
    u, v = _rotate(np.stack([x, y], -1).reshape(-1, 2), -angle).T.reshape(2, size, size)  # the shape's own axes
    if shape in DIGITS:
        a, b = _rotate(np.stack([x, y], -1).reshape(-1, 2), -0.3 * np.sin(angle)).T.reshape(2, size, size)
        cols, rows = (a / (1.8 * radius) + 0.5) * 8 - 0.5, (b / (1.8 * radius) + 0.5) * 8 - 0.5
        return ndimage.map_coordinates(_glyphs()[shape], [rows, cols], order=1, cval=0.0) > 0.35
    if shape == "circle":
        return r <= radius
    if shape == "ring":
        return (r <= radius) & (r >= 0.55 * radius)
    if shape == "moon":
        dx, dy = _rotate(np.array([[0.45 * radius, 0.0]]), angle)[0]
        return (r <= radius) & (np.hypot(x - dx, y - dy) > 0.8 * radius)
    if shape == "heart":
        a, b = _rotate(np.stack([x, y], -1).reshape(-1, 2), -0.3 * np.sin(angle)).T
        a, b = a.reshape(x.shape) / (0.85 * radius), -b.reshape(x.shape) / (0.85 * radius) + 0.15
        return (a**2 + b**2 - 1) ** 3 - a**2 * b**3 <= 0
    if shape == "oval":
        return (u / radius) ** 2 + (v / (0.6 * radius)) ** 2 <= 1
    if shape == "semicircle":  # the flat side's middle sits 0.35 radius off the centre, so the half disc is centred
        return (np.hypot(u, v + 0.35 * radius) <= radius) & (v + 0.35 * radius >= 0)
    if shape == "drop":  # a disc with a point
        tip = _poly_mask(_rotate(radius * np.array([[-0.6, 0.3], [0.6, 0.3], [0, -1.0]]), angle), centre, size)
        return tip | (np.hypot(u, v - 0.3 * radius) <= 0.6 * radius)
    if shape == "flower":  # six round petals
        return r <= radius * (0.7 + 0.3 * np.cos(6 * np.arctan2(v, u)))
    if shape in _OUTLINES:
        return _poly_mask(_rotate(radius * np.array(_OUTLINES[shape], float), angle), centre, size)
    regular = {"square": (4, 0.95, np.pi / 4), "triangle": (3, 1.0, -np.pi / 2), "hexagon": (6, 1.0, 0.0),
               "pentagon": (5, 1.0, -np.pi / 2), "octagon": (8, 1.0, 0.0)}
    if shape in regular:
        n, scale, turn = regular[shape]
        return _poly_mask(_regular(n, radius * scale, angle + turn), centre, size)
    if shape == "star":
        return _poly_mask(_regular(5, radius, angle - np.pi / 2, inner=0.45), centre, size)
    raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES} or a digit.")


def smooth_noise(size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """(size, size) Gaussian-filtered white noise, scaled to unit standard deviation.

    Used by: ``adlib.data.drawing.draw_object``.
    """
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return n / (n.std() + 1e-8)


def background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float image in [0, 1] of one background kind of :data:`BACKGROUNDS`.

    Used by: ``adlib.data.drawing.draw_object``.
    """
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "plain":
        tone = rng.uniform(0.35, 0.75)
        img = np.full((size, size, 3), tone) + 0.03 * smooth_noise(size, size / 4, rng)[..., None]
    elif kind == "wood":
        theta = rng.uniform(-0.3, 0.3)
        u = xx * np.cos(theta) + yy * np.sin(theta) + 0.05 * smooth_noise(size, size / 8, rng)
        grain = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(5, 9) * u)
        img = np.array([0.55, 0.36, 0.18]) * (0.75 + 0.3 * grain[..., None])
    elif kind == "grass":
        blades = ndimage.gaussian_filter(rng.standard_normal((size, size)), (2.0, 0.5))
        img = np.array([0.22, 0.50, 0.16]) * (1 + 0.35 * blades[..., None] / (blades.std() + 1e-8))
    elif kind == "stone":
        n = smooth_noise(size, 2.5, rng) + 0.5 * smooth_noise(size, 0.8, rng)
        img = np.full((size, size, 3), 0.55) + 0.08 * n[..., None]
    else:
        raise ValueError(f"Unknown background {kind!r}; choose one of {BACKGROUNDS}.")
    return np.clip(img, 0, 1)


def _walk(size: int, obj: np.ndarray, rng: np.random.Generator, turn: float, steps: int) -> np.ndarray:
    """A one-pixel random walk from a pixel of the object (heading noise ``turn``), clipped to the image."""
    ys, xs = np.nonzero(obj)
    k = rng.integers(len(ys))
    p, heading = np.array([xs[k], ys[k]], float), rng.uniform(0, 2 * np.pi)
    mask = np.zeros((size, size), bool)
    for _ in range(steps):
        heading += rng.normal(0, turn) if turn else 0.0
        p += (np.cos(heading), np.sin(heading))
        x, y = int(round(p[0])), int(round(p[1]))
        if not (0 <= x < size and 0 <= y < size):
            break
        mask[y, x] = True
    return mask


def _blob(size: int, obj: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular disc centred on a pixel of the object, clipped to it."""
    ys, xs = np.nonzero(obj)
    k = rng.integers(len(ys))
    yy, xx = np.mgrid[0:size, 0:size]
    wobble = 1 + 0.3 * smooth_noise(size, size / 10, rng)
    return (np.hypot(xx - xs[k], yy - ys[k]) <= radius * wobble) & obj


def paint_defect(defect: str, image: np.ndarray, obj: np.ndarray, bg: np.ndarray, centre: np.ndarray,
                 radius: float, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint one defect of :data:`DEFECTS` (or ``"good"``: nothing) onto ``image`` (size, size, 3) in place, on the
    object ``obj`` (size, size) bool of base ``colour`` (3,) drawn over ``bg`` (the background image) at ``centre``
    (x, y) with ``radius``; returns the defect's (size, size) bool mask, never empty for a defect.

    Used by: ``adlib.data.drawing.draw_object``.
    """
    size = obj.shape[0]
    mask = np.zeros((size, size), bool)
    if defect == "crack":
        mask = _walk(size, obj, rng, turn=0.35, steps=3 * size)
        if size >= 64 and rng.integers(0, 2):  # half the cracks of larger images are two pixels wide
            mask = ndimage.binary_dilation(mask)
        mask &= obj
        image[mask] = image[mask] * 0.25 + (0.55 if colour.mean() < 0.3 else 0.0)  # visible on dark objects too
    elif defect == "hole":
        inner = ndimage.binary_erosion(obj, iterations=2)
        mask = _blob(size, inner if inner.any() else obj, radius * 0.22, rng)
        image[mask] = bg[mask] * 0.8  # the background shows through, a little shadowed
    elif defect == "stain":
        mask = _blob(size, obj, radius * rng.uniform(0.2, 0.35), rng)
        image[mask] = 0.35 * image[mask] + 0.65 * np.array([0.35, 0.25, 0.12])
    elif defect == "broken":  # a half-plane cut through the object near its rim removes a chunk
        normal = rng.normal(size=2)
        normal /= np.linalg.norm(normal)
        offset = radius * rng.uniform(0.45, 0.65)
        yy, xx = np.mgrid[0:size, 0:size] / size
        mask = (((xx * size - centre[0]) * normal[0] + (yy * size - centre[1]) * normal[1]) > offset) & obj
        image[mask] = bg[mask]
    elif defect == "scratch":  # a straight, light line: unlike a crack it does not wander, and it is bright
        mask = _walk(size, obj, rng, turn=0.0, steps=int(1.6 * radius)) & obj
        image[mask] = 0.4 * image[mask] + 0.6 * np.array([0.95, 0.95, 0.9])
    elif defect == "chip":  # a small bite out of the rim
        rim = obj & ~ndimage.binary_erosion(obj)
        mask = _blob(size, rim if rim.any() else obj, radius * rng.uniform(0.18, 0.28), rng)
        image[mask] = bg[mask]
    elif defect == "spots":  # a few small dark dots
        yy, xx = np.mgrid[0:size, 0:size]
        ys, xs = np.nonzero(obj)
        for k in rng.integers(len(ys), size=int(rng.integers(3, 7))):
            mask |= np.hypot(xx - xs[k], yy - ys[k]) <= max(0.8, radius * rng.uniform(0.06, 0.1))
        mask &= obj
        image[mask] = 0.3 * image[mask] + 0.7 * np.array([0.15, 0.12, 0.1])
    elif defect == "burn":  # a scorch: darkest in the middle, fading out
        ys, xs = np.nonzero(obj)
        k = rng.integers(len(ys))
        yy, xx = np.mgrid[0:size, 0:size]
        heat = np.exp(-(np.hypot(xx - xs[k], yy - ys[k]) / (radius * rng.uniform(0.25, 0.4))) ** 2)
        mask = (heat > 0.3) & obj
        image[mask] = image[mask] * (1 - 0.85 * heat[mask, None]) + 0.85 * heat[mask, None] * np.array(
            [0.12, 0.07, 0.03])
    elif defect != "good":
        raise ValueError(f"Unknown defect {defect!r}; choose 'good' or one of {DEFECTS}.")
    if defect != "good" and not mask.any():  # the draw missed the object: mark its centre pixel
        cy, cx = np.argwhere(obj)[len(np.argwhere(obj)) // 2]
        mask[cy, cx] = True
        image[cy, cx] = image[cy, cx] * 0.25
    return mask


def draw_object(shape: str, rgb: tuple[float, float, float] | None, large: bool, kind: str, defect: str, size: int,
                rng: np.random.Generator, *, scale: float = 1.0, spill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One object on a background: ((size, size, 3) float image in [0, 1], (size, size) bool defect mask).

    ``shape`` of :data:`SHAPES` or :data:`DIGITS` (None: the background alone), base colour ``rgb``, small or
    ``large``, on background ``kind``, carrying ``defect`` (``"good"``: none); ``scale`` enlarges the object (a
    close-up) and ``spill`` lets that share of its radius leave the frame (a cropped photo).

    Used by: ``adlib.data.toyworld.render``.
    """
    bg = background(kind, size, rng)
    if shape is None:
        return bg, np.zeros((size, size), bool)
    radius = size * (rng.uniform(0.33, 0.40) if large else rng.uniform(0.20, 0.26)) * scale
    margin = radius * (1 - spill) + 1
    centre = rng.uniform(min(margin, size / 2), max(size - margin, size / 2), 2)
    obj = shape_mask(shape, size, centre, radius, rng.uniform(0, 2 * np.pi))
    if obj.sum() < 8:  # a degenerate draw (tiny image): fall back to a disc so every object is visible
        obj = shape_mask("circle", size, centre, radius, 0.0)
    colour = np.clip(np.array(rgb) + rng.normal(0, 0.04, 3), 0, 1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    g = rng.normal(0, 1, 2)
    shade = 1 + 0.12 * (g[0] * (xx - 0.5) + g[1] * (yy - 0.5)) + 0.03 * smooth_noise(size, 1.0, rng)
    image = np.where(obj[..., None], np.clip(colour * shade[..., None], 0, 1), bg)
    mask = paint_defect(defect, image, obj, bg, centre, radius, colour, rng)
    return np.clip(image, 0, 1), mask
