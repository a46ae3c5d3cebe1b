"""The sample format's two views: ``augment.views_per_sample: 2`` trains on both as separate samples."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from seg_pipeline.contracts import ShardSet
from seg_pipeline.data.combined import RemappedSource
from seg_pipeline.data.loaders import build_train_loader
from seg_pipeline.data.samples import split_views
from seg_pipeline.settings import LoaderSettings
from seg_pipeline.training.sources import band_stats
from seg_pipeline_tests.conftest import scratch_dir
from seg_pipeline_tests.data.test_sampling import drawn, fire_data, ingest_fire_dataset

#: D4 geometry only: a view's pixels are its tile's, moved, so the mask can be read back from band 0.
GEOMETRY_ONLY = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "noise_std": 0.0}


@pytest.fixture(scope="module")
def shards(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ShardSet:
    return ingest_fire_dataset(scratch_dir(request, tmp_path_factory, "views"))


def _classes_from_pixels(image: torch.Tensor, shards: ShardSet) -> torch.Tensor:
    """The class map band 0 encodes (``10 + 80 * class`` before normalisation)."""
    stats = band_stats(shards.catalog.normalization, "views")
    raw = image[0].double() * stats.std[0] + stats.mean[0]
    return ((raw - 10) / 80).round().long()


def test_split_views_makes_two_samples_and_leaves_one_view_alone() -> None:
    a, b, ma, mb = torch.zeros(1), torch.ones(1), torch.zeros(1), torch.ones(1)
    sample = {"image": a, "mask": ma, "item_id": "t#0", "image_view1": a, "mask_view1": ma}
    sample.update(image_view2=b, mask_view2=mb)
    first, second = split_views(sample)
    assert first == {"image": a, "mask": ma, "item_id": "t#0", "view": 0}
    assert second == {"image": b, "mask": mb, "item_id": "t#0", "view": 1}
    single = {"image": a, "mask": ma, "item_id": "t#0"}
    assert split_views(single) == [single]


def test_two_views_double_the_epoch_with_pairs_of_the_same_patch(shards: ShardSet) -> None:
    one = fire_data(shards)
    two = fire_data(shards, augment={"views_per_sample": 2})
    assert len(two) == 2 * len(one)
    single = drawn(one, [0])
    samples = drawn(two, [0])
    assert len(samples) == 2 * len(single)
    assert Counter(s["item_id"] for s in samples) == Counter({s["item_id"]: 2 for s in single})
    by_item = {s["item_id"]: s for s in single}
    differ = 0
    for first, second in zip(samples[::2], samples[1::2], strict=True):
        # a pair: one read patch, consecutive, views 0 and 1
        assert first["item_id"] == second["item_id"] and (first["view"], second["view"]) == (0, 1)
        assert first["image"].shape == second["image"].shape == (3, 64, 64)
        assert not torch.equal(first["image"], second["image"])  # independently augmented
        differ += not torch.equal(first["mask"], second["mask"])
        # view 1 is the sample the one-view stream gives; view 2 is the extra one
        plain = by_item[first["item_id"]]
        assert torch.equal(first["image"], plain["image"]) and torch.equal(first["mask"], plain["mask"])
    assert differ > len(single) // 2  # D4 geometry differs between the views of most pairs
    again = drawn(fire_data(shards, augment={"views_per_sample": 2}), [0])
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, samples, strict=True))
    assert not all(
        torch.equal(a["image"], b["image"]) for a, b in zip(drawn(two, [1]), samples, strict=True)
    )  # another epoch, other draws


def test_each_view_has_the_mask_of_its_own_geometry(shards: ShardSet) -> None:
    two = fire_data(shards, augment={**GEOMETRY_ONLY, "views_per_sample": 2})
    turned = 0
    for first, second in zip(*[iter(drawn(two, [0, 1]))] * 2, strict=True):
        for view in (first, second):
            assert torch.equal(view["mask"], _classes_from_pixels(view["image"], shards)), view["item_id"]
        turned += not torch.equal(first["mask"], second["mask"])
    assert turned > 0


def test_batches_hold_both_views_as_samples_with_loader_workers(shards: ShardSet) -> None:
    data = fire_data(shards, augment={**GEOMETRY_ONLY, "views_per_sample": 2})
    loader = build_train_loader(data, LoaderSettings(batch_size=4, num_workers=2), seed=3)
    data.set_epoch(0)
    batches = list(loader)
    assert all(b["image"].shape[1:] == (3, 64, 64) and b["mask"].shape[1:] == (64, 64) for b in batches)
    ids = [i for b in batches for i in b["item_id"]]
    assert len(ids) == len(data) and set(Counter(ids).values()) == {2}
    for batch in batches:
        for image, mask in zip(batch["image"], batch["mask"], strict=True):
            assert torch.equal(mask, _classes_from_pixels(image, shards))


def test_remapped_source_refuses_one_view_samples_and_other_counts() -> None:
    with pytest.raises(ValueError, match="views=3"):
        RemappedSource([], None, "x", views=3)
    source = RemappedSource([{"image": torch.zeros(1), "mask": torch.zeros(1)}], None, "x", views=2)
    assert len(source) == 2
    with pytest.raises(ValueError, match="two_views"):
        list(source)


def test_validation_data_has_one_view(shards: ShardSet) -> None:
    from seg_pipeline.training.sources import build_validation_data

    validation = build_validation_data(shards, "val", band_stats(shards.catalog.normalization, "v"))
    sample = validation[0]
    assert "image_view1" not in sample and "view" not in sample
    assert np.isfinite(sample["image"].numpy()).all()
