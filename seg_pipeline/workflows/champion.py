"""The champion gate as a library call: move the registry alias only to a model that beats its holder.

The current champion is re-scored on the same split with the same TTA settings as the candidate,
so both numbers come from one protocol (F32). With no champion yet, the candidate is promoted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from seg_pipeline.contracts import ChampionDecision, EvaluationReport, PredictionSet
from seg_pipeline.evaluation.report import evaluate_pairs
from seg_pipeline.inference.ensemble import ENSEMBLE
from seg_pipeline.inference.predict import load_stage_model, predict_files
from seg_pipeline.progress import ItemProgress
from seg_pipeline.settings import ChampionSettings
from seg_pipeline.tracking import ModelVersionInfo, TrackingSettings, get_alias_version, run_tag, set_alias
from seg_pipeline.workflows.report import prediction_pairs

LogFn = Callable[[str], None]
CHECKPOINT_TAG = "seg_pipeline.best_checkpoint"


def champion_checkpoint(version: ModelVersionInfo, work_dir: Path, tracking: TrackingSettings) -> Path:
    """The champion's weights: its local checkpoint, else the copy logged with its MLflow run."""
    recorded = run_tag(version.run_id, CHECKPOINT_TAG, settings=tracking) if version.run_id else None
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    if not version.run_id or not recorded:
        raise FileNotFoundError(
            f"champion {version.name} v{version.version}: its run records no checkpoint; "
            "move the alias by hand"
        )
    target = work_dir / f"v{version.version}-weights"
    target.mkdir(parents=True, exist_ok=True)
    try:
        local = tracking.client().download_artifacts(
            version.run_id, f"checkpoints/{Path(recorded).name}", str(target)
        )
    except Exception as error:  # MLflow raises several types for a missing artefact
        raise FileNotFoundError(
            f"champion {version.name} v{version.version}: its checkpoint {recorded!r} is gone and its "
            f"MLflow run has no copy ({error}); restore the file or move the alias by hand"
        ) from error
    return Path(local)


def _score_champion(
    predictions: PredictionSet, version: ModelVersionInfo, work_dir: Path, tracking: TrackingSettings,
    log_fn: LogFn | None,
) -> float:  # fmt: skip
    """MIoU of ``version`` on the predictions' split with the same TTA (reusing a set already made)."""
    checkpoint = champion_checkpoint(version, work_dir, tracking)
    reused = next((m.name for m in predictions.members if Path(m.checkpoint) == checkpoint), None)
    if reused is not None and reused in predictions.sets:
        folder = predictions.folder(reused)
    else:
        name = f"champion_v{version.version}"
        folder = work_dir / name
        settings = predictions.settings.replace(color_png=False, write_probabilities=False)
        inputs = [(item.item_id, Path(item.input)) for item in predictions.items]
        predict_files(
            [load_stage_model(checkpoint, name)], inputs, {ENSEMBLE: folder}, settings, log_fn=log_fn
        )
    progress = ItemProgress(
        f"evaluate champion v{version.version}", len(predictions.items), unit="files", log_fn=log_fn
    )
    evaluation = evaluate_pairs(
        prediction_pairs(folder, predictions),
        len(predictions.class_names),
        predictions.ignore_index,
        progress=progress,
    )
    progress.done()
    return float(evaluation.metrics.miou)


def champion_gate(
    settings: ChampionSettings,
    predictions: PredictionSet,
    report: EvaluationReport,
    work_dir: Path,
    tracking: TrackingSettings,
    log_fn: LogFn | None = None,
) -> ChampionDecision:
    """Move ``settings.alias`` to the candidate only if it beats the current holder by ``margin`` mIoU."""
    member = predictions.member(predictions.candidate)
    if member.registered_model is None or member.registered_version is None:
        raise ValueError(f"candidate {member.name!r} is not a registered model version; nothing to promote")
    model_name, version = member.registered_model, member.registered_version
    candidate_score = report.score(member.name).miou
    current = get_alias_version(model_name, settings.alias, settings=tracking)
    champion_score: float | None = None
    if current is None:
        promote, reason = True, f"no '{settings.alias}' yet: promoting {model_name} v{version}"
    elif str(current.version) == str(version):
        promote, reason = False, f"{model_name} v{version} already holds '{settings.alias}'"
    else:
        champion_score = _score_champion(predictions, current, work_dir, tracking, log_fn)
        promote = bool(np.nan_to_num(candidate_score, nan=-1.0) > champion_score + settings.margin)
        kept = f"v{version}" if promote else f"v{current.version}"
        reason = (
            f"candidate v{version} mIoU {candidate_score:.4f} vs champion v{current.version} "
            f"{champion_score:.4f} (margin {settings.margin}): {'promoting' if promote else 'keeping'} {kept}"
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
        candidate_score=candidate_score,
        champion_score=champion_score,
        margin=settings.margin,
        candidate_url=tracking.model_version_link(model_name, str(version)),
        champion_url=tracking.model_version_link(
            model_name, str(version) if promote or current is None else str(current.version)
        ),
    )
