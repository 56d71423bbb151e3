"""adlib.data.imageset.ImageSet: what it refuses, and that indexing and joining keep every field aligned."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from adlib.data.imageset import ImageSet, as_image_set

N, H, W = 5, 6, 7  # not square, so a swapped height/width shows up


def make_set(n: int = N, seed: int = 0, masks: bool = True) -> ImageSet:
    """A labelled set whose every field tells the images apart: image i is filled with i / 10."""
    rng = np.random.default_rng(seed)
    images = np.stack([np.full((3, H, W), i / 10, np.float32) for i in range(n)])
    labels = np.array([i % 2 for i in range(n)])
    m = rng.uniform(size=(n, H, W)) < 0.3
    m[labels == 0] = False
    return ImageSet(images, labels=labels, masks=m if masks else None,
                    defects=["good" if y == 0 else f"d{i}" for i, y in enumerate(labels)],
                    objects=[f"o{i}" for i in range(n)], files=[f"f{i}.png" for i in range(n)])


def assert_rows(subset: ImageSet, full: ImageSet, rows: list[int]) -> None:
    """``subset`` holds rows ``rows`` of ``full``, in that order, in every field."""
    assert len(subset) == len(rows)
    np.testing.assert_array_equal(subset.images, full.images[rows])
    np.testing.assert_array_equal(subset.labels, full.labels[rows])
    np.testing.assert_array_equal(subset.masks, full.masks[rows])
    for field in ("defects", "objects", "files"):
        assert getattr(subset, field) == tuple(getattr(full, field)[i] for i in rows), field


# ----------------------------------------------------------------------------- what it refuses


def test_uint8_images_are_refused_with_a_pointer_to_from_uint8() -> None:
    with pytest.raises(ValueError, match="from_uint8"):
        ImageSet(np.zeros((2, 3, H, W), np.uint8))


def test_values_outside_0_1_are_refused() -> None:
    for bad in (1.5, -0.1):
        images = np.full((2, 3, H, W), 0.5, np.float32)
        images[1, 0, 0, 0] = bad
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            ImageSet(images)


def test_wrong_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ImageSet(np.zeros((2, H, W, 3), np.float32))  # channels last
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ImageSet(np.zeros((3, H, W), np.float32))


def test_masks_of_the_wrong_size_are_refused() -> None:
    images = np.zeros((2, 3, H, W), np.float32)
    for shape in ((2, W, H), (2, H, W + 1), (3, H, W), (2, 1, H, W)):
        with pytest.raises(ValueError, match="masks must be"):
            ImageSet(images, masks=np.zeros(shape, bool))


def test_labels_must_be_0_or_1_one_per_image() -> None:
    images = np.zeros((3, 3, H, W), np.float32)
    with pytest.raises(ValueError, match="labels"):
        ImageSet(images, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="labels"):
        ImageSet(images, labels=[0, -1, 1])
    with pytest.raises(ValueError, match="labels"):
        ImageSet(images, labels=[0, 1])


def test_names_need_one_entry_per_image() -> None:
    with pytest.raises(ValueError, match="defects needs one entry per image"):
        ImageSet(np.zeros((2, 3, H, W), np.float32), defects=["good"])


def test_fields_are_normalised() -> None:
    s = ImageSet(torch.zeros(2, 3, H, W, dtype=torch.float64), labels=[True, False],
                 masks=np.zeros((2, H, W), np.uint8))
    assert isinstance(s.images, np.ndarray) and s.images.dtype == np.float32
    assert s.labels.dtype == np.int64 and s.labels.tolist() == [1, 0]
    assert s.masks.dtype == bool
    assert s.defects == s.objects == s.files == ("", "")  # unknown names are empty strings
    assert s.size == (H, W) and s.tensor().shape == (2, 3, H, W) and s.picture(1).shape == (H, W, 3)
    unlabelled = ImageSet(np.zeros((2, 3, H, W), np.float32))
    assert unlabelled.labels is None and unlabelled.masks is None


# ----------------------------------------------------------------------------- indexing


def test_an_int_gives_a_set_of_one() -> None:
    full = make_set()
    for i in (0, 3, -1):
        assert_rows(full[i], full, [range(N)[i]])


def test_a_slice_keeps_every_field_aligned() -> None:
    full = make_set()
    assert_rows(full[1:4], full, [1, 2, 3])
    assert_rows(full[::-2], full, [4, 2, 0])


def test_a_boolean_mask_keeps_every_field_aligned() -> None:
    full = make_set()
    assert_rows(full[full.labels == 1], full, [1, 3])
    assert len(full[np.zeros(N, bool)]) == 0


def test_an_index_array_keeps_every_field_aligned_in_its_order() -> None:
    full = make_set()
    assert_rows(full[np.array([4, 0, 2])], full, [4, 0, 2])
    assert_rows(full[[3, 3, 1]], full, [3, 3, 1])


def test_indexing_an_unlabelled_set_keeps_labels_and_masks_none() -> None:
    s = ImageSet(np.zeros((3, 3, H, W), np.float32))[[0, 2]]
    assert len(s) == 2 and s.labels is None and s.masks is None


def test_one_per_defect_is_the_first_image_of_each_type() -> None:
    s = make_set()[[0, 1, 2, 1, 3]]
    assert s.one_per_defect() == [0, 1, 4]  # good, d1, d3


# ----------------------------------------------------------------------------- joining and building


def test_concat_keeps_order_and_every_field() -> None:
    full = make_set()
    joined = ImageSet.concat([full[:2], full[2:]])
    assert_rows(joined, full, list(range(N)))


def test_concat_drops_labels_or_masks_that_one_part_lacks() -> None:
    labelled, no_masks = make_set(2), make_set(3, masks=False)
    unlabelled = ImageSet(np.zeros((1, 3, H, W), np.float32))
    joined = ImageSet.concat([labelled, no_masks])
    assert joined.labels.tolist() == [0, 1, 0, 1, 0] and joined.masks is None
    joined = ImageSet.concat([labelled, unlabelled])
    assert joined.labels is None and joined.masks is None and len(joined) == 3
    assert joined.defects == ("good", "d1", "")
    with pytest.raises(ValueError, match="at least one"):
        ImageSet.concat([])


def test_from_uint8_is_exactly_u8_over_255() -> None:
    u8 = np.random.default_rng(0).integers(0, 256, size=(2, H, W, 3), dtype=np.uint8)
    u8[0, 0, 0] = (0, 255, 128)
    s = ImageSet.from_uint8(u8, labels=[0, 1], files=["a.png", "b.png"])
    np.testing.assert_array_equal(s.images, (u8.astype(np.float32) / np.float32(255)).transpose(0, 3, 1, 2))
    assert s.images.dtype == np.float32 and s.images.min() == 0 and s.images.max() == 1
    assert s.labels.tolist() == [0, 1] and s.files == ("a.png", "b.png")
    with pytest.raises(ValueError, match="from_uint8 needs"):
        ImageSet.from_uint8(u8.transpose(0, 3, 1, 2))  # channels first
    with pytest.raises(ValueError, match="from_uint8 needs"):
        ImageSet.from_uint8(u8.astype(np.float32))


def test_as_image_set_wraps_arrays_and_passes_sets_through() -> None:
    s = make_set()
    assert as_image_set(s) is s
    wrapped = as_image_set(s.images)
    assert isinstance(wrapped, ImageSet) and wrapped.labels is None
    np.testing.assert_array_equal(wrapped.images, s.images)


def test_tensor_shares_memory_unless_the_images_are_read_only():
    images = np.zeros((2, 3, 4, 4), np.float32)
    shared = ImageSet(images)
    assert np.shares_memory(shared.tensor().numpy(), shared.images)
    frozen = ImageSet(images)
    frozen.images.setflags(write=False)  # as joblib's memory-mapped arrays arrive in a worker
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps an array it may not write
        tensor = frozen.tensor()
    assert torch.equal(tensor, torch.zeros(2, 3, 4, 4)) and not np.shares_memory(tensor.numpy(), frozen.images)
