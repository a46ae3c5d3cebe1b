"""``tune_ensemble`` and ``predict_split``: choices tuned on val, applied when the test split is predicted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from seg_pipeline.contracts import ShardSet
from seg_pipeline.data.normalization import BandStats
from seg_pipeline.data.synthetic import SyntheticSpec
from seg_pipeline.evaluation.report import evaluate_pairs
from seg_pipeline.inference.predict import LoadedModel, predict_files
from seg_pipeline.settings import PredictSettings, SplitSettings
from seg_pipeline.workflows.predict import labeled_rows, tune_ensemble
from seg_pipeline_tests.conftest import ingest_synthetic, scratch_dir

FAST = {"tta": {"scales": [1.0], "flips": ["none", "h"]}, "windows": {"window": 32, "overlap": 8}}


@pytest.fixture(scope="module")
def shards(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ShardSet:
    split = SplitSettings(policy="supervised", train_fraction=0.4, val_fraction=0.3, test_fraction=0.3)
    spec = SyntheticSpec(grid_rows=4, grid_cols=4, tile_size=32)
    return ingest_synthetic(scratch_dir(request, tmp_path_factory, "tune"), "demo", spec, seed=4, split=split)


def _models(shards: ShardSet) -> list[LoadedModel]:
    stats = shards.catalog.normalization
    assert stats is not None
    band_stats = BandStats(tuple(stats.mean), tuple(stats.std))
    models = []
    for seed in (0, 1):
        conv = nn.Conv2d(len(band_stats.mean), shards.catalog.num_classes, kernel_size=3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(seed)))
            conv.bias.zero_()
        models.append(
            LoadedModel(f"m{seed}", conv.eval(), tuple(shards.catalog.class_names), band_stats, "t")
        )
    return models


def test_tuning_scores_match_predicting_and_evaluating_the_val_files(
    shards: ShardSet, tmp_path: Path
) -> None:
    settings = PredictSettings.parse({**FAST, "tuning": {"max_pixels": 100_000}})
    lines: list[str] = []
    tuning = tune_ensemble(settings, shards, _models(shards), "test", lines.append)
    assert tuning is not None and tuning.split == "val" and set(tuning.weights) == {"m0", "m1"}
    assert {"m0", "m1", "m0 + m1", "ensemble, no class bias", "ensemble, class bias"} <= set(tuning.scores)
    assert tuning.scores["ensemble, class bias"] >= tuning.scores["ensemble, no class bias"]
    assert any(line.startswith("ensemble tuning on val") for line in lines)

    # Every val pixel is in the sample, so each single model's tuning score is its val-file score.
    _, rows = labeled_rows(shards, "val")
    plain = settings.replace(tuning={"members": False, "class_bias": False})
    for model in _models(shards):
        folder = tmp_path / model.name
        predict_files([model], [(r.item_id, r.input_path) for r in rows], {"ensemble": folder}, plain)
        pairs = [(folder / f"{r.item_id}.tif", r.target_path) for r in rows]
        scored = evaluate_pairs(pairs, shards.catalog.num_classes, shards.catalog.ignore_index)  # type: ignore[arg-type]
        assert tuning.scores[model.name] == pytest.approx(float(scored.metrics.miou), abs=1e-6)


def test_tuning_on_the_evaluated_split_is_refused(shards: ShardSet) -> None:
    lines: list[str] = []
    settings = PredictSettings.parse({**FAST, "tuning": {"split": "test"}})
    assert tune_ensemble(settings, shards, _models(shards), "test", lines.append) is None
    (line,) = lines
    assert line.startswith("ensemble tuning skipped: split 'test' is the evaluated split (splits: ['test',")
    off = PredictSettings.parse({**FAST, "tuning": {"members": False, "class_bias": False}})
    assert tune_ensemble(off, shards, _models(shards), "test", lines.append) is None


def test_views_tuned_on_val_score_as_predicting_with_them_and_are_what_the_split_is_predicted_with(
    shards: ShardSet, tmp_path: Path
) -> None:
    views = {"scales": [0.5, 1.0], "flips": ["none", "h", "rot90"]}
    settings = PredictSettings.parse(
        {**FAST, "tta": views, "tuning": {"views": True, "members": False, "class_bias": False}}
    )
    lines: list[str] = []
    tuning = tune_ensemble(settings, shards, _models(shards), "test", lines.append)
    assert tuning is not None and tuning.scales is not None and tuning.flips is not None
    assert any("TTA views: scales" in line for line in lines)
    chosen = f"views {tuning.scales} x {tuning.flips}"
    assert tuning.scores[chosen] >= tuning.scores["views [0.5, 1.0] x ['none', 'h', 'rot90']"]

    # The chosen views' tuning score is the val files' score when predicted with those views.
    _, rows = labeled_rows(shards, "val")
    plain = settings.replace(
        tta={"scales": tuning.scales, "flips": tuning.flips}, tuning={"views": False, "members": False,
                                                                      "class_bias": False},
    )  # fmt: skip
    folder = tmp_path / "chosen"
    predict_files(_models(shards), [(r.item_id, r.input_path) for r in rows], {"ensemble": folder}, plain)
    pairs = [(folder / f"{r.item_id}.tif", r.target_path) for r in rows]
    scored = evaluate_pairs(pairs, shards.catalog.num_classes, shards.catalog.ignore_index)  # type: ignore[arg-type]
    assert tuning.scores[chosen] == pytest.approx(float(scored.metrics.miou), abs=1e-6)
