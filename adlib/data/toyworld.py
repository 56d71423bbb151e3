"""The toy world: small procedural images of objects with captions and pixel-exact defect masks.

A scene is one object (a shape) of some colour and size on a background; an object is either intact
(``"good"``) or carries one defect (``crack``, ``hole``, ``stain``, ``broken``) whose pixels are given by a
mask. Captions come from a small grammar, e.g. ``"a photo of a small red star on wood."``. Defects are
rare and usually *unnamed* in captions, so a CLIP trained on this world learns objects, colours and
backgrounds but not "damaged" (real CLIP's blind spot, the premise of AA-CLIP).

Every scene depends only on ``(seed, index)``: ``sample(10, seed=0)`` is the first ten scenes of
``sample(1000, seed=0)``. Images are rendered, quantised to 8 bits like a photo and returned as an
:class:`adlib.data.imageset.ImageSet`; ``export_mvtec`` writes them as an MVTec-format benchmark.

Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import polygon as _polygon

from adlib.data.imageset import ImageSet

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring",
                           "hexagon", "heart", "moon", "arrow")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10), "orange": (0.95, 0.55, 0.05), "yellow": (0.95, 0.88, 0.15),
    "green": (0.15, 0.65, 0.20), "blue": (0.12, 0.30, 0.85), "purple": (0.55, 0.20, 0.70),
    "white": (0.93, 0.93, 0.93), "black": (0.10, 0.10, 0.10),
}
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("plain", "wood", "grass", "stone")
DEFECTS: tuple[str, ...] = ("crack", "hole", "stain", "broken")
#: The adjective a caption uses when it names a defect.
DEFECT_WORDS: dict[str, str] = {"crack": "cracked", "hole": "holed", "stain": "stained", "broken": "broken"}

_BG_PHRASE = {"plain": "a plain background", "wood": "wood", "grass": "grass", "stone": "stone"}
_TEMPLATES = ("a photo of a {size} {colour} {shape} on {bg}.", "a photo of a {colour} {shape}.",
              "a {colour} {shape} on {bg}.", "a {size} {shape} on {bg}.", "a photo of a {shape}.",
              "a {size} {colour} {shape}.", "a picture of a {shape} on {bg}.")


class Scene(NamedTuple):
    """What a toy image shows; ``defect`` is ``"good"`` for an intact object.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """

    shape: str
    colour: str
    size: str
    background: str
    defect: str


class ToyData(NamedTuple):
    """A batch of captioned toy scenes: ``images`` an :class:`adlib.data.imageset.ImageSet` ((N, 3, H, W) in [0, 1];
    ``labels`` 1 = defective, ``masks`` the defect's pixels, ``defects``, ``objects`` = shapes), ``captions`` N strings,
    ``classes`` (N,) int64 (each shape's index in the ``shapes`` asked for), ``scenes`` N :class:`Scene`.

    Used by: ``adlib.data.toyworld.sample``.
    """

    images: ImageSet
    captions: list[str]
    classes: np.ndarray
    scenes: list[Scene]


# --------------------------------------------------------------------------- drawing


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


def shape_mask(shape: str, size: int, centre: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """(size, size) bool mask of one object; ``centre`` is (x, y) in pixels.

    Used by: ``adlib.data.toyworld.render``.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    x, y = xx - centre[0], yy - centre[1]
    r = np.hypot(x, y)
    if shape == "circle":
        return r <= radius
    if shape == "ring":
        return (r <= radius) & (r >= 0.55 * radius)
    if shape == "moon":
        dx, dy = _rotate(np.array([[0.45 * radius, 0.0]]), angle)[0]
        return (r <= radius) & (np.hypot(x - dx, y - dy) > 0.8 * radius)
    if shape == "heart":
        u, v = _rotate(np.stack([x, y], -1).reshape(-1, 2), -0.3 * np.sin(angle)).T
        u, v = u.reshape(x.shape) / (0.85 * radius), -v.reshape(x.shape) / (0.85 * radius) + 0.15
        return (u**2 + v**2 - 1) ** 3 - u**2 * v**3 <= 0
    if shape == "square":
        pts = _regular(4, radius * 0.95, angle + np.pi / 4)
    elif shape == "triangle":
        pts = _regular(3, radius, angle - np.pi / 2)
    elif shape == "hexagon":
        pts = _regular(6, radius, angle)
    elif shape == "star":
        pts = _regular(5, radius, angle - np.pi / 2, inner=0.45)
    elif shape == "cross":
        a, b = radius, 0.33 * radius
        pts = _rotate(np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a],
                                [-b, b], [-a, b], [-a, -b], [-b, -b]]), angle)
    elif shape == "arrow":
        a = radius
        pts = _rotate(np.array([[-a, -0.25 * a], [0.1 * a, -0.25 * a], [0.1 * a, -0.65 * a], [a, 0],
                                [0.1 * a, 0.65 * a], [0.1 * a, 0.25 * a], [-a, 0.25 * a]]), angle)
    else:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}.")
    return _poly_mask(pts, centre, size)


