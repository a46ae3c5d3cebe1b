"""Whole stage batches written in place: the same batches as collating the interleaved samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from seg_pipeline.data.batching import SourceBatches
from seg_pipeline.data.combined import InterleavedSources
from seg_pipeline.data.loaders import FinishingDataLoader, build_train_loader
from seg_pipeline.data.synthetic import TARGET_CLASSES, SyntheticSpec
from seg_pipeline.settings import LoaderSettings, PretrainSettings
from seg_pipeline.training.sources import TrainingSource, build_training_data
from seg_pipeline_tests.conftest import ingest_synthetic, tiny_stage
from seg_pipeline_tests.data.test_combined import AUX_TO_TARGET
from seg_pipeline_tests.data.test_shared_buffers import assert_dropped_batches_reuse_blocks


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[TrainingSource]:
    """A target and an auxiliary source whose classes are remapped, as stage 1 trains on."""
    root = tmp_path_factory.mktemp("batching")
    target = ingest_synthetic(root, "demo", SyntheticSpec(grid_rows=3, grid_cols=3, tile_size=32), seed=1)
    aux = ingest_synthetic(
        root, "aux", SyntheticSpec(grid_rows=3, grid_cols=3, tile_size=32, class_scheme="aux"), seed=2
    )
    return [TrainingSource(shards=target), TrainingSource(shards=aux, class_remap=AUX_TO_TARGET)]


def _stream(sources: list[TrainingSource], **augment: Any) -> InterleavedSources:
    settings = PretrainSettings.parse(tiny_stage(augment={"noise_p": 1.0, **augment}))
    return build_training_data(sources, TARGET_CLASSES, 255, settings)


def _epochs(loader: Any, dataset: Any, epochs: int = 2) -> list[dict[str, Any]]:
    batches = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        batches += list(loader)  # every batch is kept while the workers go on
    return batches


@pytest.mark.parametrize(("workers", "views"), [(0, 1), (2, 1), (0, 2)])
def test_batches_equal_the_collated_samples(sources: list[TrainingSource], workers: int, views: int) -> None:
    """Same samples, same order, same pixels and masks (remapped) as the per-sample path."""
    config = LoaderSettings(batch_size=4, num_workers=workers, persistent_workers=workers > 0)
    per_sample = _stream(sources, views_per_sample=views)
    batched = SourceBatches(_stream(sources, views_per_sample=views), batch_size=4)
    loader = build_train_loader(batched, config)
    assert isinstance(loader, FinishingDataLoader)
    expected = _epochs(build_train_loader(per_sample, config), per_sample)
    got = _epochs(loader, batched)
    assert len(got) == len(expected) > 2
    for mine, theirs in zip(got, expected, strict=True):
        assert mine["item_id"] == theirs["item_id"] and mine["source"] == theirs["source"]
        assert torch.equal(mine["image"], theirs["image"]) and torch.equal(mine["mask"], theirs["mask"])
        assert mine["image"].dtype == torch.float32 and mine["mask"].dtype == torch.int64
        if views == 2:
            assert torch.equal(mine["view"], theirs["view"])
    assert any(s.startswith("aux") for batch in got for s in batch["source"])


def test_a_reader_drops_its_last_partial_batch_when_asked(sources: list[TrainingSource]) -> None:
    stream = _stream(sources)
    size = next(n for n in range(3, len(stream)) if len(stream) % n)
    sizes = [len(b["item_id"]) for b in SourceBatches(stream, batch_size=size)]
    assert sum(sizes) == len(stream) and sizes[-1] == len(stream) % size
    kept = [len(b["item_id"]) for b in SourceBatches(stream, batch_size=size, drop_last=True)]
    assert kept == sizes[:-1] == [size] * (len(stream) // size)


def test_samples_of_different_sizes_name_the_sample(sources: list[TrainingSource]) -> None:
    stream = _stream(sources)
    stream.sources[1].dataset.read_size = 16  # the auxiliary source now reads smaller patches
    with pytest.raises(ValueError, match=r"aux/train.*must share a size"):
        list(SourceBatches(stream, batch_size=64))


def test_workers_write_batches_into_blocks_they_refill(sources: list[TrainingSource]) -> None:
    """A consumer that drops each batch (a training loop) is served by a few reused blocks."""
    assert_dropped_batches_reuse_blocks(SourceBatches(_stream(sources), batch_size=2))


def test_a_plain_dataloader_gets_batches_in_main_process_memory(sources: list[TrainingSource]) -> None:
    stream = _stream(sources)
    side = stream.sources[0].dataset.patch_size
    batch = next(iter(DataLoader(SourceBatches(stream, batch_size=3), batch_size=None)))
    assert batch["image"].shape == (3, 3, side, side) and not batch["image"].is_shared()


def test_the_stage_trains_on_source_batches(tmp_path: Path) -> None:
    """run_stage's loader is the batch path (what the stage logs and trains on is covered by the
    workflow tests; here: prepare_stage builds it)."""
    from seg_pipeline.settings.models import ModelSpec
    from seg_pipeline.workflows.stage import StageJob, prepare_stage

    target = ingest_synthetic(tmp_path, "demo", SyntheticSpec(grid_rows=3, grid_cols=3, tile_size=32), seed=1)
    settings = PretrainSettings.parse(tiny_stage())
    job = StageJob(
        stage="pretrain",
        settings=settings,
        target=target,
        sources=[TrainingSource(shards=target)],
        checkpoint_dir=str(tmp_path / "ckpt"),
        spec=ModelSpec.from_settings(settings.model, num_classes=target.catalog.num_classes, in_channels=3),
    )
    lines: list[str] = []
    prepared = prepare_stage(job, lines.append)
    assert isinstance(prepared.train_loader.dataset, SourceBatches)
    assert any("tile cache lru" in line for line in lines)
