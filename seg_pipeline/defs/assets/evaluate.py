"""Inference and evaluation assets: ensemble TTA predictions, the evaluation report, the champion gate.

No ``from __future__ import annotations``: Dagster reads Config annotations at runtime.
"""

import base64
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from seg_pipeline.defs.metadata import table
from seg_pipeline.defs.resources import MlflowResource, StorageResource

INFERENCE_GROUP = "inference"
EVALUATION_GROUP = "evaluation"


class PredictionConfig(dg.Config):
    """Ensemble TTA over the evaluation split (seed 002: 2 models x 3 scales x 3 flips = 18 views)."""

    split: str = Field(default="test", description="Split to predict; falls back to 'val' when it is empty.")
    scales: list[float] = Field(default=[0.75, 1.0, 1.25], description="TTA resize factors.")
    flips: list[str] = Field(default=["none", "h", "v"], description="none, h, v, rot90, ... or d4.")
    merge: str = Field(default="mean_prob", description="mean_prob (average softmax) or mean_logit.")
    bf16: bool = Field(default=False, description="bf16 autocast for the forward passes.")
    window: int = 512
    overlap: int = 64
    batch_size: int = 4
    device: str = "auto"
    extra_checkpoints: list[str] = Field(default=[], description="More ensemble members (stage checkpoints).")
    write_probabilities: bool = False


class EvaluationConfig(dg.Config):
    """Report settings and the quality gates the asset checks read."""

    ignore_nonpositive: bool = Field(default=False, description="Seed-000 rule: labels <= 0 not scored.")
    overlays: int = Field(default=3, description="Tiles shown as image | truth | prediction | errors.")
    miou_floor: float = Field(default=0.05, description="Check: ensemble mIoU must reach this.")
    ensemble_tolerance: float = Field(
        default=0.02, description="Check: ensemble may trail the best single by this."
    )


class ChampionConfig(dg.Config):
    """The gate that moves the ``champion`` alias (F32)."""

    alias: str = "champion"
    margin: float = Field(default=0.0, description="Promote only when better than the champion by this mIoU.")


def _split_rows(dataset_dir: str, split: str) -> tuple[str, list[Any]]:
    from seg_pipeline.data.shards import read_manifest, read_shard_index, shard_dirs

    available = read_manifest(dataset_dir)["splits"]
    chosen = split if split in available else "val"
    rows = [row for shard in shard_dirs(dataset_dir, chosen) for row in read_shard_index(shard)]
    labeled = [row for row in rows if row.target_path is not None]
    if not labeled:
        raise ValueError(
            f"split {chosen!r} of {dataset_dir} has no labeled tile to evaluate; choose another split"
        )
    return chosen, labeled


@dg.asset(
    group_name=INFERENCE_GROUP,
    code_version="1",
    kinds={"pytorch", "geotiff"},
    description="Georeferenced class maps of the evaluation split by every single model and by the "
    "ensemble (models x scales x flips, sliding windows).",
)
def ensemble_predictions(
    context: dg.AssetExecutionContext,
    config: PredictionConfig,
    tile_shards: dict[str, Any],
    pretrained_model: dict[str, Any],
    kd_student_model: dict[str, Any],
    storage: StorageResource,
) -> dg.Output[dict[str, Any]]:
    """Predict the evaluation split with each model and the TTA ensemble."""
    from seg_pipeline.inference.predict import ensemble_and_singles, load_stage_model, tta_from_settings

    split, rows = _split_rows(tile_shards["dataset_dir"], config.split)
    models = [
        load_stage_model(pretrained_model["best_checkpoint"], "pretrained"),
        load_stage_model(kd_student_model["best_checkpoint"], "kd_student"),
        *[load_stage_model(path, f"extra_{i}") for i, path in enumerate(config.extra_checkpoints)],
    ]
    out_root = storage.stage_dir("predictions", context.run.root_run_id or context.run.run_id)
    results = ensemble_and_singles(
        models,
        [(row.item_id, row.input_path) for row in rows],
        out_root,
        tta=tta_from_settings(config.model_dump()),
        window=config.window,
        overlap=config.overlap,
        batch_size=config.batch_size,
        device=config.device,
        write_probabilities=config.write_probabilities,
        log_fn=context.log.info,
    )
    ensemble = results["ensemble"]
    context.log.info(
        f"predicted {len(rows)} {split} tiles with {len(models)} models x "
        f"{ensemble['views_per_input'] // len(models)} views in "
        f"{sum(r['seconds'] for r in results.values()):.1f}s -> {out_root}"
    )
    value = {
        "split": split,
        "out_root": str(out_root),
        "prediction_dirs": {name: r["out_dir"] for name, r in results.items()},
        "items": [
            {"item_id": r.item_id, "input": str(r.input_path), "target": str(r.target_path)} for r in rows
        ],
        "models": {m.name: m.source for m in models},
        "class_names": list(models[0].class_names),
        "ignore_index": tile_shards["ignore_index"],
        "views_per_input": ensemble["views_per_input"],
        "predict_settings": config.model_dump(),
        "registered": {
            "kd_student": [kd_student_model["registered_model"], kd_student_model["registered_version"]],
        },
    }
    metadata = {
        "split": split,
        "tiles": len(rows),
        "models": ", ".join(value["models"]),
        "views_per_input": ensemble["views_per_input"],
        "ensemble_tiles_per_second": round(ensemble["tiles_per_second"], 2),
        "predictions": dg.MetadataValue.path(str(out_root)),
    }
    return dg.Output(value, metadata=metadata)


