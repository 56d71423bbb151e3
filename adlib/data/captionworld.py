"""The caption world: the toy world grown into a small web of captioned pictures, for the book's second tiny CLIP.

Real CLIP learnt from web captions, which name objects, colours and photo styles all the time and defects rarely
(AA-CLIP's premise). This world draws the same kind of data: twenty objects (:data:`OBJECTS`, ten of them the toy
world's), eight defects (:data:`DEFECTS`), about a fifth of the objects defective; photo styles that change the
pixels and are named ("a blurry photo of ..."); and distractor pictures that are neither objects nor defects
(backgrounds alone, handwritten digits). A specific defect word ("cracked") names a defect in a few percent of
the defective objects' captions, a generic one ("damaged", "with a flaw") in about one percent, and "damaged" also
names a damaged *photo* (lines across the whole picture), so the word has a rival meaning. Every word of the book's
prompts (WinCLIP's, AA-CLIP's, CLIPN's) occurs in ordinary captions (``tests/test_captionworld.py`` counts them).

A picture's attributes and caption come from the generator ``(seed, i, 0)`` and its pixels from ``(seed, i, 1)``, so
:func:`captions` lists a sample's captions without drawing it.

Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

from adlib.data import drawing, mvtec
from adlib.data.imageset import ImageSet
from adlib.data.toyworld import COLOURS, SIZES

OBJECTS: tuple[str, ...] = drawing.SHAPES
#: AA-CLIP trains on the toy world's ten objects and is tested on the ten others.
TRAIN_OBJECTS, HELD_OUT_OBJECTS = OBJECTS[:10], OBJECTS[10:]
DEFECTS: tuple[str, ...] = drawing.DEFECTS
#: AA-CLIP trains on the toy world's four defects; the four others appear only in its test images (as VisA's and
#: MVTec AD's defect types differ).
SEEN_DEFECTS, UNSEEN_DEFECTS = DEFECTS[:4], DEFECTS[4:]
#: The word that names each defect in a caption.
DEFECT_WORDS: dict[str, str] = {"crack": "cracked", "hole": "holed", "stain": "stained", "broken": "broken",
                                "scratch": "scratched", "chip": "chipped", "spots": "spotted", "burn": "burnt"}
#: Generic defect words: an adjective before the object, or a phrase after it.
GENERIC_BEFORE, GENERIC_AFTER = ("damaged", "defective", "flawed"), ("with a flaw", "with a defect", "with damage")
#: The same for intact objects, as WinCLIP's normal states.
INTACT_BEFORE, INTACT_AFTER = ("flawless", "perfect", "unblemished"), ("without flaw", "without defect",
                                                                      "without damage")
#: Photo styles: each changes the pixels (:func:`restyle`) and is named in the caption; "" is an ordinary photo.
STYLES: tuple[str, ...] = ("", "blurry", "bright", "dark", "black and white", "jpeg corrupted", "cropped",
                           "close-up", "damaged")
#: What a picture shows: an object, a background alone, or a handwritten digit (the distractors).
KINDS: tuple[str, ...] = ("object", "background", "digit")
_BACKGROUND = {"plain": "a plain background", "wood": "wood", "grass": "grass", "stone": "stone"}
_PURPOSES = ("for visual inspection", "for anomaly detection")


@dataclass(frozen=True)
class World:
    """How often each thing happens: ``defect_rate`` (objects carrying a defect); among defective objects'
    captions, ``specific_rate`` (naming the defect: "a cracked star") and ``generic_rate`` ("a damaged star", "a star
    with a flaw"); ``intact_rate`` (intact objects called "flawless ...", "... without defect"); ``style_rate``
    (pictures in one of :data:`STYLES` other than the ordinary photo); ``background_rate`` and ``digit_rate`` (the
    distractor pictures); ``object_word_rate`` (an object called "object"); ``purpose_rate`` ("... for visual
    inspection"). ``defect_words=False`` keeps every defect word out (the premise's control world): no defect named,
    no intact word, damaged photos captioned as ordinary ones.

    Used by: ``adlib.recipes.tiny_clip.train_tiny_clip``.
    """

    defect_rate: float = 0.2
    specific_rate: float = 0.04
    generic_rate: float = 0.01
    intact_rate: float = 0.01
    style_rate: float = 0.3
    background_rate: float = 0.05
    digit_rate: float = 0.05
    object_word_rate: float = 0.03
    purpose_rate: float = 0.01
    defect_words: bool = True


class Picture(NamedTuple):
    """What a caption-world picture shows: ``kind`` (of :data:`KINDS`), ``name`` (the object or digit; "" for a
    background alone), ``colour``, ``size``, ``background``, ``defect`` ("good" for none) and ``style``.

    Used by: ``adlib.data.captionworld.draw_picture``.
    """

    kind: str
    name: str
    colour: str
    size: str
    background: str
    defect: str
    style: str


class Captioned(NamedTuple):
    """A sample: ``images`` (an :class:`adlib.data.imageset.ImageSet`: labels 1 = a defective object, masks,
    defects, objects = names), ``captions`` and ``pictures``.

    Used by: ``adlib.data.captionworld.sample``.
    """

    images: ImageSet
    captions: list[str]
    pictures: list[Picture]


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _state(rng: np.random.Generator, before: tuple[str, ...], after: tuple[str, ...]) -> tuple[list[str], str]:
    """A state word before the noun ("damaged star") or a phrase after it ("star with a flaw"), half and half."""
    return ([_pick(rng, before)], "") if rng.random() < 0.5 else ([], " " + _pick(rng, after))


def draw_picture(rng: np.random.Generator, world: World, objects: tuple[str, ...] = OBJECTS) -> Picture:
    """One picture's attributes, drawn from ``rng``.

    Used by: ``adlib.data.captionworld.captions``.
    """
    u = rng.random()
    kind = "background" if u < world.background_rate else \
        "digit" if u < world.background_rate + world.digit_rate else "object"
    name = {"object": _pick(rng, objects), "digit": _pick(rng, drawing.DIGITS), "background": ""}[kind]
    defect = _pick(rng, DEFECTS) if kind == "object" and rng.random() < world.defect_rate else "good"
    style = _pick(rng, STYLES[1:]) if rng.random() < world.style_rate else ""
    return Picture(kind, name, _pick(rng, tuple(COLOURS)), _pick(rng, SIZES), _pick(rng, drawing.BACKGROUNDS),
                   defect, style)


def caption(p: Picture, rng: np.random.Generator, world: World) -> str:
    """One caption of picture ``p``, from the grammar and the rates of ``world``.

    Used by: ``adlib.data.captionworld.captions``.
    """
    style = p.style if world.defect_words or p.style != "damaged" else ""
    photo = f"a {style} photo of" if style else _pick(rng, ("a photo of", "a picture of", ""))
    where = _pick(rng, (f" on {_BACKGROUND[p.background]}", f" with a {p.background} background", ""))
    if p.kind == "background":
        scene = _pick(rng, (_BACKGROUND[p.background], f"{_BACKGROUND[p.background]} with no object",
                            f"{_BACKGROUND[p.background]} without any object"))
        return f"{photo} {scene}.".strip()
    if p.kind == "digit":
        return f"{photo} the {_pick(rng, (p.colour + ' ', ''))}digit {p.name}{where}.".strip()
    noun = "object" if rng.random() < world.object_word_rate else p.name
    before, after, r = [], "", rng.random()
    if world.defect_words and p.defect != "good" and r < world.specific_rate:
        before = [DEFECT_WORDS[p.defect]]
    elif world.defect_words and p.defect != "good" and r < world.specific_rate + world.generic_rate:
        before, after = _state(rng, GENERIC_BEFORE, GENERIC_AFTER)
    elif world.defect_words and p.defect == "good" and r < world.intact_rate:
        before, after = _state(rng, INTACT_BEFORE, INTACT_AFTER)
    described = [w for w, keep in ((p.size, rng.random() < 0.4), (p.colour, rng.random() < 0.7)) if keep]
    purpose = " " + _pick(rng, _PURPOSES) if rng.random() < world.purpose_rate else ""
    if not before and not after and not purpose and rng.random() < 0.15:
        return f"the {noun} is {p.colour}."  # a sentence, not a noun phrase
    article = _pick(rng, ("a", "the"))
    return " ".join(w for w in (photo, article, *before, *described, noun) if w) + f"{after}{where}{purpose}."


def captions(n: int, seed: int = 0, world: World = World(), objects: tuple[str, ...] = OBJECTS
             ) -> tuple[list[Picture], list[str]]:
    """The pictures and captions of :func:`sample` ``(n, seed, ...)``, without drawing a pixel.

    Used by: ``adlib.data.captionworld.sample``.
    """
    pictures, texts = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 0])
        pictures.append(draw_picture(rng, world, objects))
        texts.append(caption(pictures[-1], rng, world))
    return pictures, texts


def restyle(image: np.ndarray, style: str, rng: np.random.Generator) -> np.ndarray:
    """``image`` (size, size, 3) in [0, 1] as a photo of ``style`` (of :data:`STYLES`; "cropped" and "close-up"
    change the drawing instead, :func:`render`).

    Used by: ``adlib.data.captionworld.render``.
    """
    size = image.shape[0]
    if style == "blurry":
        return ndimage.gaussian_filter(image, (size / 50, size / 50, 0))
    if style == "bright":
        return 0.45 + 0.55 * image
    if style == "dark":
        return 0.4 * image
    if style == "black and white":
        return np.repeat(image @ np.array([0.299, 0.587, 0.114]), 3).reshape(image.shape)
    if style == "jpeg corrupted":
        buffer = io.BytesIO()
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buffer, "JPEG", quality=int(rng.integers(3, 9)))
        return np.asarray(Image.open(buffer), dtype=float) / 255
    if style == "damaged":  # a damaged print: light lines across the whole picture
        damaged = image.copy()
        yy, xx = np.mgrid[0:size, 0:size]
        for _ in range(int(rng.integers(2, 5))):
            a, b = rng.uniform(0, np.pi), rng.uniform(-0.4, 0.4) * size
            line = np.abs((xx - size / 2) * np.cos(a) + (yy - size / 2) * np.sin(a) - b) < 0.6
            damaged[line] = 0.3 * damaged[line] + 0.7
        return damaged
    return image


def render(p: Picture, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one picture: ((size, size, 3) float image in [0, 1], (size, size) bool defect mask).

    Used by: ``adlib.data.captionworld.sample``.
    """
    image, mask = drawing.draw_object(p.name or None, COLOURS[p.colour], p.size == "large", p.background, p.defect,
                                      size, rng, scale=1.3 if p.style == "close-up" else 1.0,
                                      spill=0.5 if p.style == "cropped" else 0.0)
    return np.clip(restyle(image, p.style, rng), 0, 1), mask


def sample(n: int, seed: int = 0, *, image_size: int = 64, world: World = World(),
           objects: tuple[str, ...] = OBJECTS) -> Captioned:
    """Draw ``n`` captioned pictures; picture ``i`` depends only on ``(seed, i)``, ``world`` and ``objects``.

    Used by: ``adlib.recipes.tiny_clip.train_tiny_clip``.
    """
    if n < 0 or image_size < 16:
        raise ValueError(f"Need n >= 0 and image_size >= 16, got n={n}, image_size={image_size}.")
    bad = [o for o in objects if o not in OBJECTS]
    if bad or not objects:
        raise ValueError(f"Unknown or empty objects {bad or list(objects)}; choose from {list(OBJECTS)}.")
    pictures, texts = captions(n, seed, world, tuple(objects))
    drawn = [(p, np.random.default_rng([seed, i, 1])) for i, p in enumerate(pictures)]
    return Captioned(_labelled_pixels(drawn, image_size), texts, pictures)  # render each picture, quantised


def _labelled_pixels(drawn: list[tuple[Picture, np.random.Generator]], size: int) -> ImageSet:
    """Render every (picture, its pixel generator) and quantise: an ImageSet with labels (1 = a defective object),
    masks, defects and object names."""
    images = np.zeros((len(drawn), size, size, 3), np.uint8)
    masks = np.zeros((len(drawn), size, size), bool)
    for i, (p, rng) in enumerate(drawn):
        image, masks[i] = render(p, size, rng)
        images[i] = np.round(image * 255)
    pictures = [p for p, _ in drawn]
    return ImageSet.from_uint8(images, labels=[int(p.defect != "good") for p in pictures], masks=masks,
                               defects=[p.defect for p in pictures], objects=[p.name for p in pictures])


def inspection_photos(n: int, seed: int, objects: tuple[str, ...] = HELD_OUT_OBJECTS, image_size: int = 64
                      ) -> ImageSet:
    """``n`` ordinary photos of ``objects`` (no style, no distractor), half of them defective with any of the eight
    defects: the scenes on which a CLIP's anomaly awareness is measured
    (:func:`adlib.methods.winclip.anomaly_awareness`).

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    world = World(defect_rate=0.5, style_rate=0.0, background_rate=0.0, digit_rate=0.0)
    return sample(n, seed, image_size=image_size, world=world, objects=objects).images


def labelled_set(objects: tuple[str, ...], n_good: int, n_per_defect: int, seed: int,
                 defects: tuple[str, ...] = DEFECTS, image_size: int = 64) -> ImageSet:
    """``n_good`` intact photos and ``n_per_defect`` of every defect in ``defects`` of each object (ordinary
    photos: no style, random colour, size and background), in that order: an AA-CLIP training or test set. Picture
    ``i`` of (object, state) depends only on ``seed``, the object, the state and ``i``.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    bad = [name for name in (*objects, *defects) if name not in (*OBJECTS, *DEFECTS)]
    if bad or not objects:
        raise ValueError(f"Unknown or no objects or defects {bad or list(objects)}; objects come from "
                         f"{list(OBJECTS)}, defects from {list(DEFECTS)}.")
    states = ("good",) + DEFECTS
    drawn = []
    for name in objects:
        for defect, n in [("good", n_good)] + [(d, n_per_defect) for d in defects]:
            for i in range(n):
                rng = np.random.default_rng([seed, OBJECTS.index(name), states.index(defect), i])
                drawn.append((Picture("object", name, _pick(rng, tuple(COLOURS)), _pick(rng, SIZES),
                                      _pick(rng, drawing.BACKGROUNDS), defect, ""), rng))
    return _labelled_pixels(drawn, image_size)


def export_mvtec(root: str | os.PathLike, objects: tuple[str, ...] = HELD_OUT_OBJECTS, *, n_train: int = 40,
                 n_test_good: int = 12, n_test_per_defect: int = 3, image_size: int = 64, seed: int = 0) -> Path:
    """Write ordinary photos of ``objects`` (:func:`labelled_set`) as an MVTec-format benchmark, one category per
    object: ``train/good`` (``n_train`` intact photos, seed ``2 * seed``), ``test/good`` and ``test/<defect>`` for all
    eight defects (seed ``2 * seed + 1``) with their ``ground_truth`` masks. Refuses to write into an existing
    category folder (delete it first). Returns ``root``.

    Defined in: "All methods, one benchmark" (``notebooks/11_benchmark.ipynb``).
    """
    root = Path(root)
    for name in objects:
        if (root / name).exists():
            raise FileExistsError(f"{root / name} exists; delete it or choose another root.")
    for name in objects:
        splits = [("train", labelled_set((name,), n_train, 0, 2 * seed, image_size=image_size)),
                  ("test", labelled_set((name,), n_test_good, n_test_per_defect, 2 * seed + 1, image_size=image_size))]
        for split, images in splits:
            pixels = np.round(np.asarray(images.images) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
            defects = np.asarray(images.defects)
            for defect in dict.fromkeys(images.defects):
                of = defects == defect
                mvtec.write_images(root, name, defect, pixels[of], np.asarray(images.masks)[of], split=split)
    return root
