"""Tests of adlib.data.toyworld: determinism, exact defect masks, captions, image sets, MVTec export."""
from __future__ import annotations

import numpy as np
import pytest

from adlib.data import toyworld as tw
from adlib.data.imageset import ImageSet


def test_sample_is_deterministic_and_prefix_stable():
    a = tw.sample(4, seed=3, defect_rate=0.5)
    b = tw.sample(9, seed=3, defect_rate=0.5)
    np.testing.assert_array_equal(a.images.images, b.images.images[:4])
    np.testing.assert_array_equal(a.images.masks, b.images.masks[:4])
    assert a.captions == b.captions[:4] and a.scenes == b.scenes[:4]
    c = tw.sample(4, seed=4, defect_rate=0.5)
    assert not np.array_equal(a.images.images, c.images.images)
    assert [tw.SHAPES[i] for i in a.classes] == [s.shape for s in a.scenes]


def test_sample_gives_an_image_set_of_8_bit_pictures_with_what_each_scene_shows():
    d = tw.sample(30, seed=1, defect_rate=0.5, image_size=32)
    images = d.images
    assert isinstance(images, ImageSet) and images.images.shape == (30, 3, 32, 32)
    assert images.images.dtype == np.float32 and 0 <= images.images.min() and images.images.max() <= 1
    # rendered, quantised to 8 bits, then scaled: every value is exactly k / 255
    np.testing.assert_array_equal(images.images, np.round(images.images * 255).astype(np.uint8) / np.float32(255))
    assert images.defects == tuple(s.defect for s in d.scenes) and images.objects == tuple(s.shape for s in d.scenes)
    np.testing.assert_array_equal(images.labels, [s.defect != "good" for s in d.scenes])
    assert 0 < images.labels.sum() < 30
    np.testing.assert_array_equal(images.masks.any(axis=(1, 2)), images.labels == 1)  # a defect always has pixels
    assert d.classes.dtype == np.int64 and len(d.captions) == 30


def test_classes_index_the_requested_shapes():
    d = tw.sample(20, seed=0, shapes=("moon", "star"))
    assert set(d.classes) <= {0, 1}
    assert all(("moon", "star")[c] == s.shape for c, s in zip(d.classes, d.scenes))


@pytest.mark.parametrize("defect", tw.DEFECTS)
def test_defect_changes_pixels_only_inside_its_mask(defect):
    # render draws the same scene up to the defect, so the good and defective images differ only in the mask
    scene = tw.Scene("square", "red", "large", "wood", "good")
    for k in range(3):
        good, good_mask = tw.render(scene, 64, np.random.default_rng(k))
        bad, mask = tw.render(scene._replace(defect=defect), 64, np.random.default_rng(k))
        assert not good_mask.any() and mask.any()
        np.testing.assert_array_equal(good[~mask], bad[~mask])
        assert np.abs(good[mask] - bad[mask]).max() > 0.05


def test_captions_name_defects_only_when_asked():
    scene = tw.Scene("star", "blue", "small", "grass", "crack")
    rng = np.random.default_rng(0)
    for _ in range(10):
        assert "cracked" not in tw.caption(scene, rng, name_defect=False)
        named = tw.caption(scene, rng, name_defect=True)
        assert "cracked" in named and "star" in named
    d = tw.sample(300, seed=1, defect_rate=0.0)
    assert not any(w in c for c in d.captions for w in tw.DEFECT_WORDS.values())


def test_match_matrix_hand_cases():
    s = tw.Scene("star", "red", "small", "wood", "hole")

    def describes(text: str, scene: tw.Scene) -> bool:
        return bool(tw.match_matrix([text], [scene])[0, 0])

    assert describes("a photo of a star.", s)
    assert describes("a photo of a small red star on wood.", s)
    assert describes("a holed star.", s)
    assert not describes("a photo of a circle.", s)
    assert not describes("a blue star.", s)
    assert not describes("a large star on wood.", s)
    assert not describes("a cracked star.", s)
    assert not describes("a star on a plain background.", s)


def test_match_matrix_equals_a_loop():
    d = tw.sample(60, seed=2, defect_rate=0.5, name_defect_rate=0.5)
    m = tw.match_matrix(d.captions, d.scenes)
    def brute(text, scene):  # every attribute word in the caption must be the scene's
        words = text.replace(".", " ").split()
        truth = {scene.shape, scene.colour, scene.size, scene.background, tw.DEFECT_WORDS.get(scene.defect)}
        vocab = set(tw.SHAPES) | set(tw.COLOURS) | set(tw.SIZES) | set(tw.BACKGROUNDS) | set(tw.DEFECT_WORDS.values())
        return all(w in truth for w in words if w in vocab)

    loop = np.array([[brute(c, s) for c in d.captions] for s in d.scenes])
    np.testing.assert_array_equal(m, loop)
    assert m.diagonal().all() and not m.all()


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="choose from"):
        tw.sample(2, shapes=("dragon",))
    with pytest.raises(ValueError, match="probabilities"):
        tw.sample(2, defect_rate=1.5)
    with pytest.raises(ValueError, match="Unknown defect"):
        tw.render(tw.Scene("star", "red", "small", "wood", "burn"), 32, np.random.default_rng(0))  # not this world's


def test_scenes_of_and_labelled_set():
    holes = tw.scenes_of("ring", "hole", 3, seed=5, image_size=32)
    assert isinstance(holes, ImageSet) and len(holes) == 3 and holes.size == (32, 32)
    assert holes.defects == ("hole",) * 3 and holes.objects == ("ring",) * 3 and holes.labels.tolist() == [1, 1, 1]
    assert holes.masks.any(axis=(1, 2)).all()
    good = tw.scenes_of("ring", "good", 2, seed=5, image_size=32)
    assert good.labels.tolist() == [0, 0] and not good.masks.any()
    both = tw.labelled_set(["ring", "star"], 2, 1, seed=5, image_size=32)
    assert len(both) == 2 * (2 + len(tw.DEFECTS))
    assert both.objects == ("ring",) * 6 + ("star",) * 6
    assert both.defects[:6] == ("good", "good", *tw.DEFECTS)
    np.testing.assert_array_equal(both.labels, [0, 0, 1, 1, 1, 1] * 2)
    np.testing.assert_array_equal(both.images[:2], good.images)  # the same scenes as scenes_of draws
    np.testing.assert_array_equal(both.images[3], holes.images[0])
    np.testing.assert_array_equal(both.masks[3], holes.masks[0])
    with pytest.raises(ValueError, match="choose from"):
        tw.labelled_set(["dragon"], 1, 1, seed=0)
