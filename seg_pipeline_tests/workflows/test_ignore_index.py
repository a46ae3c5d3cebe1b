"""The ignore value set at ingest is the one training, validation, prediction and evaluation ignore.

``ignore_index: 99`` lies outside the class range (a dedicated "not labelled" value); ``0`` lies
inside it (class 0 means "not labelled"). Either way the value reaches every stage through the
typed contracts, and every stage leaves exactly those pixels out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from seg_pipeline.contracts import AuxiliarySet, ShardSet
from seg_pipeline.data.synthetic import TARGET_CLASSES, SyntheticSpec, write_synthetic_dataset
from seg_pipeline.metrics import ConfusionMatrix
from seg_pipeline.models.checkpoint import load_checkpoint
from seg_pipeline.settings import (
    DatasetSettings,
    EvaluationSettings,
    PredictSettings,
    PretrainSettings,
    ScoringSettings,
    ShardSettings,
    SplitSettings,
)
from seg_pipeline.training.sources import TrainingSource
from seg_pipeline.workflows import ingest
from seg_pipeline.workflows.layout import DataLayout
from seg_pipeline.workflows.predict import predict_split
from seg_pipeline.workflows.report import build_report, score_sets
from seg_pipeline.workflows.stage import StageJob, prepare_stage
from seg_pipeline.workflows.train import StageRun, _spec, pretrain
from seg_pipeline_tests.conftest import tiny_stage


def _dataset(root: Path, ignore: int) -> ShardSet:
    """Synthetic tiles whose masks hold ``ignore`` in a 10x10 block of every tile (and, for 0, wherever
    the synthetic class 0 lies)."""
    raw = write_synthetic_dataset(
        root / "raw" / "d", SyntheticSpec(grid_rows=3, grid_cols=4, tile_size=32), seed=4
    )
    for path in sorted((raw / "masks").glob("*.tif")):
        with rasterio.open(path, "r+") as dst:
            mask = dst.read(1)
            mask[:10, :10] = ignore
            dst.write(mask, 1)
    layout = DataLayout.at(root)
    quiet = {"log_fn": lambda _line: None}
    catalog = ingest.catalogue(DatasetSettings(dataset_id="d", ignore_index=ignore), layout, **quiet).catalog
    assert catalog.n_quarantined == 0 and catalog.ignore_index == ignore
    split = SplitSettings(train_fraction=0.6, val_fraction=0.4, test_fraction=0.0)
    return ingest.shard(ShardSettings(), catalog, ingest.split(split, catalog, **quiet), **quiet).shards


@pytest.mark.parametrize("ignore", [99, 0])
def test_every_stage_ignores_exactly_the_ignore_index_pixels(tmp_path: Path, ignore: int) -> None:
    target = _dataset(tmp_path, ignore)
    settings = PretrainSettings.parse(tiny_stage(augment={"enabled": False}))

    # Training: the loss does not depend on the logits at ignored pixels, and does elsewhere.
    job = StageJob(
        stage="pretrain", settings=settings, target=target, sources=[TrainingSource(shards=target)],
        checkpoint_dir=str(tmp_path / "probe"), spec=_spec(settings.model, target),
    )  # fmt: skip
    prepared = prepare_stage(job, log=lambda _line: None)
    batch = next(iter(prepared.train_loader))
    mask = batch["mask"]
    ignored = mask == ignore
    assert ignored.any() and (~ignored).any()
    loss_fn = prepared.trainer.runner.objective.loss_fn  # type: ignore[attr-defined]
    logits = torch.randn(
        mask.shape[0], len(TARGET_CLASSES), *mask.shape[1:], generator=torch.Generator().manual_seed(0)
    )
    base = loss_fn(logits, mask)
    noisy_ignored = logits + torch.randn_like(logits) * ignored.unsqueeze(1)
    torch.testing.assert_close(loss_fn(noisy_ignored, mask), base)
    noisy_labelled = logits + torch.randn_like(logits) * (~ignored).unsqueeze(1)
    assert not torch.allclose(loss_fn(noisy_labelled, mask), base)

    # Validation: the epoch metric equals a confusion matrix built by hand without those pixels.
    model = prepared.trainer.runner.bare_model.eval()
    scores = prepared.evaluate_fn(model, prepared.val_loader)
    matrix = ConfusionMatrix(len(TARGET_CLASSES))
    with torch.no_grad():
        for tiles in prepared.val_loader:  # whole tiles (smaller than a window here: one pass each)
            for val in tiles:
                out = model(val["image"][None])[0]
                if ignore < len(TARGET_CLASSES):
                    out[ignore] = float("-inf")
                keep = val["mask"] != ignore
                matrix.update(out.argmax(0)[keep].numpy(), val["mask"][keep].numpy())
    assert scores["val/pixel_accuracy"] == pytest.approx(matrix.compute().pixel_accuracy)

    # A whole stage trains (a 99 in a CE target would raise) and records the value with the model.
    trained = pretrain(settings, target, AuxiliarySet(data_version="none"), StageRun(tmp_path / "ckpt"))
    assert trained.ignore_index == ignore
    assert load_checkpoint(trained.checkpoint)["config"]["run"]["ignore_index"] == ignore

    # Prediction carries it on; an ignore value inside the class range is never predicted.
    predict = PredictSettings.parse(
        {"split": "val", "tta": {"scales": [1.0], "flips": ["none"]}, "color_png": False}
    )
    predictions = predict_split(
        predict, target, [("m", trained)], "m", tmp_path / "pred", log_fn=lambda _l: None
    )
    assert predictions.ignore_index == ignore
    for item in predictions.items:
        with rasterio.open(predictions.folder("ensemble") / f"{item.item_id}.tif") as src:
            classes = src.read(1)
        if ignore < len(TARGET_CLASSES):
            assert not (classes[classes != src.nodata] == ignore).any()

    # Evaluation scores every pixel but those.
    evaluations = score_sets(predictions, ScoringSettings(), log_fn=lambda _l: None)
    truth_pixels = 0
    for item in predictions.items:
        with rasterio.open(item.target) as src:
            truth_pixels += int((src.read(1) != ignore).sum())
    assert int(evaluations["ensemble"].matrix.matrix.sum()) == truth_pixels
    report = build_report(
        EvaluationSettings(overlays=0), predictions, tmp_path / "report", log_fn=lambda _l: None
    )
    assert report.score("ensemble").pixel_accuracy == pytest.approx(
        evaluations["ensemble"].metrics.pixel_accuracy
    )
    assert np.isnan(report.score("ensemble").iou[TARGET_CLASSES[0]]) == (ignore == 0)