def _smooth_noise(size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return n / (n.std() + 1e-8)


def background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float image in [0, 1] of one background kind.

    Used by: ``adlib.data.toyworld.Scene``, ``adlib.data.toyworld.render``.
    """
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "plain":
        tone = rng.uniform(0.35, 0.75)
        img = np.full((size, size, 3), tone) + 0.03 * _smooth_noise(size, size / 4, rng)[..., None]
    elif kind == "wood":
        theta = rng.uniform(-0.3, 0.3)
        u = xx * np.cos(theta) + yy * np.sin(theta) + 0.05 * _smooth_noise(size, size / 8, rng)
        grain = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(5, 9) * u)
        img = np.array([0.55, 0.36, 0.18]) * (0.75 + 0.3 * grain[..., None])
    elif kind == "grass":
        blades = ndimage.gaussian_filter(rng.standard_normal((size, size)), (2.0, 0.5))
        img = np.array([0.22, 0.50, 0.16]) * (1 + 0.35 * blades[..., None] / (blades.std() + 1e-8))
    elif kind == "stone":
        n = _smooth_noise(size, 2.5, rng) + 0.5 * _smooth_noise(size, 0.8, rng)
        img = np.full((size, size, 3), 0.55) + 0.08 * n[..., None]
    else:
        raise ValueError(f"Unknown background {kind!r}; choose one of {BACKGROUNDS}.")
    return np.clip(img, 0, 1)


def _crack(size: int, obj: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A thin random walk across the object; the mask is the walked pixels inside it."""
    ys, xs = np.nonzero(obj)
    k = rng.integers(len(ys))
    p, heading = np.array([xs[k], ys[k]], float), rng.uniform(0, 2 * np.pi)
    mask = np.zeros((size, size), bool)
    for _ in range(3 * size):
        heading += rng.normal(0, 0.35)
        p += (np.cos(heading), np.sin(heading))
        x, y = int(round(p[0])), int(round(p[1]))
        if not (0 <= x < size and 0 <= y < size):
            break
        mask[y, x] = True
    mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(0, 2)) if size >= 64 else 0) | mask
    return mask & obj


