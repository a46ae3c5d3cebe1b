"""Export as a pipeline step: the trained student to TorchScript/ONNX with a card naming its lineage."""

from __future__ import annotations

from pathlib import Path

from seg_pipeline.contracts import ChampionDecision, ExportedModel, TrainedModel
from seg_pipeline.export.api import export_model
from seg_pipeline.settings.export import ExportSettings


def export_trained(
    settings: ExportSettings,
    model: TrainedModel,
    out_dir: Path,
    decision: ChampionDecision | None = None,
    lineage: dict[str, str] | None = None,
) -> ExportedModel:
    """Export ``model``'s best checkpoint into ``out_dir`` (published atomically, parity-checked).

    The card records the MLflow run and registered version of the checkpoint and, when given, what
    the champion gate decided about it, so a runtime file can be traced back to its training run.
    """
    tracking = model.tracking
    card_lineage: dict[str, str] = {"stage": model.stage, **(lineage or {})}
    if tracking is not None:
        card_lineage["mlflow_run_id"] = tracking.run_id
        if tracking.registered_model and tracking.registered_version:
            card_lineage["registered_model"] = f"{tracking.registered_model} v{tracking.registered_version}"
    promoted = bool(decision and decision.promoted)
    if decision is not None:
        card_lineage["champion_gate"] = decision.reason
    result = export_model(
        model.checkpoint_path,
        out_dir,
        formats=settings.formats,
        example_size=settings.example_size,
        opset=settings.opset,
        lineage=card_lineage,
    )
    return ExportedModel(
        stage=model.stage,
        checkpoint=model.checkpoint,
        out_dir=str(result.out_dir),
        files={name: str(path) for name, path in result.files.items()},
        max_abs_diff=dict(result.max_abs_diff),
        registered_version=tracking.registered_version if tracking else None,
        champion=promoted,
    )
