"""SynthTex: the book's offline benchmark, an MVTec-AD-format set of textures with pixel-exact defects.

``generate`` writes, for each category::

    root/<category>/train/good/000.png ...            normal images only (RGB PNG)
    root/<category>/test/good/000.png ...             normal test images, no masks (as MVTec AD)
    root/<category>/test/<defect>/000.png ...         one defect per image
    root/<category>/ground_truth/<defect>/000_mask.png  0/255 L-mode PNG, same H x W as the image
    root/synthtex.json                                the manifest: parameters, version, completeness

and ``adlib.data`` reads it back exactly as it reads MVTec AD. Three categories crop, rotate and tint
the grayscale textures shipped with scikit-image (``brick``, ``grass``, ``gravel``); three are
procedural (``weave``, ``wood``, ``tile``). Defects cover 0.3 %-8 % of the image, vary in contrast from
subtle to obvious, and change pixels only inside their mask, so the masks are exact.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from adlib.core.home import data_home, exclusive
from adlib.core.profiles import check_profile
from adlib.data.defects import DEFECTS, add_defect

CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel", "weave", "wood", "tile")

#: Sizes per profile; the "paper" profile uses the real MVTec AD (``adlib.data``), not SynthTex.
SIZES: dict[str, dict[str, int]] = {
    "smoke": dict(n_train=8, n_test_good=4, n_test_per_defect=1, image_size=64),
    "book": dict(n_train=60, n_test_good=20, n_test_per_defect=6, image_size=128),
}

#: Bump whenever rendering changes, so an old folder on disk is not mistaken for the new one.
VERSION = 1
MANIFEST = "synthtex.json"
#: The lock file that lets one process at a time generate into a root.
LOCK = ".generate.lock"

# (dark, light) RGB of each category's colour map: gray 0 -> dark, gray 1 -> light.
_TINTS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "brick": ((0.28, 0.12, 0.08), (0.95, 0.62, 0.47)),
    "grass": ((0.08, 0.18, 0.04), (0.62, 0.84, 0.36)),
    "gravel": ((0.20, 0.19, 0.17), (0.92, 0.88, 0.80)),
    "weave": ((0.04, 0.08, 0.22), (0.58, 0.68, 0.92)),
    "wood": ((0.30, 0.16, 0.07), (0.93, 0.75, 0.52)),
    "tile": ((0.22, 0.22, 0.24), (0.93, 0.91, 0.86)),
}
# Fraction of the 512 px scikit-image texture that one image shows, so every image size shows the
# same content (a smoke image is a downscaled book image).
_CROP = (0.33, 0.40)


# --------------------------------------------------------------------------- textures


def texture(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One normal image of ``category``: (size, size, 3) float32 in [0, 1].

    Each call differs (crop, rotation, flips, period, phase, lighting, contrast, tint), as normal
    images of one product differ.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    if category not in CATEGORIES:
        raise ValueError(f"Unknown SynthTex category {category!r}; choose from {CATEGORIES}.")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}.")
    gray = _RENDER[category](size, rng)
    # Lighting differs between shots: overall level, contrast and a gentle gradient across the image.
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    a = rng.uniform(0, 2 * np.pi)
    shading = rng.uniform(-0.06, 0.06) + rng.uniform(0, 0.08) * (np.cos(a) * x + np.sin(a) * y)
    gray = (gray - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + shading
    dark, light = (np.array(c, dtype=np.float32) * (1 + rng.normal(0, 0.03, 3)) for c in _TINTS[category])
    rgb = dark + np.clip(gray, 0, 1)[..., None] * (light - dark)
    return np.clip(rgb, 0, 1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _skimage_base(name: str, size: int) -> np.ndarray:
    """The 512x512 scikit-image texture in [0, 1], pre-blurred against aliasing when shrunk to ``size``."""
    import skimage.data

    base = getattr(skimage.data, name)().astype(np.float32) / 255.0
    shrink = 512 * np.mean(_CROP) / size
    return ndimage.gaussian_filter(base, 0.5 * shrink) if shrink > 1 else base


def _skimage_texture(name: str) -> Callable[[int, np.random.Generator], np.ndarray]:
    def render(size: int, rng: np.random.Generator) -> np.ndarray:
        base = _skimage_base(name, size)
        side = 512 * rng.uniform(*_CROP)
        angle = np.deg2rad(rng.uniform(-8, 8))
        # Keep the rotated crop inside the base image: no mirrored seams a detector could learn.
        half = side / 2 * (abs(np.cos(angle)) + abs(np.sin(angle)))
        cy, cx = rng.uniform(half, 511 - half, 2)
        flip = np.where(rng.random(2) < 0.5, -1.0, 1.0)
        t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        v, u = np.meshgrid(t * side * flip[0], t * side * flip[1], indexing="ij")
        rows = cy + np.cos(angle) * v - np.sin(angle) * u
        cols = cx + np.sin(angle) * v + np.cos(angle) * u
        return ndimage.map_coordinates(base, [rows, cols], order=1)

    return render


def _noise(size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth Gaussian noise, (size, size), zero mean and unit std; ``sigma`` may be a (row, col) pair."""
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma, mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-8)


