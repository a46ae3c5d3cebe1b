"""Class remapping and interleaving of combined sources (F6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seg_pipeline.data.combined import (
    ClassRemapError,
    InterleavedSources,
    RemappedSource,
    remap_table,
    resolve_remap,
)
from seg_pipeline.data.synthetic import AUX_CLASSES, TARGET_CLASSES

AUX_TO_TARGET = {
    "unknown": None,
    "bareland": "bare_soil",
    "rangeland": "vegetation",
    "developed_space": "building",
    "tree": "vegetation",
    "agriculture_land": "cropland",
}


def test_resolve_remap_by_names_keeps_shared_names_and_ignores_unmapped() -> None:
    remap = resolve_remap(AUX_TO_TARGET, AUX_CLASSES, TARGET_CLASSES)
    # road and water exist in both schemes, so they map without being listed.
    assert remap == {0: None, 1: 0, 2: 2, 3: 3, 4: 4, 5: 2, 6: 1, 7: 5}


def test_resolve_remap_rejects_unknown_names_with_the_valid_list() -> None:
    with pytest.raises(ClassRemapError, match=r"unknown target class 'forest'.*'bare_soil'"):
        resolve_remap({"tree": "forest"}, AUX_CLASSES, TARGET_CLASSES)
    with pytest.raises(ClassRemapError, match="source class id 9"):
        resolve_remap({9: 1}, AUX_CLASSES, TARGET_CLASSES)


def test_remapped_source_applies_the_table_and_sends_unmapped_to_ignore() -> None:
    lut = remap_table({0: None, 1: 0, 2: 2}, ignore_index=255)
    mask = torch.tensor([[0, 1], [2, 255]], dtype=torch.int64)
    samples = [{"image": torch.zeros(3, 2, 2), "mask": mask, "item_id": "a"}]
    (out,) = list(RemappedSource(samples, lut, name="aux"))
    assert out["mask"].tolist() == [[255, 0], [2, 255]]
    assert out["source"] == "aux"
    assert mask.tolist() == [[0, 1], [2, 255]]  # the source sample is not modified


def _source(name: str, n: int) -> RemappedSource:
    return RemappedSource(
        [{"mask": torch.zeros(1, 1), "item_id": f"{name}{i}"} for i in range(n)], None, name
    )


def test_interleaving_yields_every_sample_once_mixed_and_seeded() -> None:
    combined = InterleavedSources([_source("t", 20), _source("a", 10)], seed=3)
    first = [s["item_id"] for s in combined]
    assert sorted(first) == sorted([f"t{i}" for i in range(20)] + [f"a{i}" for i in range(10)])
    assert first != sorted(first, key=lambda x: x[0])  # not one source after the other
    assert [s["item_id"] for s in InterleavedSources([_source("t", 20), _source("a", 10)], seed=3)] == first
    assert len(combined) == 30


def test_a_capped_source_gives_its_limit_per_epoch_and_the_rest_everything() -> None:
    combined = InterleavedSources([_source("t", 20), _source("a", 50)], seed=3, limits=[None, 10])
    drawn = [s["item_id"] for s in combined]
    assert len(combined) == 30 and len(drawn) == 30
    assert sorted(i for i in drawn if i.startswith("t")) == sorted(f"t{i}" for i in range(20))
    assert sum(i.startswith("a") for i in drawn) == 10
    assert combined.per_epoch() == [20, 10] and combined.per_epoch(workers=4) == [5, 3]
    with pytest.raises(ValueError, match="one positive count"):
        InterleavedSources([_source("t", 2)], limits=[0])


def test_aux_ratio_caps_auxiliary_patches_by_the_targets(tmp_path) -> None:
    from seg_pipeline.data.synthetic import SyntheticSpec
    from seg_pipeline.settings import PretrainSettings
    from seg_pipeline.training.sources import TrainingSource, build_training_data
    from seg_pipeline_tests.conftest import ingest_synthetic, tiny_stage

    target = ingest_synthetic(tmp_path, "demo", SyntheticSpec(grid_rows=4, grid_cols=4, tile_size=32), seed=1)
    aux = ingest_synthetic(
        tmp_path, "aux", SyntheticSpec(grid_rows=8, grid_cols=8, tile_size=32, class_scheme="aux"), seed=2
    )
    sources = [TrainingSource(shards=target), TrainingSource(shards=aux, class_remap=AUX_TO_TARGET)]
    every = build_training_data(sources, TARGET_CLASSES, 255, PretrainSettings.parse(tiny_stage()))
    half = build_training_data(
        sources, TARGET_CLASSES, 255, PretrainSettings.parse({**tiny_stage(), "aux_ratio": 0.5})
    )
    target_patches, aux_patches = every.per_epoch()
    assert aux_patches > 2 * target_patches > 4  # without a cap the auxiliary set outweighs the target
    assert half.per_epoch() == [target_patches, round(0.5 * target_patches)]
    assert sum(1 for s in half if s["source"].startswith("aux")) == round(0.5 * target_patches)


def test_loader_lru_cache_reaches_every_training_source(tmp_path: Path) -> None:
    """Seed 000's ``data.cache_mode=lru``: the training loader's cache knob switches the tile cache of
    each source of the interleaved stream (an epoch fills it, the next reads from it)."""
    from seg_pipeline.data.loaders import build_train_loader
    from seg_pipeline.settings import LoaderSettings
    from seg_pipeline_tests.data.test_sampling import fire_data, ingest_fire_dataset

    data = fire_data(ingest_fire_dataset(tmp_path))
    (source,) = data.sources
    build_train_loader(data, LoaderSettings(batch_size=2, cache_mode="none"), seed=0)
    assert source.dataset.cache is None
    loader = build_train_loader(
        data, LoaderSettings(batch_size=2, cache_mode="lru", cache_max_items=4), seed=0
    )
    for _ in loader:
        pass
    assert source.dataset.cache is not None and 0 < len(source.dataset.cache) <= 4
