"""The toy world: small procedural images of objects with captions and pixel-exact defect masks.

A scene is one object (a shape) of some colour and size on a background; an object is either intact
(``"good"``) or carries one defect (``crack``, ``hole``, ``stain``, ``broken``) whose pixels are given by a
mask. Captions come from a small grammar, e.g. ``"a photo of a small red star on wood."``. Defects are
rare and usually *unnamed* in captions, so a CLIP trained on this world learns objects, colours and
backgrounds but not "damaged" (real CLIP's blind spot, the premise of AA-CLIP).

Every scene depends only on ``(seed, index)``: ``sample(10, seed=0)`` is the first ten scenes of
``sample(1000, seed=0)``. Images are rendered, quantised to 8 bits like a photo and returned as an
:class:`adlib.data.imageset.ImageSet`.

Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from adlib.data import drawing
from adlib.data.imageset import ImageSet

SHAPES: tuple[str, ...] = drawing.SHAPES[:10]
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10), "orange": (0.95, 0.55, 0.05), "yellow": (0.95, 0.88, 0.15),
    "green": (0.15, 0.65, 0.20), "blue": (0.12, 0.30, 0.85), "purple": (0.55, 0.20, 0.70),
    "white": (0.93, 0.93, 0.93), "black": (0.10, 0.10, 0.10),
}
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = drawing.BACKGROUNDS
DEFECTS: tuple[str, ...] = drawing.DEFECTS[:4]
#: The adjective a caption uses when it names a defect.
DEFECT_WORDS: dict[str, str] = {"crack": "cracked", "hole": "holed", "stain": "stained", "broken": "broken"}

_BG_PHRASE = {"plain": "a plain background", "wood": "wood", "grass": "grass", "stone": "stone"}
_TEMPLATES = ("a photo of a {size} {colour} {shape} on {bg}.", "a photo of a {colour} {shape}.",
              "a {colour} {shape} on {bg}.", "a {size} {shape} on {bg}.", "a photo of a {shape}.",
              "a {size} {colour} {shape}.", "a picture of a {shape} on {bg}.")


class Scene(NamedTuple):
    """What a toy image shows; ``defect`` is ``"good"`` for an intact object.

    Used by: ``adlib.data.toyworld.sample``.
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


# --------------------------------------------------------------------------- scenes


def render(scene: Scene, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene: ((size, size, 3) float image in [0, 1], (size, size) bool defect mask).

    Used by: ``adlib.data.toyworld.sample``.
    """
    if scene.defect != "good" and scene.defect not in DEFECTS:
        raise ValueError(f"Unknown defect {scene.defect!r}; choose 'good' or one of {DEFECTS}.")
    return drawing.draw_object(scene.shape, COLOURS[scene.colour], scene.size == "large", scene.background,
                               scene.defect, size, rng)


def caption(scene: Scene, rng: np.random.Generator, name_defect: bool = False) -> str:
    """One caption from the grammar; the defect is named (``"a cracked red star"``) only if asked.

    Used by: ``adlib.data.toyworld.sample``.
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
    the :func:`scenes_of` sets joined.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    shapes = _check_names(shapes, SHAPES, "shapes")
    return ImageSet.concat([scenes_of(shape, defect, n, seed, image_size) for shape in shapes
                            for defect, n in [("good", n_good)] + [(d, n_per_defect) for d in DEFECTS]])

