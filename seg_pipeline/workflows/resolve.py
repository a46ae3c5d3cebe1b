"""Turn a model reference (a stage checkpoint path or an MLflow model URI) into what predicts.

``models:/name@alias`` and ``models:/name/3`` of a training stage resolve to the weights-only stage
checkpoint their run recorded (tag ``seg_pipeline.best_checkpoint``), never to MLflow's pickled copy
of the model. A version the champion gate registered is a deployable bundle (one model or an
ensemble, with its TTA views): :func:`resolve_model_reference` gives that bundle, read from the
MLflow model's own files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seg_pipeline.contracts import DeployableModel
from seg_pipeline.inference.predict import LoadedModel
from seg_pipeline.tracking import TAG_KIND, TrackingSettings, get_alias_version, load_pyfunc, run_tag


class ModelReferenceError(ValueError):
    """A model reference cannot be resolved; the message says which and why."""


@dataclass(frozen=True)
class RegisteredSegmenter:
    """A version the champion gate registered: its bundle and its members, loaded once."""

    bundle: DeployableModel
    members: list[LoadedModel]


def load_registered_segmenter(name: str, version: str, tracking: TrackingSettings) -> RegisteredSegmenter:
    """The bundle behind ``models:/<name>/<version>`` and its loaded members (one MLflow load)."""
    wrapped = load_pyfunc(f"models:/{name}/{version}", settings=tracking).unwrap_python_model()
    return RegisteredSegmenter(wrapped.bundle, wrapped.members)


def _version(reference: str, tracking: TrackingSettings) -> tuple[str, str, str | None, dict[str, str]]:
    """``(name, version, run id, version tags)`` of a ``models:/`` reference."""
    name_and_ref = reference.removeprefix("models:/")
    if "@" in name_and_ref:
        name, alias = name_and_ref.split("@", 1)
        info = get_alias_version(name, alias, settings=tracking)
        if info is None:
            raise ModelReferenceError(
                f"{reference}: no such registered model or alias in {tracking.tracking_uri}"
            )
        name, version = info.name, info.version
    elif "/" in name_and_ref:
        name, version = name_and_ref.rsplit("/", 1)
    else:
        raise ModelReferenceError(f"{reference}: give models:/<name>@<alias> or models:/<name>/<version>")
    entry = tracking.client().get_model_version(name, version)
    return name, str(version), entry.run_id, dict(entry.tags or {})


def resolve_model_reference(reference: str, tracking: TrackingSettings) -> Path | RegisteredSegmenter:
    """A stage checkpoint, or the deployable bundle of a version the champion gate registered."""
    if not reference.startswith("models:/"):
        return Path(reference)
    name, version, run_id, tags = _version(reference, tracking)
    if TAG_KIND in tags:
        return load_registered_segmenter(name, version, tracking)
    checkpoint = run_tag(run_id, "seg_pipeline.best_checkpoint", settings=tracking) if run_id else None
    if not checkpoint or not Path(checkpoint).exists():
        raise ModelReferenceError(
            f"{reference}: the checkpoint recorded by its run ({checkpoint}) is missing"
        )
    return Path(checkpoint)


def resolve_model_checkpoint(reference: str, tracking: TrackingSettings) -> Path:
    """The one stage checkpoint a reference names (a teacher, a model to export).

    A deployable bundle of one model gives that model's checkpoint; an ensemble has no single
    checkpoint, so it is refused with its members named.
    """
    resolved = resolve_model_reference(reference, tracking)
    if isinstance(resolved, Path):
        return resolved
    members = resolved.bundle.members
    if len(members) == 1:
        return Path(members[0].checkpoint)
    names = ", ".join(m.name for m in members)
    raise ModelReferenceError(
        f"{reference} is an ensemble of {len(members)} models ({names}), not one checkpoint: "
        "use it with seg-pipeline predict, or name one member's registered model"
    )
