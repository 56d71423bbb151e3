"""Image and mask files as cameras write them: 8 or 16 bits, grey, RGB, RGBA or palette, EXIF-rotated.

Every image the book reads from a folder goes through :func:`read_image` (pixels) or :func:`image_size` (the header),
every mask through :func:`read_mask`, so an image and its mask always agree on orientation and size.

- 8-bit images decode exactly as ``PIL.Image.convert("RGB")`` does (grey replicated, alpha dropped, palettes
  expanded), divided by 255.
- 16-bit PNGs keep their 16 bits (Pillow would clip grey ones to white and cut RGB ones to 8 bits), read with pypng:
  each sample is divided by the largest value its bit depth allows; the PNG's sBIT chunk, where present, gives that
  depth (its samples are stored left-aligned, the PNG rule). A 16-bit image without sBIT whose values all fit in
  12 bits (as many 12-bit cameras write) gets a warning, since dividing by 65,535 leaves it nearly black.
- The EXIF orientation tag is applied (a phone photo stored sideways is read upright), in the pixels and the size.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import png
from PIL import Image, ImageOps

#: EXIF orientations that swap width and height (transposed or rotated by 90 degrees).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


def _unreadable(path: Path, what: str, err: Exception) -> ValueError:
    return ValueError(f"Cannot read {what} {path}: {err}. Replace the file or delete it.")


def _png_16_bit(path: Path) -> np.ndarray | None:
    """A 16-bit PNG as (H, W, C) float32 in [0, 1] (C = 1 grey, 3 colour; alpha dropped), None for any other file."""
    if path.suffix.lower() != ".png":
        return None
    reader = png.Reader(filename=str(path))
    reader.preamble()  # the header only: 8-bit files go back to Pillow undecoded
    if reader.bitdepth != 16:
        return None
    width, height, rows, info = reader.asDirect()  # with sBIT, the samples come shifted down to its depth
    samples = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, info["planes"])
    if info["alpha"]:
        samples = samples[..., :-1]
    bits = info["bitdepth"]
    if bits == 16 and samples.max() < 4096:
        warnings.warn(f"{path}: a 16-bit image whose values all fit in the low 12 bits (largest {samples.max()}), "
                      "as a 12-bit camera writes; read as 16-bit (divided by 65,535), so it looks nearly black. "
                      "If it is 12-bit data, write the PNG's sBIT chunk (12) or scale it to 16 bits.", stacklevel=3)
    return samples.astype(np.float32) / (2 ** bits - 1)


def read_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) float32 in [0, 1], upright by its EXIF orientation, scaled by its bit depth.

    Used by: ``adlib.data.mvtec``.
    """
    path = Path(path)
    try:
        deep = _png_16_bit(path)
        if deep is not None:
            image = deep if deep.shape[2] == 3 else np.repeat(deep, 3, axis=2)
            orientation = _orientation(path)
            return image if orientation in (None, 1) else _orient(image, orientation)
        with Image.open(path) as im:
            upright = ImageOps.exif_transpose(im)
            if upright.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise ValueError(f"{upright.mode} pixels are only read from 16-bit PNGs; convert the file to PNG")
            return np.asarray(upright.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError, png.Error) as err:  # pypng's errors do not derive from OSError
        raise _unreadable(path, "image", err) from err


def _orientation(path: Path) -> int | None:
    with Image.open(path) as im:
        return im.getexif().get(_EXIF_ORIENTATION)


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (2-8) to an (H, W, C) array, as ``ImageOps.exif_transpose`` does to an image."""
    flip, turns = {2: (True, 0), 3: (False, 2), 4: (True, 2), 5: (True, 1), 6: (False, 3), 7: (True, 3),
                   8: (False, 1)}[orientation]
    image = image[:, ::-1] if flip else image
    return np.ascontiguousarray(np.rot90(image, turns))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a file as :func:`read_image` returns it (EXIF rotation applied), from the header only.

    Used by: ``adlib.data.mvtec.MVTecDataset``.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            rotated = im.getexif().get(_EXIF_ORIENTATION) in _SWAPPING_ORIENTATIONS
    except (OSError, SyntaxError, ValueError) as err:
        raise _unreadable(path, "image", err) from err
    return (height, width) if rotated else (width, height)


def read_mask(path: str | Path, label_indices: bool = False) -> np.ndarray:
    """A mask file as (H, W) bool. Binary masks ({0, 255} or {0, 1}, in any colour channel) mark every non-zero
    pixel; any other values (e.g. JPEG artefacts) mark values above 127, with a warning naming the file.
    ``label_indices``: the file holds 0 for background and a defect's index elsewhere (VisA's masks): every non-zero
    pixel, whatever its value. A mask that marks every pixel is refused (an inverted mask, most likely).

    Used by: ``adlib.data.mvtec.MVTecDataset``, ``adlib.data.visa.visa_to_mvtec``.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(ImageOps.exif_transpose(im))
    except (OSError, SyntaxError, ValueError) as err:
        raise _unreadable(path, "mask", err) from err
    if arr.ndim == 3:  # drop alpha (non-zero everywhere): LA keeps channel 0, RGB(A) its colours
        arr = arr[..., : 3 if arr.shape[-1] >= 3 else 1].max(axis=-1)
    values = np.unique(arr)
    if label_indices or set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}:
        mask = arr > 0
    else:
        warnings.warn(f"Mask {path} is not binary (values {values.min()}..{values.max()}, {len(values)} distinct; "
                      "JPEG artefacts?): read as value > 127. Save masks as PNG with 0 and 255.", stacklevel=2)
        mask = arr > 127
    if mask.all():
        raise ValueError(f"Mask {path} marks every pixel as anomalous: is it inverted? A mask is 255 (or 1) on the "
                         "defect and 0 elsewhere.")
    return mask
