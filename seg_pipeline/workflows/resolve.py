"""Turn a model reference (a stage checkpoint path or an MLflow model URI) into a checkpoint file.

``models:/name@alias`` and ``models:/name/3`` resolve to the weights-only stage checkpoint their run
recorded (tag ``seg_pipeline.best_checkpoint``), never to MLflow's pickled copy of the model.
"""

from __future__ import annotations

from pathlib import Path

from seg_pipeline.tracking import TrackingSettings, get_alias_version, run_tag


class ModelReferenceError(ValueError):
    """A model reference cannot be resolved; the message says which and why."""


def resolve_model_checkpoint(reference: str, tracking: TrackingSettings) -> Path:
    """A stage checkpoint path, or the checkpoint behind ``models:/name@alias`` / ``models:/name/3``."""
    if not reference.startswith("models:/"):
        return Path(reference)
    name_and_ref = reference.removeprefix("models:/")
    if "@" in name_and_ref:
        name, alias = name_and_ref.split("@", 1)
        info = get_alias_version(name, alias, settings=tracking)
        if info is None:
            raise ModelReferenceError(
                f"{reference}: no such registered model or alias in {tracking.tracking_uri}"
            )
        run_id = info.run_id
    else:
        name, version = name_and_ref.rsplit("/", 1)
        run_id = tracking.client().get_model_version(name, version).run_id
    checkpoint = run_tag(run_id, "seg_pipeline.best_checkpoint", settings=tracking) if run_id else None
    if not checkpoint or not Path(checkpoint).exists():
        raise ModelReferenceError(
            f"{reference}: the checkpoint recorded by its run ({checkpoint}) is missing"
        )
    return Path(checkpoint)
