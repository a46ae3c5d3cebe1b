"""Inference and evaluation assets: ensemble TTA predictions, the evaluation report, the champion gate.

No ``from __future__ import annotations``: Dagster reads Config annotations at runtime.
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from seg_pipeline.contracts import (
    ENSEMBLE,
    ChampionDecision,
    EvaluationReport,
    MemberModels,
    PredictionSet,
    ShardSet,
    TrainedModel,
)
from seg_pipeline.defs.config import dagster_config, to_settings
from seg_pipeline.defs.failures import no_retry_for_bad_input
from seg_pipeline.defs.metadata import link, picture, rounded, table, without_none
from seg_pipeline.defs.ownership import owners, stage_tags
from seg_pipeline.defs.partitions import DATASETS, dataset_of
from seg_pipeline.defs.resources import MlflowResource, StorageResource, run_family
from seg_pipeline.defs.versions import code_version
from seg_pipeline.settings import ChampionSettings, EvaluationSettings, PredictSettings

INFERENCE_GROUP = "inference"
EVALUATION_GROUP = "evaluation"
#: The member the champion gate may promote: the KD student (a registered single model).
CANDIDATE = "kd_student"


class ChampionRunConfig(dg.Config):
    """The registry name of the deployable model: a Dagster-layer knob, like the stages' register_as."""

    register_as: str = Field(
        default="{dataset}_segmenter",
        min_length=1,
        description="Registered model that receives each run's deployable candidate (the ensemble or "
        "the best single model) and holds the alias; {dataset} stands for the run's dataset partition.",
    )


# For the type checker the derived classes are plain dg.Config (fields are reached via to_settings).
if TYPE_CHECKING:
    PredictionConfig = dg.Config
    EvaluationConfig = dg.Config
    ChampionConfig = ChampionRunConfig
else:
    PredictionConfig = dagster_config(PredictSettings, name="PredictionConfig")
    EvaluationConfig = dagster_config(EvaluationSettings, name="EvaluationConfig")
    ChampionConfig = dagster_config(ChampionSettings, name="ChampionConfig", base=ChampionRunConfig)


@dg.asset(
    group_name=INFERENCE_GROUP,
    owners=owners(),
    tags=stage_tags(INFERENCE_GROUP),
    partitions_def=DATASETS,
    code_version=code_version("seg_pipeline.workflows.predict"),
    kinds={"pytorch", "geotiff"},
    description="Georeferenced class maps of the evaluation split by every single model and by the "
    "ensemble (models x scales x flips, sliding windows), from one set of forward passes.",
)
def ensemble_predictions(
    context: dg.AssetExecutionContext,
    config: PredictionConfig,
    tile_shards: ShardSet,
    pretrained_model: TrainedModel,
    kd_student_model: TrainedModel,
    extra_members: MemberModels,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[PredictionSet]:
    """Predict the evaluation split with each model and the TTA ensemble."""
    from seg_pipeline.workflows import predict

    with no_retry_for_bad_input():
        value = predict.predict_split(
            to_settings(config, PredictSettings, "ensemble_predictions"),
            tile_shards,
            [
                ("pretrained", pretrained_model),
                (CANDIDATE, kd_student_model),
                *((member.name, member.model) for member in extra_members.members),
            ],
            CANDIDATE,
            storage.layout.predictions_dir(run_family(context)),
            tracking=mlflow.settings(storage.layout),
            log_fn=context.log.info,
        )
    metadata: dict[str, Any] = {
        "split": value.split,
        "tiles": len(value.items),
        "models": ", ".join(m.name for m in value.members),
        "views_per_input": value.views_per_input,
        "seconds": round(value.seconds.get("predict", 0.0), 1),
        "precision": value.precision,
        "predictions": dg.MetadataValue.path(value.out_root),
        "tuning": "; ".join(value.tuning.notes) if value.tuning else "off or skipped (see the log)",
    }
    if value.tuning:
        metadata["ensemble_weights"] = dg.MetadataValue.json(value.tuning.weights)
        metadata["class_bias"] = dg.MetadataValue.json(value.tuning.class_bias)
    return dg.Output(value, metadata=metadata)


@dg.asset_check(
    partitions_def=DATASETS,
    asset=ensemble_predictions,
    blocking=True,
    description="Every class map has its input's CRS, transform and size (it overlays the image in a GIS).",
)
def predictions_overlay_their_inputs(ensemble_predictions: PredictionSet) -> dg.AssetCheckResult:
    """A class map that does not overlay its image is wrong however good its classes are."""
    from seg_pipeline.workflows import predict

    problems = predict.georeference_problems(ensemble_predictions)
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"class_maps": len(ensemble_predictions.items) * len(ensemble_predictions.sets)},
        description="; ".join(problems[:20]) or None,
    )


def _report_metadata(value: EvaluationReport) -> dict[str, Any]:
    columns = ("miou", "mdice", "pixel_accuracy", "fwiou", "kappa")
    rows = [{"model": s.name, **{c: getattr(s, c) for c in columns}} for s in value.scores]
    deltas = [
        {"class": d.class_name, value.best_single: d.best_single, ENSEMBLE: d.ensemble, "delta": d.delta}
        for d in value.deltas
    ]
    return without_none(
        {
            "report": dg.MetadataValue.path(value.markdown),
            "comparison": table(rows),
            "per_class_delta": table(deltas),
            "ensemble_miou": rounded(value.score(ENSEMBLE).miou),
            "best_single": value.best_single,
            "best_single_miou": rounded(value.score(value.best_single).miou),
            # one float per model: the asset's Plots tab then draws each model's trend across retrains
            **{f"miou_{score.name}": rounded(score.miou) for score in value.scores},
            "mlflow_run": link(value.run_url),
            "mlflow_run_id": value.run_id,
            **{
                name: picture(png, value.figure_urls.get(name))
                for name, png in {**value.figures, "confusion_matrix": value.confusion_png}.items()
            },
            "overlay": picture(value.overlays[0]) if value.overlays else None,
        }
    )


