"""Tests for adlib.data's MVTec-format loader, the VisA converter and the CIFAR-10 one-class split."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from adlib.data.imageset import ImageSet
from adlib.data.mvtec import MVTecDataset, categories, load_split
from adlib.data.oneclass import one_class_cifar10
from adlib.data.visa import visa_to_mvtec

H, W = 32, 40  # deliberately not square, so a swapped height/width shows up


def save_image(path: Path, seed: int, size: tuple[int, int] = (H, W), mode: str = "RGB") -> np.ndarray:
    """Write a random image of (height, width) ``size``; returns its pixels as saved."""
    rng = np.random.default_rng(seed)
    shape = size + ((3,) if mode == "RGB" else ())
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)
    return arr


def save_mask(path: Path, box: tuple[int, int, int, int], size: tuple[int, int] = (H, W)) -> np.ndarray:
    """Write a 0/255 mask with the (top, bottom, left, right) box set; returns it as 0/1."""
    mask = np.zeros(size, np.uint8)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask * 255).save(path)
    return mask


def make_category(root: Path, category: str = "widget") -> dict[str, np.ndarray]:
    """A tiny MVTec category: 3 train images, 1 good and 2 scratched test images with masks."""
    cat = root / category
    arrays = {f"train/good/{i:03d}.png": save_image(cat / f"train/good/{i:03d}.png", i) for i in range(3)}
    arrays["test/good/000.png"] = save_image(cat / "test/good/000.png", 10)
    arrays["test/scratch/000.png"] = save_image(cat / "test/scratch/000.png", 11)
    arrays["test/scratch/001.png"] = save_image(cat / "test/scratch/001.png", 12)
    arrays["mask/000"] = save_mask(cat / "ground_truth/scratch/000_mask.png", (4, 20, 5, 30))
    arrays["mask/001"] = save_mask(cat / "ground_truth/scratch/001_mask.png", (10, 13, 0, 40))
    return arrays


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "mvtec"
    return root, make_category(root)


# ----------------------------------------------------------------------------- items, shapes, labels


def test_categories_lists_only_dataset_folders(tmp_path: Path) -> None:
    make_category(tmp_path, "b_cat")
    make_category(tmp_path, "a_cat")
    (tmp_path / "split_csv").mkdir()  # e.g. VisA's extra folder: not a category
    (tmp_path / "readme.txt").write_text("x")
    assert categories(tmp_path) == ["a_cat", "b_cat"]


def test_train_items_at_native_size_are_the_pixels(tree) -> None:
    root, arrays = tree
    ds = MVTecDataset(root, "widget", "train", image_size=(H, W))
    assert len(ds) == 3
    for i, item in enumerate(ds):
        assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, H, W) and item["mask"].dtype == torch.float32
        assert item["label"] == 0 and item["defect"] == "good" and item["mask"].sum() == 0
        assert item["path"] == str(root / "widget" / f"train/good/{i:03d}.png")
        expected = arrays[f"train/good/{i:03d}.png"].transpose(2, 0, 1) / 255.0
        np.testing.assert_allclose(item["image"].numpy(), expected, atol=1e-6)


def test_test_items_labels_and_masks(tree) -> None:
    root, arrays = tree
    ds = MVTecDataset(root, "widget", "test", image_size=(H, W))
    assert [it["defect"] for it in ds] == ["good", "scratch", "scratch"]
    assert [it["label"] for it in ds] == [0, 1, 1]
    assert ds[0]["mask"].sum() == 0
    np.testing.assert_array_equal(ds[1]["mask"][0].numpy(), arrays["mask/000"])
    np.testing.assert_array_equal(ds[2]["mask"][0].numpy(), arrays["mask/001"])


def test_resize_matches_pil_and_keeps_masks_binary(tree) -> None:
    root, arrays = tree
    size = (13, 17)  # non-integer factors in both directions
    item = MVTecDataset(root, "widget", "test", image_size=size)[1]
    assert item["image"].shape == (3, *size) and item["mask"].shape == (1, *size)
    ref_img = np.asarray(Image.fromarray(arrays["test/scratch/000.png"]).resize(size[::-1], Image.BILINEAR))
    np.testing.assert_allclose(item["image"].numpy(), ref_img.transpose(2, 0, 1) / 255.0, atol=0.02)
    ref_mask = np.asarray(Image.fromarray(arrays["mask/000"] * 255).resize(size[::-1], Image.NEAREST)) > 0
    assert set(np.unique(item["mask"].numpy())) <= {0.0, 1.0}
    np.testing.assert_array_equal(item["mask"][0].numpy(), ref_mask.astype(np.float32))


def test_int_image_size_is_square_and_center_crop(tree) -> None:
    root, _ = tree
    full = MVTecDataset(root, "widget", "test", image_size=16)[1]
    crop = MVTecDataset(root, "widget", "test", image_size=16, crop_size=(8, 10))[1]
    assert full["image"].shape == (3, 16, 16)
    assert crop["image"].shape == (3, 8, 10) and crop["mask"].shape == (1, 8, 10)
    torch.testing.assert_close(crop["image"], full["image"][:, 4:12, 3:13])
    torch.testing.assert_close(crop["mask"], full["mask"][:, 4:12, 3:13])


def test_normalize_imagenet_and_custom(tree) -> None:
    root, _ = tree
    plain = MVTecDataset(root, "widget", "train", image_size=8)[0]["image"].numpy()
    imnet = MVTecDataset(root, "widget", "train", image_size=8, normalize=True)[0]["image"].numpy()
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(imnet, (plain - mean[:, None, None]) / std[:, None, None], atol=1e-5)
    custom = MVTecDataset(root, "widget", "train", image_size=8, normalize=((0.5,) * 3, (0.25,) * 3))[0]
    np.testing.assert_allclose(custom["image"].numpy(), (plain - 0.5) / 0.25, atol=1e-5)


def test_extensions_case_insensitive_and_grey_images(tmp_path: Path) -> None:
    cat = tmp_path / "c"
    save_image(cat / "train/good/a.JPG", 0)
    save_image(cat / "train/good/b.bmp", 1)
    save_image(cat / "train/good/c.TIF", 2, mode="L")  # grey images become 3 equal channels
    save_image(cat / "train/good/._d.png", 3)  # macOS resource fork: skipped
    (cat / "train/good/notes.txt").write_text("not an image")
    ds = MVTecDataset(tmp_path, "c", "train", image_size=(H, W))
    assert [Path(it["path"]).name for it in ds] == ["a.JPG", "b.bmp", "c.TIF"]
    grey = ds[2]["image"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_btad_layout_ok_folders_and_plain_mask_names(tmp_path: Path) -> None:
    cat = tmp_path / "01"
    save_image(cat / "train/ok/0000.bmp", 0)
    save_image(cat / "test/ok/0001.bmp", 1)
    save_image(cat / "test/ko/0002.bmp", 2)
    mask = save_mask(cat / "ground_truth/ko/0002.png", (0, 5, 0, 5))
    assert len(MVTecDataset(tmp_path, "01", "train")) == 1
    ds = MVTecDataset(tmp_path, "01", "test", image_size=(H, W))
    assert [it["label"] for it in ds] == [1, 0]  # folders sorted: ko, ok
    np.testing.assert_array_equal(ds[0]["mask"][0].numpy(), mask)


def test_load_split_matches_dataset_item_by_item(tree) -> None:
    root, _ = tree
    test = load_split(root, "widget", "test", image_size=12)
    ds = MVTecDataset(root, "widget", "test", image_size=12)
    assert isinstance(test, ImageSet) and len(test) == len(ds) == 3
    assert test.images.shape == (3, 3, 12, 12) and test.images.dtype == np.float32 and test.size == (12, 12)
    assert test.labels.dtype == np.int64 and test.masks.shape == (3, 12, 12) and test.masks.dtype == bool
    for i, item in enumerate(ds):
        np.testing.assert_array_equal(test.images[i], item["image"].numpy())
        np.testing.assert_array_equal(test.masks[i], item["mask"][0].numpy() > 0)
        assert (test.labels[i], test.files[i], test.defects[i]) == (item["label"], item["path"], item["defect"])
    assert test.labels.tolist() == [0, 1, 1] and test.masks[0].sum() == 0 and test.masks[1:].any(axis=(1, 2)).all()
    assert test.objects == ("widget",) * 3
    assert test.files == tuple(str(root / "widget" / f) for f in ("test/good/000.png", "test/scratch/000.png",
                                                                   "test/scratch/001.png"))


def test_load_split_train_and_crop(tree) -> None:
    root, arrays = tree
    train = load_split(root, "widget", "train", image_size=(H, W))
    assert train.labels.tolist() == [0, 0, 0] and train.defects == ("good",) * 3
    assert train.masks is not None and not train.masks.any()  # normal images: all-False masks
    np.testing.assert_allclose(train.images[1], arrays["train/good/001.png"].transpose(2, 0, 1) / 255.0, atol=1e-6)
    crop = load_split(root, "widget", "test", image_size=16, crop_size=(8, 10))
    full = MVTecDataset(root, "widget", "test", image_size=16, crop_size=(8, 10))
    assert crop.size == (8, 10) and crop.masks.shape == (3, 8, 10)
    np.testing.assert_array_equal(crop.images[2], full[2]["image"].numpy())


def test_load_split_without_masks_for_a_defect_folder(tree) -> None:
    root, _ = tree
    save_image(root / "widget/test/dent/000.png", 30)  # a defect type with no ground_truth/dent masks
    test = load_split(root, "widget", "test", image_size=12)
    assert test.masks is None  # image-level labels only: pixel metrics cannot be computed
    assert test.defects == ("dent", "good", "scratch", "scratch") and test.labels.tolist() == [1, 0, 1, 1]


def test_dataloader_batches(tree) -> None:
    root, _ = tree
    loader = DataLoader(MVTecDataset(root, "widget", "test", image_size=8), batch_size=2, num_workers=0)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(2, 3, 8, 8), (1, 3, 8, 8)]
    assert batches[0]["mask"].shape == (2, 1, 8, 8)
    assert batches[0]["label"].tolist() == [0, 1] and batches[1]["label"].tolist() == [1]
    assert batches[0]["defect"] == ["good", "scratch"] and len(batches[0]["path"]) == 2


# ----------------------------------------------------------------------------- errors


def test_missing_root_explains_layout_and_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        MVTecDataset(tmp_path / "nowhere", "bottle")
    msg = str(err.value)
    for part in (str(tmp_path / "nowhere"), "train/good", "ground_truth/<defect>/<name>_mask.png",
                 "https://www.mvtec.com/company/research/datasets/mvtec-ad",
                 'adlib.data.download.fetch("mvtec_ad"', "adlib.data.synthtex.generate_for_profile"):
        assert part in msg
    with pytest.raises(FileNotFoundError, match="MVTec AD layout"):
        categories(tmp_path / "nowhere")


def test_unknown_category_lists_available(tree) -> None:
    root, _ = tree
    make_category(root, "gadget")
    with pytest.raises(ValueError, match=re.escape("Unknown category 'bottle'") + r".*\['gadget', 'widget'\]"):
        MVTecDataset(root, "bottle")
    with pytest.raises(ValueError, match="looks like a category folder: pass its parent"):
        MVTecDataset(root / "widget", "widget")


def test_no_training_images(tmp_path: Path) -> None:
    save_image(tmp_path / "c/test/good/000.png", 0)
    (tmp_path / "c/train/good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "c/train/good"))):
        MVTecDataset(tmp_path, "c", "train")
    assert len(MVTecDataset(tmp_path, "c", "test")) == 1  # a test-only category still serves its test split


def test_defect_image_without_mask(tree) -> None:
    root, _ = tree
    save_image(root / "widget/test/scratch/002.png", 20)
    with pytest.raises(FileNotFoundError) as err:
        MVTecDataset(root, "widget", "test")
    assert str(root / "widget/test/scratch/002.png") in str(err.value)
    assert str(root / "widget/ground_truth/scratch/002_mask.png") in str(err.value)


def test_defect_folder_without_any_masks_is_image_level_only(tree) -> None:
    root, _ = tree
    assert MVTecDataset(root, "widget", "test").has_masks
    save_image(root / "widget/test/dent/000.png", 30)
    save_image(root / "widget/test/dent/001.PNG", 31)
    ds = MVTecDataset(root, "widget", "test")
    assert not ds.has_masks
    assert ds.defects.count("dent") == 2
    item = ds[ds.defects.index("dent")]
    assert item["label"] == 1 and item["mask"].sum() == 0


def test_mask_without_image(tree) -> None:
    root, _ = tree
    save_mask(root / "widget/ground_truth/scratch/007_mask.png", (0, 1, 0, 1))
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "widget/ground_truth/scratch/007_mask.png"))):
        MVTecDataset(root, "widget", "test")


def test_mask_folder_without_defect_folder(tree) -> None:
    root, _ = tree
    save_mask(root / "widget/ground_truth/crack/000_mask.png", (0, 1, 0, 1))
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "widget/ground_truth/crack/000_mask.png"))):
        MVTecDataset(root, "widget", "test")


def test_mask_size_mismatch_names_both_files(tree) -> None:
    root, _ = tree
    save_mask(root / "widget/ground_truth/scratch/001_mask.png", (0, 1, 0, 1), size=(H, W + 1))
    with pytest.raises(ValueError) as err:
        MVTecDataset(root, "widget", "test")
    assert str(root / "widget/ground_truth/scratch/001_mask.png") in str(err.value)
    assert str(root / "widget/test/scratch/001.png") in str(err.value)


def test_corrupt_images_are_named(tree) -> None:
    root, _ = tree
    garbage = root / "widget/train/good/001.png"
    garbage.write_bytes(b"this is not a png")
    ds = MVTecDataset(root, "widget", "train")
    ds[0]  # the good files still load
    with pytest.raises(ValueError, match=re.escape(f"Cannot read image {garbage}")):
        ds[1]
    png = (root / "widget/train/good/002.png").read_bytes()
    (root / "widget/train/good/002.png").write_bytes(png[: len(png) // 2])  # truncated: header fine, pixels not
    with pytest.raises(ValueError, match=re.escape(str(root / "widget/train/good/002.png"))):
        ds[2]
    (root / "widget/test/scratch/000.png").write_bytes(b"\x89PNG broken")  # defect images are checked up front
    with pytest.raises(ValueError, match=re.escape(str(root / "widget/test/scratch/000.png"))):
        MVTecDataset(root, "widget", "test")


def test_bad_arguments(tree) -> None:
    root, _ = tree
    with pytest.raises(ValueError, match="split must be"):
        MVTecDataset(root, "widget", "val")
    with pytest.raises(ValueError, match="image_size"):
        MVTecDataset(root, "widget", image_size=(0, 3))
    with pytest.raises(ValueError, match="larger than image_size"):
        MVTecDataset(root, "widget", image_size=8, crop_size=9)


# ----------------------------------------------------------------------------- VisA


def make_visa(root: Path) -> Path:
    """A fake extracted VisA: candle with 3 normal and 2 anomalous images, masks with values 0/1 (and RGB)."""
    rows = [["object", "split", "label", "image", "mask"]]
    for i, split in enumerate(["train", "train", "test"]):
        rel = f"candle/Data/Images/Normal/{i:04d}.JPG"
        save_image(root / rel, i)
        rows.append(["candle", split, "normal", rel, ""])
    for i in range(2):
        rel, mrel = f"candle/Data/Images/Anomaly/{i:03d}.JPG", f"candle/Data/Masks/Anomaly/{i:03d}.png"
        save_image(root / rel, 10 + i)
        mask = np.zeros((H, W), np.uint8)
        mask[2:6, 3 + i : 9] = 1 + i  # VisA masks hold small non-zero values, not 255
        out = np.stack([mask] * 3, -1) if i else mask
        (root / mrel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out).save(root / mrel)
        rows.append(["candle", "test", "anomaly", rel, mrel])
    (root / "split_csv").mkdir(parents=True)
    with (root / "split_csv/1cls.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def test_visa_to_mvtec_layout_masks_and_loading(tmp_path: Path) -> None:
    visa, out = make_visa(tmp_path / "VisA"), tmp_path / "visa_mvtec"
    assert visa_to_mvtec(visa, out) == out
    assert sorted(p.name for p in (out / "candle/train/good").iterdir()) == ["0000.JPG", "0001.JPG"]
    assert sorted(p.name for p in (out / "candle/test/good").iterdir()) == ["0002.JPG"]
    assert sorted(p.name for p in (out / "candle/test/bad").iterdir()) == ["000.JPG", "001.JPG"]
    assert (out / "candle/test/bad/000.JPG").read_bytes() == (visa / "candle/Data/Images/Anomaly/000.JPG").read_bytes()
    for i in range(2):
        mask = np.asarray(Image.open(out / f"candle/ground_truth/bad/{i:03d}_mask.png"))
        expected = np.zeros((H, W), np.uint8)
        expected[2:6, 3 + i : 9] = 255
        np.testing.assert_array_equal(mask, expected)
    ds = MVTecDataset(out, "candle", "test", image_size=(H, W))
    assert [it["label"] for it in ds] == [1, 1, 0] and ds[0]["mask"].sum() == 4 * 6
    assert categories(out) == ["candle"]


def test_visa_to_mvtec_never_overwrites_silently(tmp_path: Path) -> None:
    visa, out = make_visa(tmp_path / "VisA"), tmp_path / "out"
    visa_to_mvtec(visa, out, visa / "split_csv/1cls.csv")
    target = out / "candle/train/good/0000.JPG"
    target.write_bytes(b"user edit")
    with pytest.raises(FileExistsError, match=re.escape(str(out / "candle/train/good/0000.JPG"))):
        visa_to_mvtec(visa, out)
    assert target.read_bytes() == b"user edit"
    visa_to_mvtec(visa, out, overwrite=True)
    assert target.read_bytes() == (visa / "candle/Data/Images/Normal/0000.JPG").read_bytes()


def test_visa_to_mvtec_checks_everything_before_writing(tmp_path: Path) -> None:
    visa, out = make_visa(tmp_path / "VisA"), tmp_path / "out"
    (visa / "candle/Data/Masks/Anomaly/001.png").unlink()
    with pytest.raises(FileNotFoundError, match="has no mask"):
        visa_to_mvtec(visa, out)
    assert not out.exists()
    (visa / "split_csv/1cls.csv").write_text("object,split,label,image\ncandle,train,normal,x.JPG\n")
    with pytest.raises(ValueError, match="expected object,split,label,image,mask"):
        visa_to_mvtec(visa, out)
    with pytest.raises(FileNotFoundError, match="1cls.csv"):
        visa_to_mvtec(tmp_path / "empty", out)


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar10_missing_files_tell_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        one_class_cifar10(tmp_path, normal_class=3)
    msg = str(err.value)
    assert "download=True" in msg and "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg
    with pytest.raises(ValueError, match="0-9"):
        one_class_cifar10(tmp_path, normal_class=10)


def test_cifar10_one_class_protocol(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    class FakeCIFAR10:  # same attributes as torchvision's: data (n, 32, 32, 3) uint8, targets list[int]
        def __init__(self, root: str, train: bool, download: bool) -> None:
            n = 50 if train else 30
            self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
            self.targets = [int(t) for t in rng.integers(0, 10, size=n)]

    import torchvision.datasets

    made: list[FakeCIFAR10] = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: made.append(FakeCIFAR10(*a, **k)) or made[-1])
    split = one_class_cifar10(tmp_path, normal_class=4)
    train, test = made
    normal = [img for img, t in zip(train.data, train.targets) if t == 4]
    assert split.x_train.shape == (len(normal), 3072) and split.x_train.dtype == np.float32
    for x, img in zip(split.x_train, normal):
        np.testing.assert_allclose(x.reshape(3, 32, 32), img.transpose(2, 0, 1) / 255.0, atol=1e-7)
    assert split.x_test.shape == (30, 3072)
    np.testing.assert_allclose(split.x_test[7].reshape(3, 32, 32), test.data[7].transpose(2, 0, 1) / 255.0, atol=1e-7)
    assert split.y_test.tolist() == [int(t != 4) for t in test.targets]
    assert split.classes_test.tolist() == test.targets