def _embed_png(path: Path) -> dg.MetadataValue:
    return dg.MetadataValue.md(
        f"![{path.stem}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"
    )


@dg.asset(
    group_name=EVALUATION_GROUP,
    code_version="1",
    kinds={"python", "mlflow"},
    description="Single models vs ensemble: confusion matrix, per-class and mean IoU/Dice/precision/recall, "
    "pixel accuracy, FWIoU, kappa; markdown report in data/reports/ and an MLflow run.",
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    ensemble_predictions: dict[str, Any],
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[dict[str, Any]]:
    """Score every prediction set against the ground truth and write the report."""
    from seg_pipeline.evaluation.evaluate import build_report
    from seg_pipeline.tracking import build_run_tags

    report_dir = storage.stage_dir("reports", context.run.root_run_id or context.run.run_id)
    tags = build_run_tags(
        stage="evaluation",
        pipeline_run_id=context.run.run_id,
        asset_key=context.asset_key.to_user_string(),
        code_version="1",
        data_version="",
        repo_dir=Path(__file__).resolve().parents[3],
    )
    report = build_report(
        ensemble_predictions,
        report_dir,
        ignore_nonpositive=config.ignore_nonpositive,
        overlays=config.overlays,
        tracking=mlflow.settings(storage.root),
        run_tags=tags,
        log_fn=context.log.info,
    )
    report["miou_floor"] = config.miou_floor
    report["ensemble_tolerance"] = config.ensemble_tolerance
    context.log.info(
        f"report: {report['markdown']} | "
        + ", ".join(f"{name} mIoU {scores['miou']:.4f}" for name, scores in report["scores"].items())
    )
    metadata: dict[str, Any] = {
        "report": dg.MetadataValue.path(report["markdown"]),
        "comparison": table(
            report["rows"], columns=["model", "miou", "mdice", "pixel_accuracy", "fwiou", "kappa"]
        ),
        "per_class_delta": table(report["deltas"]),
        "ensemble_miou": report["scores"]["ensemble"]["miou"],
        "best_single": report["best_single"],
        "mlflow_run_id": report["run_id"] or "",
        "confusion_matrix": _embed_png(Path(report["confusion_png"])),
    }
    if report["overlays"]:
        metadata["overlay"] = _embed_png(Path(report["overlays"][0]))
    return dg.Output(report, metadata=metadata)


@dg.asset_check(
    asset=evaluation_report, blocking=True, description="Ensemble mIoU reaches the configured floor."
)
def metrics_above_floor(evaluation_report: dict[str, Any]) -> dg.AssetCheckResult:
    """A model that cannot beat the floor must not move on to the champion gate."""
    miou = evaluation_report["scores"]["ensemble"]["miou"]
    return dg.AssetCheckResult(
        passed=miou >= evaluation_report["miou_floor"],
        metadata={"ensemble_miou": miou, "floor": evaluation_report["miou_floor"]},
    )


@dg.asset_check(
    asset=evaluation_report,
    blocking=True,
    description="The ensemble is not worse than the best single model.",
)
def ensemble_not_worse_than_best_single(evaluation_report: dict[str, Any]) -> dg.AssetCheckResult:
    """Ensembling must pay for itself (within a tolerance)."""
    scores = evaluation_report["scores"]
    best = evaluation_report["best_single"]
    gap = scores["ensemble"]["miou"] - scores[best]["miou"]
    return dg.AssetCheckResult(
        passed=gap >= -evaluation_report["ensemble_tolerance"],
        metadata={
            "ensemble_minus_best_single": round(gap, 4),
            "best_single": best,
            "tolerance": evaluation_report["ensemble_tolerance"],
        },
    )


@dg.asset(
    group_name=EVALUATION_GROUP,
    code_version="1",
    kinds={"mlflow"},
    description="Moves the MLflow 'champion' alias to the new KD student only when it beats the current "
    "champion on the same evaluation split by the configured margin.",
)
def champion_model(
    context: dg.AssetExecutionContext,
    config: ChampionConfig,
    ensemble_predictions: dict[str, Any],
    evaluation_report: dict[str, Any],
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[dict[str, Any]]:
    """Compare candidate and champion on the fixed split; promote or keep."""
    from seg_pipeline.evaluation.evaluate import champion_gate

    decision = champion_gate(
        ensemble_predictions,
        candidate_score=evaluation_report["scores"]["kd_student"]["miou"],
        alias=config.alias,
        margin=config.margin,
        work_dir=storage.stage_dir("reports", context.run.root_run_id or context.run.run_id) / "champion",
        tracking=mlflow.settings(storage.root),
        log_fn=context.log.info,
    )
    context.log.info(decision["reason"])
    metadata = {
        k: decision[k]
        for k in ("promoted", "candidate_score", "champion_score", "margin", "reason")
        if decision[k] is not None
    }
    metadata["model"] = f"{decision['model_name']} v{decision['candidate_version']}"
    metadata["previous_champion_version"] = str(decision["previous_version"])
    return dg.Output(decision, metadata=metadata)


EVALUATION_CHECKS = [metrics_above_floor, ensemble_not_worse_than_best_single]