@dg.asset(
    group_name=EVALUATION_GROUP,
    owners=owners(),
    tags=stage_tags(EVALUATION_GROUP),
    partitions_def=DATASETS,
    code_version=code_version("seg_pipeline.workflows.report"),
    kinds={"python", "mlflow"},
    description="Single models vs ensemble: confusion matrix, per-class and mean IoU/Dice/precision/recall, "
    "pixel accuracy, FWIoU, kappa; markdown report in data/reports/ and an MLflow run.",
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    ensemble_predictions: PredictionSet,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[EvaluationReport]:
    """Score every prediction set against the ground truth and write the report."""
    from seg_pipeline.workflows import report

    tags = mlflow.run_tags(context, stage="evaluation")
    with no_retry_for_bad_input():
        value = report.build_report(
            to_settings(config, EvaluationSettings, "evaluation_report"),
            ensemble_predictions,
            storage.layout.reports_dir(run_family(context)),
            tracking=mlflow.settings(storage.layout),
            run_tags=tags,
            log_fn=context.log.info,
        )
    context.log.info(
        f"report: {value.markdown} | " + ", ".join(f"{s.name} mIoU {s.miou:.4f}" for s in value.scores)
    )
    return dg.Output(value, metadata=_report_metadata(value))


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            "metrics_above_floor",
            partitions_def=DATASETS,
            asset=evaluation_report,
            blocking=True,
            description="Ensemble mIoU reaches the configured floor.",
        ),
        dg.AssetCheckSpec(
            "ensemble_not_worse_than_best_single",
            partitions_def=DATASETS,
            asset=evaluation_report,
            blocking=True,
            description="The ensemble is not worse than the best single model.",
        ),
    ],
)
def evaluation_report_checks(evaluation_report: EvaluationReport) -> Iterator[dg.AssetCheckResult]:
    """A model that cannot beat the floor, or an ensemble that does not pay for itself (within a
    tolerance), must not move on to the champion gate.

    One op for both checks: Dagster orders the blocking checks of an asset by output name, and two
    single-check ops both call theirs ``result``, so the job snapshot would change with
    ``PYTHONHASHSEED`` (every CLI-launched run then showed a spurious re-execution warning).
    """
    miou = evaluation_report.score(ENSEMBLE).miou
    yield dg.AssetCheckResult(
        check_name="metrics_above_floor",
        passed=bool(miou >= evaluation_report.miou_floor),
        metadata={"ensemble_miou": rounded(miou) or 0.0, "floor": evaluation_report.miou_floor},
    )
    best = evaluation_report.best_single
    gap = evaluation_report.score(ENSEMBLE).miou - evaluation_report.score(best).miou
    yield dg.AssetCheckResult(
        check_name="ensemble_not_worse_than_best_single",
        passed=bool(gap >= -evaluation_report.ensemble_tolerance),
        metadata={
            "ensemble_minus_best_single": rounded(gap) or 0.0,
            "best_single": best,
            "tolerance": evaluation_report.ensemble_tolerance,
        },
    )


@dg.asset(
    group_name=EVALUATION_GROUP,
    owners=owners(),
    tags=stage_tags(EVALUATION_GROUP),
    partitions_def=DATASETS,
    code_version=code_version("seg_pipeline.workflows.champion"),
    kinds={"mlflow"},
    description="Registers what is worth deploying (the ensemble when it beats the best single model on "
    "the evaluation split, else that model; a pyfunc MLflow model with its members and TTA views) and "
    "moves the 'champion' alias to it only when it beats the current champion on the same split by "
    "the configured margin.",
)
def champion_model(
    context: dg.AssetExecutionContext,
    config: ChampionConfig,
    ensemble_predictions: PredictionSet,
    evaluation_report: EvaluationReport,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[ChampionDecision]:
    """Compare candidate and champion on the fixed split; promote or keep."""
    from seg_pipeline.workflows import champion

    with no_retry_for_bad_input():
        decision = champion.champion_gate(
            to_settings(config, ChampionSettings, "champion_model"),
            ensemble_predictions,
            evaluation_report,
            storage.layout.reports_dir(run_family(context)) / "champion",
            mlflow.settings(storage.layout),
            model_name=config.register_as.replace("{dataset}", dataset_of(context)),
            run_tags=mlflow.run_tags(context, stage="champion"),
            log_fn=context.log.info,
        )
    context.log.info(decision.reason)
    deployed = decision.deployed
    metadata = without_none(
        {
            "deployed": f"{deployed.kind}: {', '.join(m.name for m in deployed.members)}"
            if deployed
            else None,
            "why_this_model": deployed.reason if deployed else None,
            "promoted": decision.promoted,
            "candidate_score": rounded(decision.candidate_score),
            "champion_score": rounded(decision.champion_score),
            "margin": decision.margin,
            "reason": decision.reason,
            "model": f"{decision.model_name} v{decision.candidate_version}",
            "previous_champion_version": decision.previous_version or "none",
            "candidate_version_page": link(decision.candidate_url) if decision.candidate_url else None,
            "champion_version_page": link(decision.champion_url) if decision.champion_url else None,
        }
    )
    return dg.Output(decision, metadata=metadata)