def _blob(size: int, obj: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular disc centred on a pixel of the object, clipped to it."""
    ys, xs = np.nonzero(obj)
    k = rng.integers(len(ys))
    yy, xx = np.mgrid[0:size, 0:size]
    wobble = 1 + 0.3 * _smooth_noise(size, size / 10, rng)
    return (np.hypot(xx - xs[k], yy - ys[k]) <= radius * wobble) & obj


def render(scene: Scene, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene: ((size, size, 3) float image in [0, 1], (size, size) bool defect mask).

    Used by: ``adlib.data.toyworld.sample``.
    """
    bg = background(scene.background, size, rng)
    radius = size * (rng.uniform(0.20, 0.26) if scene.size == "small" else rng.uniform(0.33, 0.40))
    margin = radius + 1
    centre = rng.uniform(margin, size - margin, 2)
    obj = shape_mask(scene.shape, size, centre, radius, rng.uniform(0, 2 * np.pi))
    if obj.sum() < 8:  # a degenerate draw (tiny image): fall back to a disc so every object is visible
        obj = shape_mask("circle", size, centre, radius, 0.0)
    colour = np.clip(np.array(COLOURS[scene.colour]) + rng.normal(0, 0.04, 3), 0, 1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    g = rng.normal(0, 1, 2)
    shade = 1 + 0.12 * (g[0] * (xx - 0.5) + g[1] * (yy - 0.5)) + 0.03 * _smooth_noise(size, 1.0, rng)
    fill = np.clip(colour * shade[..., None], 0, 1)
    image = np.where(obj[..., None], fill, bg)
    mask = np.zeros((size, size), bool)
    if scene.defect == "crack":
        mask = _crack(size, obj, rng)
        image[mask] = image[mask] * 0.25 + (0.55 if colour.mean() < 0.3 else 0.0)  # visible on dark objects too
    elif scene.defect == "hole":
        inner = ndimage.binary_erosion(obj, iterations=2)
        mask = _blob(size, inner if inner.any() else obj, radius * 0.22, rng)
        image[mask] = bg[mask] * 0.8  # the background shows through, a little shadowed
    elif scene.defect == "stain":
        mask = _blob(size, obj, radius * rng.uniform(0.2, 0.35), rng)
        stain = np.array([0.35, 0.25, 0.12])
        image[mask] = 0.35 * image[mask] + 0.65 * stain
    elif scene.defect == "broken":
        # A half-plane cut through the object near its rim removes a chunk; the background shows.
        normal = rng.normal(size=2)
        normal /= np.linalg.norm(normal)
        offset = radius * rng.uniform(0.45, 0.65)
        side = ((xx * size - centre[0]) * normal[0] + (yy * size - centre[1]) * normal[1]) > offset
        mask = side & obj
        image[mask] = bg[mask]
    elif scene.defect != "good":
        raise ValueError(f"Unknown defect {scene.defect!r}; choose 'good' or one of {DEFECTS}.")
    if scene.defect != "good" and not mask.any():  # the draw missed the object: mark its centre pixel
        cy, cx = np.argwhere(obj)[len(np.argwhere(obj)) // 2]
        mask[cy, cx] = True
        image[cy, cx] = image[cy, cx] * 0.25
    return np.clip(image, 0, 1), mask


def caption(scene: Scene, rng: np.random.Generator, name_defect: bool = False) -> str:
    """One caption from the grammar; the defect is named (``"a cracked red star"``) only if asked.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    text = _TEMPLATES[rng.integers(len(_TEMPLATES))].format(
        size=scene.size, colour=scene.colour, shape=scene.shape, bg=_BG_PHRASE[scene.background])
    if name_defect and scene.defect != "good":
        word = DEFECT_WORDS[scene.defect]
        for art in ("a photo of a ", "a picture of a ", "a "):
            if text.startswith(art):
                return art + word + " " + text[len(art):]
    return text


def match_matrix(captions: Sequence[str], scenes: Sequence[Scene]) -> np.ndarray:
    """(len(scenes), len(captions)) bool: entry (i, j) says whether caption j is true of scene i: every
    shape, colour, size, background and defect word it uses matches (an unnamed defect does not make it false, as
    with real captions).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    vocabs = (SHAPES, tuple(COLOURS), SIZES, BACKGROUNDS, tuple(DEFECT_WORDS.values()))
    required = np.full((len(captions), len(vocabs)), -1)  # -1: the caption does not mention this attribute
    for j, text in enumerate(captions):
        words = set(text.replace(".", " ").split())
        for k, vocab in enumerate(vocabs):
            hits = [v for v in vocab if v in words]
            if hits:
                required[j, k] = vocab.index(hits[0])
    values = np.array([[SHAPES.index(s.shape), tuple(COLOURS).index(s.colour), SIZES.index(s.size),
                        BACKGROUNDS.index(s.background), DEFECTS.index(s.defect) if s.defect in DEFECTS else -2]
                       for s in scenes]).reshape(len(scenes), len(vocabs))
    return ((required[None] == -1) | (required[None] == values[:, None])).all(-1)


# --------------------------------------------------------------------------- batches


def _check_names(names: Sequence[str], valid: Sequence[str], what: str) -> tuple[str, ...]:
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise ValueError(f"Unknown or empty {what} {bad or list(names)}; choose from {list(valid)}.")
    return tuple(names)


def sample(n: int, seed: int = 0, *, image_size: int = 64, shapes: Sequence[str] = SHAPES, defect_rate: float = 0.1,
           name_defect_rate: float = 0.1, defects: Sequence[str] = DEFECTS) -> ToyData:
    """Draw ``n`` scenes; scene ``i`` depends only on ``(seed, i)`` and the arguments.

    ``defect_rate``: probability that an object carries a defect; ``name_defect_rate``: probability that
    the caption of a defective object names it. ``classes`` index ``shapes``; ``images.labels`` mark the
    defective objects.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    if n < 0 or image_size < 16:
        raise ValueError(f"Need n >= 0 and image_size >= 16, got n={n}, image_size={image_size}.")
    if not (0 <= defect_rate <= 1 and 0 <= name_defect_rate <= 1):
        raise ValueError("defect_rate and name_defect_rate are probabilities: give values in [0, 1].")
    shapes = _check_names(shapes, SHAPES, "shapes")
    defects = _check_names(defects, DEFECTS, "defects")
    colours, drawn, classes = tuple(COLOURS), [], np.zeros(n, np.int64)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        classes[i] = rng.integers(len(shapes))
        defect = defects[rng.integers(len(defects))] if rng.random() < defect_rate else "good"
        drawn.append((Scene(shapes[classes[i]], colours[rng.integers(len(colours))], SIZES[rng.integers(2)],
                            BACKGROUNDS[rng.integers(len(BACKGROUNDS))], defect), rng))
    images, masks = _pixels(drawn, image_size)  # render every scene, quantised to 8 bits
    # Each scene's own generator goes on from where its rendering left it: the caption comes last.
    captions = [caption(scene, rng, name_defect=rng.random() < name_defect_rate) for scene, rng in drawn]
    scenes = [scene for scene, _ in drawn]
    labelled = ImageSet.from_uint8(images, labels=[int(sc.defect != "good") for sc in scenes], masks=masks,
                                   defects=[sc.defect for sc in scenes], objects=[sc.shape for sc in scenes])
    return ToyData(labelled, captions, classes, scenes)


def _pixels(drawn: Sequence[tuple[Scene, np.random.Generator]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render every (scene, its generator) and quantise: ((n, size, size, 3) uint8, (n, size, size) bool masks)."""
    images = np.zeros((len(drawn), size, size, 3), np.uint8)
    masks = np.zeros((len(drawn), size, size), bool)
    for i, (scene, rng) in enumerate(drawn):
        image, masks[i] = render(scene, size, rng)
        images[i] = np.round(image * 255)
    return images, masks


def _render_scenes(shape: str, defect: str, n: int, seed: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of :func:`scenes_of` as :func:`_pixels` gives them."""
    _check_names([shape], SHAPES, "shape")
    colours, drawn = tuple(COLOURS), []
    for i in range(n):
        rng = np.random.default_rng([seed, SHAPES.index(shape), (("good",) + DEFECTS).index(defect), i])
        drawn.append((Scene(shape, colours[rng.integers(len(colours))], SIZES[rng.integers(2)],
                            BACKGROUNDS[rng.integers(len(BACKGROUNDS))], defect), rng))
    return _pixels(drawn, image_size)


def scenes_of(shape: str, defect: str, n: int, seed: int, image_size: int = 64) -> ImageSet:
    """``n`` images of one shape in one state (random colour, size, background): an
    :class:`adlib.data.imageset.ImageSet` with labels (1 unless ``"good"``), masks, defects and objects filled in.

    Used by: ``adlib.data.toyworld.labelled_set``.
    """
    images, masks = _render_scenes(shape, defect, n, seed, image_size)
    return ImageSet.from_uint8(images, labels=[int(defect != "good")] * n, masks=masks, defects=[defect] * n,
                               objects=[shape] * n)


def labelled_set(shapes: Sequence[str], n_good: int, n_per_defect: int, seed: int, image_size: int = 64) -> ImageSet:
    """``n_good`` intact and ``n_per_defect`` images of every defect of each shape (good first, then :data:`DEFECTS`):
    the :func:`scenes_of` sets joined, the pictures :func:`export_mvtec` writes as one shape's test split.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    shapes = _check_names(shapes, SHAPES, "shapes")
    return ImageSet.concat([scenes_of(shape, defect, n, seed, image_size) for shape in shapes
                            for defect, n in [("good", n_good)] + [(d, n_per_defect) for d in DEFECTS]])


def export_mvtec(
    root: str | os.PathLike,
    shapes: Sequence[str] = ("star", "ring", "cross"),
    *,
    n_train: int = 40,
    n_test_good: int = 12,
    n_test_per_defect: int = 6,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the toy world as an MVTec-format benchmark, one category per shape; returns ``root``.

    Layout: ``<shape>/train/good/000.png``, ``<shape>/test/{good,<defect>}/000.png`` and
    ``<shape>/ground_truth/<defect>/000_mask.png`` (0/255), readable by :class:`adlib.data.mvtec.MVTecDataset`.
    Refuses to write into an existing category folder (delete it first).

    Defined in: "All methods, one benchmark" (``notebooks/11_benchmark.ipynb``).
    """
    root = Path(root)
    shapes = _check_names(shapes, SHAPES, "shapes")
    for shape in shapes:
        if (root / shape).exists():
            raise FileExistsError(f"{root / shape} exists; delete it or choose another root.")
    for shape in shapes:
        # Seeds 2s and 2s + 1 keep the train and test draws of every seed disjoint.
        jobs = [("train/good", "good", n_train, 2 * seed), ("test/good", "good", n_test_good, 2 * seed + 1)]
        jobs += [(f"test/{d}", d, n_test_per_defect, 2 * seed + 1) for d in DEFECTS]
        for sub, defect, n, s in jobs:
            images, masks = _render_scenes(shape, defect, n, s, image_size)  # the pixels as rendered
            (root / shape / sub).mkdir(parents=True)
            if defect != "good":
                (root / shape / "ground_truth" / defect).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(images[i]).save(root / shape / sub / f"{i:03d}.png")
                if defect != "good":
                    Image.fromarray(masks[i].astype(np.uint8) * 255).save(
                        root / shape / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root
