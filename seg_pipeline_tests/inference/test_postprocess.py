"""Tests for seg_pipeline.inference.postprocess on hand-drawn class maps with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from seg_pipeline.inference.postprocess import morphological_open_close, remove_small_regions


def field(height: int = 12, width: int = 12, value: int = 0) -> np.ndarray:
    return np.full((height, width), value, dtype=np.uint8)


# --------------------------------------------------------------------------- remove_small_regions


def test_two_pixel_island_is_removed() -> None:
    classes = field()
    classes[5, 5:7] = 1
    cleaned = remove_small_regions(classes, min_area=3)
    assert np.array_equal(cleaned, field())
    assert cleaned.dtype == np.uint8


def test_region_of_exactly_min_area_is_kept_and_input_is_untouched() -> None:
    classes = field()
    classes[5, 5:7] = 1
    original = classes.copy()
    assert np.array_equal(remove_small_regions(classes, min_area=2), classes)
    remove_small_regions(classes, min_area=3)
    assert np.array_equal(classes, original)


def test_island_takes_the_majority_of_its_border() -> None:
    # Left half class 0, right half class 2; a 1-pixel island of class 1 at column 6 touches
    # column 5 (class 0, 3 border pixels) and column 7 (class 2, 3) and column 6 (class 2, 2 pixels).
    classes = field()
    classes[:, 6:] = 2
    classes[4, 6] = 1
    cleaned = remove_small_regions(classes, min_area=2)
    expected = field()
    expected[:, 6:] = 2
    assert np.array_equal(cleaned, expected)  # 5 class-2 neighbours beat 3 class-0 neighbours


def test_connectivity_decides_what_is_one_region() -> None:
    classes = field(6, 6)
    classes[1, 1] = classes[2, 2] = classes[3, 3] = 1  # a diagonal line of 3 pixels
    assert np.array_equal(remove_small_regions(classes, min_area=3, connectivity=8), classes)
    assert np.array_equal(remove_small_regions(classes, min_area=3, connectivity=4), field(6, 6))


def test_nested_small_regions_are_resolved_from_the_outside_in() -> None:
    classes = field(9, 9)
    classes[3:6, 3:6] = 1  # 9-pixel ring region of class 1 ...
    classes[4, 4] = 2  # ... around a 1-pixel island of class 2
    assert np.array_equal(remove_small_regions(classes, min_area=10), field(9, 9))


def test_ignore_value_is_never_changed_and_never_donates() -> None:
    classes = field()
    classes[:, :6] = 255  # nodata half
    classes[5, 6] = 1  # island touching nodata and class 0
    cleaned = remove_small_regions(classes, min_area=2, ignore_value=255)
    expected = field()
    expected[:, :6] = 255
    assert np.array_equal(cleaned, expected)


def test_remove_small_regions_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="min_area"):
        remove_small_regions(field(), min_area=0)
    with pytest.raises(ValueError, match="connectivity"):
        remove_small_regions(field(), min_area=2, connectivity=6)
    with pytest.raises(ValueError, match="classes"):
        remove_small_regions(np.zeros((4, 4), dtype=np.float32), min_area=2)


# --------------------------------------------------------------------------- morphological_open_close


def test_open_removes_a_speck_and_a_thin_line_but_keeps_a_big_block() -> None:
    classes = field(16, 16)
    classes[2, 2] = 1  # speck
    classes[10, 1:15] = 2  # 1-pixel-thick line
    classes[3:9, 8:14] = 3  # 6x6 block survives a radius-1 opening ...
    opened = morphological_open_close(classes, radius=1, op="open")
    expected = field(16, 16)
    expected[3:9, 8:14] = 3
    expected[[3, 3, 8, 8], [8, 13, 8, 13]] = 0  # ... except its corners: a disk of radius 1 is a cross
    assert np.array_equal(opened, expected)


def test_open_keeps_regions_touching_the_border() -> None:
    classes = field(10, 10)
    classes[:, :4] = 1  # a 4-wide band along the left border
    assert np.array_equal(morphological_open_close(classes, radius=1, op="open"), classes)


def test_open_treats_the_raster_edge_as_extending_outwards() -> None:
    # A 2-pixel band along the left edge is half of a plane once the edge is extended, so an
    # opening of radius 2 keeps it (scipy's zero border, or too little padding, would erase it).
    classes = field(12, 12)
    classes[:, :2] = 1
    assert np.array_equal(morphological_open_close(classes, radius=2, op="open"), classes)


def test_close_fills_a_one_pixel_gap_and_rounds_a_hole() -> None:
    classes = field(12, 12, value=1)
    classes[:, 2] = 0  # a 1-pixel-wide line of class 0 splits class 1: closing class 1 fills it
    classes[4:9, 6:11] = 0  # a 5x5 hole in class 1: too big to fill, but its corners get filled
    closed = morphological_open_close(classes, radius=1, op="close")
    expected = field(12, 12, value=1)
    expected[4:9, 6:11] = 0
    expected[[4, 4, 8, 8], [6, 10, 6, 10]] = 1
    assert np.array_equal(closed, expected)


def test_open_close_cleans_a_noisy_map_but_keeps_big_regions() -> None:
    classes = field(20, 20)
    classes[:, 10:] = 1
    noisy = classes.copy()
    noisy[[3, 15, 7], [3, 5, 14]] = [1, 2, 0]  # isolated wrong pixels in both halves
    assert np.array_equal(morphological_open_close(noisy, radius=1, op="open_close"), classes)


def test_radius_zero_is_identity_and_bad_arguments_raise() -> None:
    classes = np.random.default_rng(0).integers(0, 3, size=(8, 8))
    assert np.array_equal(morphological_open_close(classes, radius=0), classes)
    with pytest.raises(ValueError, match="radius"):
        morphological_open_close(classes, radius=-1)
    with pytest.raises(ValueError, match="op"):
        morphological_open_close(classes, radius=1, op="erode")


def test_morphology_never_touches_or_spreads_the_ignore_value() -> None:
    classes = field(10, 10)
    classes[:, :3] = 255  # nodata strip
    classes[4, 3] = 1  # a speck touching nodata: it must become class 0, not 255
    classes[7, 7] = 255  # a single nodata pixel is not "opened" away
    expected = field(10, 10)
    expected[:, :3] = 255
    expected[7, 7] = 255
    result = morphological_open_close(classes, radius=1, op="open_close", ignore_value=255)
    assert np.array_equal(result, expected)
