"""A real (tiny) stage checkpoint and its export, built once for all export tests.

Package-scoped: training the one-step stage and exporting it are the slow part, and every test
module here reads the same files (none of them changes them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seg_pipeline.data.headers import build_headers, write_catalog
from seg_pipeline.data.shards import write_shards
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.data.splits import SplitConfig, assign_splits
from seg_pipeline.data.synthetic import TARGET_CLASSES, SyntheticSpec, write_synthetic_dataset
from seg_pipeline.export import ExportResult, export_model
from seg_pipeline.models import ModelSpec
from seg_pipeline.training.loop import TrainConfig
from seg_pipeline.training.stages import SourceSpec, StageConfig, load_trained_model, run_stage
from seg_pipeline_tests.export.helpers import EXAMPLE_SIZE, LINEAGE


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a one-step UNet-resnet18 stage on 32x32 synthetic shards."""
    root = tmp_path_factory.mktemp("export_stage")
    raw = write_synthetic_dataset(
        root / "raw" / "demo", SyntheticSpec(grid_rows=2, grid_cols=3, tile_size=32), seed=3
    )
    headers = build_headers(DatasetSpec("demo", raw))
    processed = root / "processed" / "demo"
    write_catalog(headers.catalog, processed / "headers.parquet", headers.class_names)
    splits = assign_splits(
        headers.catalog,
        SplitConfig(policy="supervised", train_fraction=0.5, val_fraction=0.5, test_fraction=0.0),
    )
    write_shards(headers.catalog, splits, processed)
    target = SourceSpec("demo", processed, processed / "headers.parquet", TARGET_CLASSES)
    config = StageConfig(
        model=ModelSpec(
            architecture="unet", encoder="resnet18", in_channels=3, num_classes=len(TARGET_CLASSES)
        ),
        train=TrainConfig(epochs=1, max_steps_per_epoch=1, ema_decay=None, log_every_n_steps=0),
        warmup_epochs=0.0,
    )
    result = run_stage("pretrain", config, [target], target, root / "ckpt")
    return result.best_checkpoint


@pytest.fixture(scope="package")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out_dir = tmp_path_factory.mktemp("export_out") / "model-v1"
    return export_model(checkpoint, out_dir, example_size=EXAMPLE_SIZE, lineage=LINEAGE)


@pytest.fixture(scope="package")
def eager(checkpoint: Path) -> torch.nn.Module:
    """The independent reference: the eager SegmentationModel with its own padding code."""
    return load_trained_model(checkpoint)