def _rotated_grid(size: int, rng: np.random.Generator, max_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (rows, cols), each (size, size), rotated by a random small angle."""
    a = np.deg2rad(rng.uniform(-max_deg, max_deg))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.cos(a) * y - np.sin(a) * x, np.sin(a) * y + np.cos(a) * x


def _weave(size: int, rng: np.random.Generator) -> np.ndarray:
    s = size / 128
    pitch = rng.uniform(9, 11) * s
    y, x = _rotated_grid(size, rng, 3)
    gy, gx = (y + rng.uniform(0, 2 * pitch)) / pitch, (x + rng.uniform(0, 2 * pitch)) / pitch
    i, j = np.floor(gx).astype(int), np.floor(gy).astype(int)
    fx, fy = gx - i, gy - j
    # Yarns are uneven: each thread gets its own brightness.
    yarn = rng.normal(0, 0.05, 64).astype(np.float32)
    warp = np.sqrt(np.sin(np.pi * fx)) * (0.8 + 0.2 * np.sin(np.pi * fy)) * 0.95 + yarn[i % 64]
    weft = np.sqrt(np.sin(np.pi * fy)) * (0.8 + 0.2 * np.sin(np.pi * fx)) * 0.80 + yarn[(j + 32) % 64]
    gray = np.where((i + j) % 2 == 0, warp, weft)
    return gray + 0.05 * _noise(size, 0.5 * s, rng)


def _wood(size: int, rng: np.random.Generator) -> np.ndarray:
    s = size / 128
    y, x = _rotated_grid(size, rng, 6)
    bend = rng.uniform(-1, 1) * (x - size * rng.uniform(0.2, 0.8)) ** 2 / (6 * size)
    t = (y + bend + rng.uniform(2, 4) * s * _noise(size, 20 * s, rng)) / (rng.uniform(14, 20) * s)
    # Growth rings: light early wood darkening slowly into a sharp dark late-wood line.
    rings = 1 - (t - np.floor(t)) ** 3
    grain = _noise(size, (0.5 * s, 12 * s), rng)  # fibres run along the rings
    gray = 0.25 + 0.55 * rings + 0.08 * grain + 0.02 * _noise(size, 0.5, rng)
    return gray[::-1] if rng.random() < 0.5 else gray


def _tile(size: int, rng: np.random.Generator) -> np.ndarray:
    s = size / 128
    pitch = size / 4 * rng.uniform(0.95, 1.05)
    grout = rng.uniform(1.5, 2.5) * s
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + rng.uniform(0, pitch, (2, 1, 1)).astype(np.float32)
    i, j = (x // pitch).astype(int), (y // pitch).astype(int)
    fx, fy = x - i * pitch, y - j * pitch
    edge = np.minimum.reduce([fx, pitch - fx, fy, pitch - fy])
    shade = rng.normal(0, 0.04, (16, 16)).astype(np.float32)[i % 16, j % 16]
    face = 0.75 + shade + 0.03 * _noise(size, 4 * s, rng) - 0.08 * np.clip(1 - (edge - grout / 2) / (2 * s), 0, 1)
    gray = np.where(edge < grout / 2, 0.35, face)
    return gray + 0.02 * _noise(size, 0.5, rng)


_RENDER: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "brick": _skimage_texture("brick"),
    "grass": _skimage_texture("grass"),
    "gravel": _skimage_texture("gravel"),
    "weave": _weave,
    "wood": _wood,
    "tile": _tile,
}


# --------------------------------------------------------------------------- writing to disk


def _rng(seed: int, category: str, part: int, index: int) -> np.random.Generator:
    """One generator per image: an image does not depend on how many others are made, nor on order."""
    return np.random.default_rng([seed, zlib.crc32(category.encode()), part, index])


def _donor(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A cut-paste source: another category, or the same one at twice its scale (a wrong-scale patch)."""
    other = CATEGORIES[rng.integers(len(CATEGORIES))]
    if other != category:
        return texture(other, size, rng)
    quarter = size // 4
    centre = texture(category, size, rng)[quarter : quarter + (size + 1) // 2, quarter : quarter + (size + 1) // 2]
    return ndimage.zoom(centre, (2, 2, 1), order=1)[:size, :size]


def _to_png(array: np.ndarray, path: Path) -> None:
    """(H, W, 3) float in [0, 1] -> RGB PNG, or (H, W) bool -> 0/255 L-mode PNG."""
    pixels = array.astype(np.uint8) * 255 if array.dtype == bool else np.round(np.clip(array, 0, 1) * 255)
    # Level 1: four times faster than the default and, on these noisy textures, no larger.
    Image.fromarray(pixels.astype(np.uint8)).save(path, compress_level=1)


def _write_category(folder: Path, category: str, spec: dict[str, int]) -> int:
    """Render and write one category; returns the number of files written."""
    size, seed = spec["image_size"], spec["seed"]
    name = "{:0%dd}" % max(3, len(str(max(spec["n_train"], spec["n_test_good"], spec["n_test_per_defect"]) - 1)))
    jobs = [("train/good", 0, spec["n_train"]), ("test/good", 1, spec["n_test_good"])]
    jobs += [(f"test/{d}", 2 + k, spec["n_test_per_defect"]) for k, d in enumerate(DEFECTS)]
    count = 0
    for sub, part, n in jobs:
        (folder / sub).mkdir(parents=True)
        defect = sub.split("/")[1]
        if defect != "good":
            (folder / "ground_truth" / defect).mkdir(parents=True)
        for i in range(n):
            rng = _rng(seed, category, part, i)
            image = texture(category, size, rng)
            if defect != "good":
                donor = _donor(category, size, rng) if defect == "cut_paste" else None
                image, mask = add_defect(image, defect, rng, donor)
                _to_png(mask, folder / "ground_truth" / defect / f"{name.format(i)}_mask.png")
                count += 1
            _to_png(image, folder / sub / f"{name.format(i)}.png")
            count += 1
    return count


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.exists():
        return {"generator": "adlib.synthtex", "categories": {}}
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("generator") != "adlib.synthtex" or not isinstance(manifest.get("categories"), dict):
            raise ValueError("not written by adlib.synthtex")
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(
            f"{path} exists but is not a SynthTex manifest ({err}). Choose another root, or move that file away."
        ) from None
    return manifest


def _write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, root / MANIFEST)  # atomic: an interrupted run never leaves half a manifest


def _n_files(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*") if f.is_file())


def generate(
    root: str | os.PathLike,
    *,
    categories: tuple[str, ...] | list[str] | None = None,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_per_defect: int = 6,
    image_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write SynthTex in the MVTec AD layout under ``root`` (see the module docstring); return ``root``.

    Each category gets ``n_train`` normal training images and ``n_test_good`` normal plus
    ``n_test_per_defect`` images of each of the ``len(DEFECTS)`` defects for testing, all
    (image_size, image_size) RGB. The same arguments give the same bytes, and a category does not
    depend on which other categories are generated with it.

    A category folder already written by SynthTex with the same parameters is reused as is (even with
    ``overwrite=True``). One written with other parameters is refused unless ``overwrite=True``, which
    deletes and rewrites it; an interrupted or damaged one with the same parameters is redone without
    asking. A folder SynthTex did not write (absent from ``root/synthtex.json``) is never deleted: move
    it or choose another ``root``.

    Used by: ``adlib.data.synthtex.generate_for_profile``.
    """
    categories = CATEGORIES if categories is None else tuple(categories)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise ValueError(f"Unknown or no SynthTex categories {unknown}; choose from {CATEGORIES}.")
    params = dict(n_train=n_train, n_test_good=n_test_good, n_test_per_defect=n_test_per_defect,
                  image_size=image_size, seed=seed)
    for key, value in params.items():
        least = 32 if key == "image_size" else 0 if key == "seed" else 1
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{key} must be an integer >= {least}, got {value!r}.")
    params = {k: int(v) for k, v in params.items()} | {"version": VERSION}
    expected = n_train + n_test_good + 2 * n_test_per_defect * len(DEFECTS)

    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / LOCK):  # another process (a pytest worker, a joblib worker) may generate it too
        _generate_missing(root, categories, params, expected, overwrite)
    return root


def _generate_missing(root: Path, categories: tuple[str, ...], params: dict[str, int], expected: int,
                      overwrite: bool) -> None:
    manifest = _read_manifest(root)
    for category in categories:
        folder, entry = root / category, manifest["categories"].get(category)
        if folder.exists():
            if entry is None:
                raise FileExistsError(
                    f"{folder} exists but was not written by SynthTex (it is not in {root / MANIFEST}); it is "
                    "never deleted, even with overwrite=True. Move it away or choose another root."
                )
            if entry["params"] == params and entry["complete"] and _n_files(folder) == expected:
                continue
            if entry["params"] != params and not overwrite:
                raise FileExistsError(
                    f"{folder} holds SynthTex generated with {entry['params']}, not {params}. Pass "
                    "overwrite=True to delete and regenerate it, or choose another root."
                )
            shutil.rmtree(folder)
        manifest["categories"][category] = {"params": params, "complete": False}
        _write_manifest(root, manifest)
        _write_category(folder, category, params)
        manifest["categories"][category]["complete"] = True
        _write_manifest(root, manifest)


def generate_for_profile(profile: str, root: str | os.PathLike | None = None) -> Path:
    """SynthTex at the size of ``profile`` (``SIZES``), under ``root`` or ``$ADLIB_DATA/synthtex-<profile>``.

    Reuses an earlier generation with the same parameters, so calling it at the top of every chapter
    costs a directory listing after the first time.

    Used by: ``adlib.data.mvtec.benchmark_root``.
    """
    check_profile(profile)
    if profile not in SIZES:
        raise ValueError(
            f"SynthTex is the offline stand-in for MVTec AD and has no {profile!r} size; the {profile!r} "
            "profile uses the real MVTec AD through adlib.data. Use profile 'smoke' or 'book' here."
        )
    root = data_home() / f"synthtex-{profile}" if root is None else root
    return generate(root, **SIZES[profile])
