"""Tests of adlib.data.drawing: shapes with the areas their geometry gives, defects confined to their masks."""
from __future__ import annotations

import numpy as np
import pytest

from adlib.data import drawing

R, SIZE, CENTRE = 20.0, 64, np.array([32.0, 32.0])


def _area(shape: str, angle: float = 0.0) -> int:
    return int(drawing.shape_mask(shape, SIZE, CENTRE, R, angle).sum())


@pytest.mark.parametrize("shape, area, tolerance", [
    ("circle", np.pi * R**2, 0.03),
    ("square", 2 * (0.95 * R) ** 2, 0.06),  # circumradius 0.95 R
    ("ring", np.pi * R**2 * (1 - 0.55**2), 0.06),
    ("pentagon", 5 / 2 * R**2 * np.sin(2 * np.pi / 5), 0.06),
    ("octagon", 8 / 2 * R**2 * np.sin(2 * np.pi / 8), 0.05),
    ("oval", np.pi * R * 0.6 * R, 0.05),
    ("semicircle", np.pi * R**2 / 2, 0.06),
    ("diamond", 2 * R * 1.2 * R / 2, 0.06),  # diagonals 2 R and 1.2 R
    ("trapezoid", (2 * R + R) / 2 * 1.1 * R, 0.06),
])
def test_shape_areas_match_geometry(shape, area, tolerance):
    assert abs(_area(shape, 0.3) - area) / area < tolerance


def test_every_shape_is_a_distinct_object_of_a_sensible_size_at_any_angle():
    masks = {s: drawing.shape_mask(s, SIZE, CENTRE, R, 0.7) for s in drawing.SHAPES}
    for shape, mask in masks.items():
        assert 0.25 * np.pi * R**2 < mask.sum() < 1.05 * np.pi * R**2, shape  # inside the circle of its radius
        assert mask[32, 32] or shape in ("ring", "moon", "semicircle"), shape
    for a in drawing.SHAPES:  # no two shapes draw the same pixels
        for b in drawing.SHAPES:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() > 0.05 * masks[a].sum(), (a, b)


def _scene(k: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, object mask, background) of a red object of radius ``R`` at ``size`` = 64 (scaled otherwise)."""
    rng = np.random.default_rng(k)
    bg = drawing.background(drawing.BACKGROUNDS[k % 4], size, rng)
    obj = drawing.shape_mask(drawing.SHAPES[k % 20], size, CENTRE * size / SIZE, R * size / SIZE, rng.uniform(0, 6))
    return np.where(obj[..., None], np.array([0.85, 0.12, 0.10]), bg), obj, bg


@pytest.mark.parametrize("defect", drawing.DEFECTS)
def test_a_defect_changes_pixels_only_inside_its_mask_and_its_mask_only_on_the_object(defect):
    for k in range(6):
        image, obj, bg = _scene(k)
        painted = image.copy()
        mask = drawing.paint_defect(defect, painted, obj, bg, CENTRE, R, np.array([0.85, 0.12, 0.10]),
                                    np.random.default_rng(k))
        assert mask.any() and not (mask & ~obj).any()
        np.testing.assert_array_equal(painted[~mask], image[~mask])
        assert np.abs(painted[mask] - image[mask]).max() > 0.05
        assert mask.sum() < 0.5 * obj.sum(), (defect, k)  # a defect is a part of the object, never all of it


def test_cracks_and_scratches_are_thin_lines():
    # a crack once filled the whole object (scipy's binary_dilation repeats until nothing changes for iterations=0)
    for size in (32, 64):
        for k in range(10):
            image, obj, bg = _scene(k, size)
            for defect in ("crack", "scratch"):
                mask = drawing.paint_defect(defect, image.copy(), obj, bg, CENTRE * size / SIZE, R * size / SIZE,
                                            np.zeros(3), np.random.default_rng(k))
                assert mask.sum() <= 2 * 3 * size, (defect, size, k)  # at most a two-pixel line of 3 * size steps


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="Unknown shape"):
        drawing.shape_mask("dragon", 32, np.array([16.0, 16.0]), 8.0, 0.0)
    with pytest.raises(ValueError, match="Unknown background"):
        drawing.background("lava", 32, np.random.default_rng(0))
    image, obj, bg = _scene(0)
    with pytest.raises(ValueError, match="Unknown defect"):
        drawing.paint_defect("dent", image, obj, bg, CENTRE, R, np.zeros(3), np.random.default_rng(0))
