"""GeoPatchDataset and PatchSizeBatchSampler on small seeded GeoTIFFs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from seg_pipeline.data.augment import Augmenter
from seg_pipeline.data.patches import GeoPatchDataset, PatchSizeBatchSampler
from seg_pipeline.data.raster_io import write_geotiff
from seg_pipeline.settings import AugmentSettings
from seg_pipeline_tests.conftest import scratch_dir

IGNORE = 255


@pytest.fixture(scope="module")
def rasters(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = scratch_dir(request, tmp_path_factory, "geo")
    rng = np.random.default_rng(0)
    big = rng.integers(1, 255, size=(3, 300, 200), dtype=np.uint8)
    big_mask = rng.integers(0, 4, size=(300, 200), dtype=np.uint8)
    small = rng.integers(1, 255, size=(3, 30, 40), dtype=np.uint8)
    small_mask = rng.integers(0, 4, size=(30, 40), dtype=np.uint8)
    paths = {}
    for name, array in (("big", big), ("big_mask", big_mask), ("small", small), ("small_mask", small_mask)):
        paths[name] = write_geotiff(
            root / f"{name}.tif", array, crs="EPSG:32633", transform=(1, 0, 500, 0, -1, 900)
        )
    return {"paths": paths, "big": big, "big_mask": big_mask, "small": small, "small_mask": small_mask}


def test_geo_patches_stay_inside_and_match_the_raster(rasters: dict) -> None:
    p = rasters["paths"]
    dataset = GeoPatchDataset(
        [p["big"]], [p["big_mask"]], patch_sizes=(64, 128), samples_per_epoch=40, seed=1
    )
    stats = dataset.stats
    tops, lefts = set(), set()
    for index in range(40):
        for size in (64, 128):
            _, window = dataset.window_for(index, size)
            assert window.row_off >= 0 and window.col_off >= 0
            assert window.row_off + window.height <= 300 and window.col_off + window.width <= 200
            assert (window.height, window.width) == (size, size)
            tops.add(window.row_off)
            lefts.add(window.col_off)
    assert len(tops) > 10 and len(lefts) > 10
    sample = dataset[(7, 64)]
    _, window = dataset.window_for(7, 64)
    r, c = window.row_off, window.col_off
    expected = rasters["big"][:, r : r + 64, c : c + 64] / np.asarray(stats.std)[:, None, None]
    np.testing.assert_allclose(sample["image"].numpy(), expected, rtol=1e-6)
    np.testing.assert_array_equal(sample["mask"].numpy(), rasters["big_mask"][r : r + 64, c : c + 64])
    assert torch.equal(dataset[(7, 64)]["image"], sample["image"])  # seeded
    dataset.set_epoch(1)
    assert dataset.window_for(7, 64)[1] != window


def test_small_raster_is_padded(rasters: dict) -> None:
    p = rasters["paths"]
    dataset = GeoPatchDataset([p["small"]], [p["small_mask"]], patch_sizes=(64,), samples_per_epoch=2)
    sample = dataset[0]
    assert sample["image"].shape == (3, 64, 64)
    mask = sample["mask"].numpy()
    np.testing.assert_array_equal(mask[:30, :40], rasters["small_mask"])
    assert (mask[30:, :] == IGNORE).all() and (mask[:, 40:] == IGNORE).all()
    assert (sample["image"][:, 30:, :] == 0).all() and (sample["image"][:, :, 40:] == 0).all()
    unlabeled = GeoPatchDataset([p["small"]], None, patch_sizes=(16,), samples_per_epoch=1)[0]
    assert (unlabeled["mask"] == IGNORE).all()


def test_patch_size_constant_per_batch_and_varies(rasters: dict) -> None:
    p = rasters["paths"]
    dataset = GeoPatchDataset(
        [p["big"], p["small"]],
        [p["big_mask"], None],
        patch_sizes=(32, 48, 64),
        samples_per_epoch=48,
        seed=2,
        augmenter=Augmenter(AugmentSettings()),
    )
    sampler = PatchSizeBatchSampler(len(dataset), 4, dataset.patch_sizes, seed=3)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    sizes = []
    for batch in loader:
        b, _, h, w = batch["image"].shape
        assert h == w and batch["mask"].shape == (b, h, w)
        sizes.append(h)
    assert len(sizes) == 12 and set(sizes) == {32, 48, 64}
    assert sizes == sampler.batch_sizes()
    sampler.set_epoch(1)
    assert sampler.batch_sizes() != sizes
    cycle = PatchSizeBatchSampler(10, 3, (8, 16), sampling="cycle")
    assert [len(b) for b in cycle] == [3, 3, 3, 1] and cycle.batch_sizes() == [8, 16, 8, 16]


def test_geo_patch_rejects_bad_input(rasters: dict) -> None:
    p = rasters["paths"]
    with pytest.raises(ValueError, match="same size"):
        GeoPatchDataset([p["big"]], [p["small_mask"]], samples_per_epoch=1)
    with pytest.raises(ValueError, match="target_paths"):
        GeoPatchDataset([p["big"]], [], samples_per_epoch=1)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        GeoPatchDataset([p["big"]], samples_per_epoch=0)
    with pytest.raises(ValueError, match="patch_size_sampling"):
        GeoPatchDataset([p["big"]], samples_per_epoch=1, patch_size_sampling="all")
