"""A real (tiny) stage checkpoint and its export, built once for all export tests.

Package-scoped: training the one-step stage and exporting it are the slow part, and every test
module here reads the same files (none of them changes them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seg_pipeline.contracts import AuxiliarySet
from seg_pipeline.data.synthetic import SyntheticSpec
from seg_pipeline.export import ExportResult, export_model
from seg_pipeline.models.loading import load_trained_model
from seg_pipeline.settings import PretrainSettings, SplitSettings
from seg_pipeline.workflows.train import StageRun, pretrain
from seg_pipeline_tests.conftest import ingest_synthetic, scratch_dir, tiny_stage
from seg_pipeline_tests.export.helpers import EXAMPLE_SIZE, LINEAGE


@pytest.fixture(scope="package")
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a one-step Unet-mobilenet_v2 stage on 32x32 synthetic shards."""
    root = scratch_dir(request, tmp_path_factory, "export_stage")
    split = SplitSettings(policy="supervised", train_fraction=0.5, val_fraction=0.5, test_fraction=0.0)
    target = ingest_synthetic(
        root, "demo", SyntheticSpec(grid_rows=2, grid_cols=3, tile_size=32), seed=3, split=split
    )
    settings = PretrainSettings.parse(tiny_stage(loop={"max_steps_per_epoch": 1}))
    return Path(
        pretrain(settings, target, AuxiliarySet(data_version="none"), StageRun(root / "ckpt")).checkpoint
    )


@pytest.fixture(scope="package")
def exported(
    request: pytest.FixtureRequest, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> ExportResult:
    out_dir = scratch_dir(request, tmp_path_factory, "export_out") / "model-v1"
    return export_model(checkpoint, out_dir, example_size=EXAMPLE_SIZE, lineage=LINEAGE)


@pytest.fixture(scope="package")
def eager(checkpoint: Path) -> torch.nn.Module:
    """The independent reference: the eager SegmentationModel with its own padding code."""
    return load_trained_model(checkpoint)
