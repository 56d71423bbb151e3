"""Images as cameras write them (adlib.data.image_files): bit depths, colour modes, EXIF orientation, masks."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import png
import pytest
from PIL import Image

from adlib.bench import folders
from adlib.data import image_files
from adlib.data.mvtec import MVTecDataset

RNG = np.random.default_rng(0)


def save_png16(path: Path, samples: np.ndarray, significant_bits: int | None = None) -> None:
    """Write a 16-bit PNG (grey (H, W) or colour (H, W, 3)) with pypng; Pillow cannot write 16-bit colour."""
    height, width = samples.shape[:2]
    planes = 1 if samples.ndim == 2 else samples.shape[2]
    writer = png.Writer(width, height, bitdepth=16, greyscale=planes == 1, alpha=planes == 4)
    buffer = io.BytesIO()
    writer.write(buffer, samples.reshape(height, width * planes).astype(np.uint16))
    chunks = list(png.Reader(bytes=buffer.getvalue()).chunks())
    if significant_bits:  # pypng reads sBIT but does not write it: add the chunk after the header
        chunks.insert(1, (b"sBIT", bytes([significant_bits] * planes)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        png.write_chunks(handle, chunks)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA"])
def test_8_bit_images_read_exactly_as_pillow_converts_them(tmp_path: Path, mode: str) -> None:
    pixels = RNG.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    path = tmp_path / f"x_{mode}.png"
    source = Image.fromarray(pixels, "RGBA") if "A" in mode else Image.fromarray(pixels[..., :3])
    source.convert(mode).save(path)
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    got = image_files.read_image(path)
    assert got.shape == (12, 10, 3) and got.dtype == np.float32
    assert np.array_equal(got, expected)


def test_16_bit_grey_and_colour_keep_their_range(tmp_path: Path) -> None:
    eight = RNG.integers(0, 256, (9, 7, 3), dtype=np.uint16)
    save_png16(tmp_path / "rgb.png", eight * 257)
    Image.fromarray((eight[..., 0] * 257).astype(np.uint16)).save(tmp_path / "grey.png")  # Pillow's I;16
    assert np.allclose(image_files.read_image(tmp_path / "rgb.png"), eight / 255, atol=1e-6)
    grey = image_files.read_image(tmp_path / "grey.png")
    assert np.allclose(grey, np.repeat(eight[..., :1], 3, axis=2) / 255, atol=1e-6)  # not clipped to white
    save_png16(tmp_path / "rgba.png", np.concatenate([eight, np.full((9, 7, 1), 3)], axis=2) * 257)
    assert np.allclose(image_files.read_image(tmp_path / "rgba.png"), eight / 255, atol=1e-6)  # alpha dropped


def test_sbit_sets_the_depth_and_12_bit_data_without_it_warns(tmp_path: Path) -> None:
    twelve = RNG.integers(0, 4096, (8, 8), dtype=np.uint16)
    save_png16(tmp_path / "sbit.png", twelve << 4, significant_bits=12)  # the PNG rule: left-aligned
    assert np.allclose(image_files.read_image(tmp_path / "sbit.png")[..., 0], twelve / 4095, atol=1e-6)
    save_png16(tmp_path / "raw.png", twelve)
    with pytest.warns(UserWarning, match="low 12 bits"):
        image = image_files.read_image(tmp_path / "raw.png")
    assert np.allclose(image[..., 0], twelve / 65535, atol=1e-6)


def _save_rotated_jpeg(path: Path, upright: np.ndarray) -> None:
    """Store ``upright`` turned 90 degrees clockwise with EXIF orientation 8, as a phone held sideways does."""
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 CW to view": the stored pixels are the upright ones turned counter-clockwise
    Image.fromarray(np.rot90(upright, -1).copy()).save(path, exif=exif, quality=100)


def test_exif_orientation_is_applied_to_pixels_and_size(tmp_path: Path) -> None:
    upright = np.zeros((20, 30, 3), np.uint8)
    upright[:5] = 255  # a white band at the top of the upright image
    _save_rotated_jpeg(tmp_path / "phone.jpg", upright)
    image = image_files.read_image(tmp_path / "phone.jpg")
    assert image.shape == (20, 30, 3) and image_files.image_size(tmp_path / "phone.jpg") == (30, 20)
    assert image[:5].mean() > 0.9 and image[5:].mean() < 0.1


def test_a_rotated_jpeg_passes_the_mask_size_check(tmp_path: Path) -> None:
    upright = np.full((20, 30, 3), 128, np.uint8)
    cat = tmp_path / "widget"
    (cat / "train/good").mkdir(parents=True)
    Image.fromarray(upright).save(cat / "train/good/0.png")
    (cat / "test/dent").mkdir(parents=True)
    _save_rotated_jpeg(cat / "test/dent/0.jpg", upright)
    mask = np.zeros((20, 30), np.uint8)
    mask[2:6, 3:9] = 255
    (cat / "ground_truth/dent").mkdir(parents=True)
    Image.fromarray(mask).save(cat / "ground_truth/dent/0_mask.png")
    item = MVTecDataset(tmp_path, "widget", "test", image_size=(20, 30))[0]
    assert item["image"].shape == (3, 20, 30) and item["mask"].sum() == 24


def test_masks_binary_jpeg_like_and_inverted(tmp_path: Path) -> None:
    mask = np.zeros((10, 10), np.uint8)
    mask[2:5, 2:5] = 1
    Image.fromarray(mask).save(tmp_path / "ones.png")
    assert image_files.read_mask(tmp_path / "ones.png").sum() == 9
    noisy = mask * 250 + RNG.integers(0, 6, (10, 10)).astype(np.uint8)  # JPEG-like: 0..5 and 250..255
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    with pytest.warns(UserWarning, match=r"noisy.png is not binary.*> 127"):
        assert image_files.read_mask(tmp_path / "noisy.png").sum() == 9
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(tmp_path / "all.png")
    with pytest.raises(ValueError, match="every pixel.*inverted"):
        image_files.read_mask(tmp_path / "all.png")


def test_an_unreadable_16_bit_png_names_the_file(tmp_path: Path) -> None:
    save_png16(tmp_path / "cut.png", RNG.integers(0, 65536, (16, 16), dtype=np.uint16))
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="Cannot read image .*cut.png"):
        image_files.read_image(tmp_path / "cut.png")


def _category(root: Path, write) -> Path:
    """The CLI tests' category (flat grey-ish parts, a white square as the dent) written by ``write(path, uint8)``."""
    for split, name, seed, dent in [("train/good", f"{i}", i, False) for i in range(4)] + \
            [("test/good", f"{i}", 10 + i, False) for i in range(2)] + [("test/dent", f"{i}", 20 + i, True)
                                                                         for i in range(2)]:
        arr = (np.random.default_rng(seed).uniform(0.4, 0.6, (40, 40, 3)) * 255).astype(np.uint8)
        if dent:
            arr[10:20, 10:20] = 255
        (root / "widget" / split).mkdir(parents=True, exist_ok=True)
        write(root / "widget" / split / f"{name}.png", arr)
    (root / "widget/ground_truth/dent").mkdir(parents=True)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:20] = 255
    for i in range(2):
        Image.fromarray(mask).save(root / f"widget/ground_truth/dent/{i}_mask.png")
    return root


@pytest.mark.parametrize("kind", ["grey", "rgb"])
def test_a_16_bit_category_scores_as_its_8_bit_twin(tmp_path: Path, kind: str, one_thread) -> None:
    def eight(path: Path, arr: np.ndarray) -> None:
        Image.fromarray(arr[..., 0] if kind == "grey" else arr).save(path)

    def sixteen(path: Path, arr: np.ndarray) -> None:
        wide = arr.astype(np.uint16) * 257
        if kind == "grey":
            Image.fromarray(wide[..., 0]).save(path)
        else:
            save_png16(path, wide)

    rows = [folders.run("patchcore", _category(tmp_path / name, write), backbone="random-resnet18", image_size=32,
                    device="cpu")["categories"]["widget"] for name, write in (("eight", eight), ("sixteen", sixteen))]
    for column in ("image_auroc", "pixel_auroc", "aupro"):
        assert rows[1][column] == pytest.approx(rows[0][column], abs=0.01), column
