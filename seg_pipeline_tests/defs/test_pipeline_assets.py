"""The whole asset graph materialized in-process with a real MLflow store (SQLite, temp dir)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import mlflow
import pytest

from seg_pipeline.data.synthetic import SyntheticSpec, write_synthetic_dataset
from seg_pipeline.defs.assets.evaluate import (
    EVALUATION_CHECKS,
    champion_model,
    ensemble_predictions,
    evaluation_report,
)
from seg_pipeline.defs.assets.ingest import auxiliary_sources, dataset_splits, tile_headers, tile_shards
from seg_pipeline.defs.assets.train import kd_student_model, pretrained_model
from seg_pipeline.defs.checks import INGEST_CHECKS
from seg_pipeline.defs.resources import MlflowResource, StorageResource

TINY = {
    "model": {"architecture": "unet", "encoder": "resnet18"},
    "epochs": 1,
    "batch_size": 4,
    "max_steps_per_epoch": 2,
    "warmup_epochs": 0.0,
    "ema_decay": None,
    "log_every_n_steps": 1,
}


@pytest.fixture(scope="module")
def materialized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dg.ExecuteInProcessResult]:
    root = tmp_path_factory.mktemp("pipeline")
    # 64 px tiles: the encoder's deepest BatchNorm then sees 2x2 maps, so a rank's trailing batch of
    # one tile still trains (at 32 px it would be 1x1, one value per channel, which BatchNorm refuses).
    spec = SyntheticSpec(grid_rows=4, grid_cols=4, tile_size=64, labeled_fraction=0.8)
    write_synthetic_dataset(root / "raw" / "demo", spec, seed=5)
    aux = SyntheticSpec(grid_rows=2, grid_cols=3, tile_size=64, class_scheme="aux", item_prefix="oem")
    write_synthetic_dataset(root / "raw" / "demo_aux", aux, seed=6)
    result = dg.materialize(
        [
            tile_headers,
            dataset_splits,
            tile_shards,
            auxiliary_sources,
            pretrained_model,
            kd_student_model,
            ensemble_predictions,
            evaluation_report,
            champion_model,
            *INGEST_CHECKS,
            *EVALUATION_CHECKS,
        ],
        resources={"storage": StorageResource(data_root=str(root)), "mlflow": MlflowResource()},
        run_config=dg.RunConfig(
            ops={
                "dataset_splits": {
                    "config": {"train_fraction": 0.6, "val_fraction": 0.4, "test_fraction": 0.0}
                },
                # Stage 1 on two torchrun ranks (gloo on CPU) from the same asset code; KD in-process.
                "pretrained_model": {"config": {**TINY, "nproc_per_node": 2}},
                "kd_student_model": {
                    "config": {**TINY, "epochs": 2, "kd_warmup_epochs": 1, "transfer_split": "unlabeled"}
                },
                "ensemble_predictions": {
                    "config": {"split": "val", "scales": [1.0, 1.25], "window": 32, "overlap": 8}
                },
                "evaluation_report": {
                    "config": {"miou_floor": 0.0, "ensemble_tolerance": 1.0, "overlays": 1}
                },
            }
        ),
    )
    return root, result


def _client(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")


def test_pipeline_materializes_and_values_point_at_exact_checkpoints(materialized) -> None:
    _root, result = materialized
    assert result.success
    pre = result.output_for_node("pretrained_model")
    kd = result.output_for_node("kd_student_model")
    assert Path(pre["best_checkpoint"]).is_file() and Path(kd["best_checkpoint"]).is_file()
    assert Path(pre["best_checkpoint"]).parent != Path(kd["best_checkpoint"]).parent
    assert kd["teacher_best_val_miou"] == pre["best_score"]
    assert kd["epochs_run"] == 2 and pre["epochs_run"] == 1
    assert (pre["world_size"], kd["world_size"]) == (2, 1)
    assert result.asset_materializations_for_node("pretrained_model")[0].metadata["ddp_ranks"].value == 2
    meta = result.asset_materializations_for_node("kd_student_model")[0].metadata
    for key in (
        "best_val_miou",
        "per_class_iou",
        "epochs_run",
        "wall_time_s",
        "images_per_s",
        "device",
        "training_curves",
        "mlflow_run",
        "ignored_fraction_last_epoch",
    ):
        assert key in meta, key


def test_mlflow_runs_hold_params_metrics_tags_and_registered_models(materialized) -> None:
    root, result = materialized
    client = _client(root)
    run_id = result.dagster_run.run_id
    for node, stage, name in (
        ("pretrained_model", "pretrain", "seg_pipeline_pretrained"),
        ("kd_student_model", "kd", "seg_pipeline_student"),
    ):
        value = result.output_for_node(node)
        run = client.get_run(value["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["dagster.run_id"] == run_id
        assert run.data.tags["seg_pipeline.stage"] == stage
        assert (
            run.data.tags["seg_pipeline.data_version"]
            == result.output_for_node("tile_shards")["data_version"]
        )
        assert run.data.params["config.lr"] in ("0.0003", "0.0001")
        assert "val/miou" in run.data.metrics and "train/loss" in run.data.metrics
        history = client.get_metric_history(value["run_id"], "train/loss")
        assert [m.step for m in history] == list(range(1, value["epochs_run"] + 1))
        version = client.get_model_version(name, value["registered_version"])
        assert version.run_id == value["run_id"]
        artifacts = {a.path for a in client.list_artifacts(value["run_id"])}
        assert {"checkpoints", "resolved_config.json"} <= artifacts
    kd_run = client.get_run(result.output_for_node("kd_student_model")["run_id"])
    assert "train/kd" in kd_run.data.metrics and "train/ignored_fraction" in kd_run.data.metrics
    assert kd_run.data.params["config.kd.alpha"] == "0.7"


def test_registered_student_loads_and_predicts(materialized) -> None:
    import torch

    from seg_pipeline.tracking import TrackingSettings, load_model

    root, result = materialized
    kd = result.output_for_node("kd_student_model")
    settings = TrackingSettings.from_data_root(root)
    model = load_model(f"models:/seg_pipeline_student/{kd['registered_version']}", settings=settings)
    out = model(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 6, 32, 32)


def test_predictions_are_georeferenced_class_maps_per_model_and_ensemble(materialized) -> None:
    import rasterio

    _root, result = materialized
    value = result.output_for_node("ensemble_predictions")
    assert set(value["prediction_dirs"]) == {"pretrained", "kd_student", "ensemble"}
    assert value["views_per_input"] == 2 * 2 * 3  # models x scales x flips
    item = value["items"][0]
    with (
        rasterio.open(item["input"]) as src,
        rasterio.open(Path(value["prediction_dirs"]["ensemble"]) / f"{item['item_id']}.tif") as pred,
    ):
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == src.shape
        assert pred.read(1).max() < 6 or pred.nodata is not None


def test_evaluation_report_and_checks(materialized) -> None:
    _root, result = materialized
    report = result.output_for_node("evaluation_report")
    assert Path(report["markdown"]).read_text().startswith("# Evaluation report")
    assert set(report["scores"]) == {"pretrained", "kd_student", "ensemble"}
    assert 0.0 <= report["scores"]["ensemble"]["miou"] <= 1.0
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["metrics_above_floor"] and checks["ensemble_not_worse_than_best_single"]
    for name in ("confusion_ensemble.png", "confusion_ensemble.csv", "metrics.json"):
        assert (Path(report["report_dir"]) / name).exists(), name


def test_champion_gate_both_ways(materialized) -> None:
    from seg_pipeline import tracking as trk
    from seg_pipeline.evaluation.evaluate import champion_gate

    root, result = materialized
    first = result.output_for_node("champion_model")
    assert first["promoted"] and first["previous_version"] is None
    settings = trk.TrackingSettings.from_data_root(root)
    predictions = dict(result.output_for_node("ensemble_predictions"))
    kd = result.output_for_node("kd_student_model")
    champion = trk.get_alias_version("seg_pipeline_student", "champion", settings=settings)
    assert champion is not None and champion.version == kd["registered_version"]

    new_version = trk.register_model(kd["model_uri"], "seg_pipeline_student", settings=settings)
    predictions["registered"] = {"kd_student": ["seg_pipeline_student", new_version]}
    kwargs = {"alias": "champion", "work_dir": root / "gate", "tracking": settings}
    kept = champion_gate(predictions, candidate_score=-1.0, margin=0.0, **kwargs)
    assert not kept["promoted"] and 0.0 <= kept["champion_score"] <= 1.0
    assert (
        trk.get_alias_version("seg_pipeline_student", "champion", settings=settings).version
        == champion.version
    )
    # Same numbers, but the margin now decides: candidate must beat the champion by more than 0.5.
    promoted = champion_gate(predictions, candidate_score=kept["champion_score"] + 0.6, margin=0.5, **kwargs)
    assert promoted["promoted"] and promoted["previous_version"] == champion.version
    assert trk.get_alias_version("seg_pipeline_student", "champion", settings=settings).version == new_version


def test_registered_model_uris_resolve_to_the_exact_stage_checkpoint(materialized) -> None:
    from seg_pipeline.cli import resolve_model_checkpoint

    root, result = materialized
    pre = result.output_for_node("pretrained_model")
    uri = f"models:/seg_pipeline_pretrained/{pre['registered_version']}"
    assert resolve_model_checkpoint(uri, root) == Path(pre["best_checkpoint"])
    with pytest.raises(SystemExit, match="no such registered model or alias"):
        resolve_model_checkpoint("models:/seg_pipeline_pretrained@nope", root)
