"""The champion gate as a library call: register what is worth deploying, move the alias only past
the current holder.

What is deployed is what was measured: when the ensemble (its tuned member weights, class offsets
and TTA views) scores above the best single model on the evaluation split, the candidate is the
ensemble; otherwise it is that single model with the same views. Either way it is written as one
bundle (:mod:`seg_pipeline.inference.bundle`), logged as an MLflow ``pyfunc`` model and registered
as a new version of ``model_name``. The current champion is then re-scored on the same split with
its own bundle (reusing the candidate's score when both predict identically), and the alias moves
only when the candidate beats it by ``margin`` (F32).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from seg_pipeline.contracts import (
    ChampionDecision,
    DeployableModel,
    EvaluationReport,
    PredictionSet,
)
from seg_pipeline.evaluation.report import evaluate_pairs
from seg_pipeline.inference.bundle import predict_bundle, same_predictions, write_bundle
from seg_pipeline.inference.predict import LoadedModel
from seg_pipeline.models.loading import checkpoint_info
from seg_pipeline.progress import ItemProgress
from seg_pipeline.settings import ChampionSettings
from seg_pipeline.tracking import (
    TAG_KIND,
    TrackingSettings,
    get_alias_version,
    set_alias,
    start_run,
)
from seg_pipeline.workflows.deployable import deployable_candidate
from seg_pipeline.workflows.report import prediction_pairs
from seg_pipeline.workflows.resolve import load_registered_segmenter

LogFn = Callable[[str], None]


def score_bundle(
    model: DeployableModel,
    members: list[LoadedModel],
    predictions: PredictionSet,
    folder: Path,
    log_fn: LogFn | None,
) -> float:
    """MIoU of ``model`` on the predictions' split, predicted with its own views and weights."""
    settings = model.predict.replace(color_png=False, write_probabilities=False)
    inputs = [(item.item_id, Path(item.input)) for item in predictions.items]
    predict_bundle(model, inputs, folder, settings, members=members)
    progress = ItemProgress("evaluate champion", len(predictions.items), unit="files", log_fn=log_fn)
    evaluation = evaluate_pairs(
        prediction_pairs(folder, predictions),
        len(predictions.class_names),
        predictions.ignore_index,
        progress=progress,
    )
    progress.done()
    return float(evaluation.metrics.miou)


def register_candidate(
    candidate: DeployableModel,
    predictions: PredictionSet,
    model_name: str,
    work_dir: Path,
    tracking: TrackingSettings,
    run_tags: Mapping[str, str],
) -> tuple[str, str | None]:
    """Write, log and register the candidate bundle; returns (version, MLflow run URL)."""
    bundle = write_bundle(candidate, work_dir / "candidate")
    bands = len(checkpoint_info(candidate.members[0].checkpoint).normalization_mean)
    with start_run(tracking, run_name=f"champion gate {model_name}", tags=run_tags) as run:
        run.log_params(
            {
                "kind": candidate.kind,
                "members": [m.name for m in candidate.members],
                "weights": [m.weight for m in candidate.members],
                "class_bias": candidate.class_bias,
                "tta": candidate.predict.tta.model_dump(),
                "split": candidate.split,
            }
        )
        run.log_metrics({f"deployable/{candidate.split}/miou": candidate.score}, step=0)
        logged = run.log_bundle(bundle, bands=bands, registered_model_name=model_name)
        if logged.registered_version is None:
            raise RuntimeError(f"{model_name}: the registry gave no version for the candidate")
        run.describe_model_version(
            model_name,
            logged.registered_version,
            f"{candidate.kind}: {candidate.reason}.",
            {
                TAG_KIND: candidate.kind,
                f"evaluation/{candidate.split}/miou": f"{candidate.score:.4f}",
                "members": ",".join(m.name for m in candidate.members),
                "mlflow_run_id": run.run_id,
                **{key: value for key, value in run_tags.items() if key.startswith("dagster.")},
            },
        )
        return logged.registered_version, run.url


def champion_gate(
    settings: ChampionSettings,
    predictions: PredictionSet,
    report: EvaluationReport,
    work_dir: Path,
    tracking: TrackingSettings,
    model_name: str,
    run_tags: Mapping[str, str] | None = None,
    log_fn: LogFn | None = None,
) -> ChampionDecision:
    """Register the deployable candidate as a version of ``model_name``, and move ``settings.alias``
    to it only if it beats the current holder (re-scored on the same split) by ``margin`` mIoU.
    """
    candidate = deployable_candidate(
        predictions, {score.name: score.miou for score in report.scores}, report.best_single
    )
    if log_fn is not None:
        log_fn(f"deployable candidate: {candidate.kind}: {candidate.reason}")
    version, _run_url = register_candidate(
        candidate, predictions, model_name, work_dir, tracking, run_tags or {}
    )
    current = get_alias_version(model_name, settings.alias, settings=tracking)
    champion_score: float | None = None
    if current is None:
        promote, reason = True, f"no '{settings.alias}' yet: promoting {model_name} v{version}"
    else:
        champion = load_registered_segmenter(current.name, str(current.version), tracking)
        held = champion.bundle
        if held.split == candidate.split and same_predictions(held, candidate):
            champion_score = candidate.score  # the same weights and views: the same class maps
        else:
            champion_score = score_bundle(
                held, champion.members, predictions, work_dir / f"champion_v{current.version}", log_fn
            )
        promote = bool(candidate.score > champion_score + settings.margin)
        kept = f"v{version}" if promote else f"v{current.version}"
        reason = (
            f"candidate v{version} ({candidate.kind}) mIoU {candidate.score:.4f} vs champion "
            f"v{current.version} ({held.kind}) {champion_score:.4f} (margin {settings.margin}): "
            f"{'promoting' if promote else 'keeping'} {kept}"
        )
    if promote:
        set_alias(model_name, settings.alias, version, settings=tracking)
    return ChampionDecision(
        promoted=promote,
        reason=reason,
        model_name=model_name,
        alias=settings.alias,
        candidate_version=str(version),
        previous_version=None if current is None else str(current.version),
        candidate_score=candidate.score,
        champion_score=champion_score,
        margin=settings.margin,
        candidate_url=tracking.model_version_link(model_name, str(version)),
        champion_url=tracking.model_version_link(
            model_name, str(version) if promote or current is None else str(current.version)
        ),
        deployed=candidate,
    )
