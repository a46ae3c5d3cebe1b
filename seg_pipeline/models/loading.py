"""Rebuild a trained model from a stage checkpoint: the spec, the weights and how it was trained.

A stage checkpoint carries its :class:`~seg_pipeline.settings.training.ModelSpec`, its class names,
``ignore_index`` and band normalisation, so a model can be used correctly from the file alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seg_pipeline.models.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from seg_pipeline.models.factory import SegmentationModel, build_model
from seg_pipeline.settings.models import ModelSpec


@dataclass(frozen=True)
class CheckpointInfo:
    """What a stage checkpoint says about how its model was trained."""

    spec: ModelSpec
    class_names: tuple[str, ...]
    normalization_mean: tuple[float, ...]
    normalization_std: tuple[float, ...]
    ignore_index: int
    class_colors: tuple[tuple[int, int, int], ...] = ()  # () = coloured by class name
    positive_classes: tuple[int, ...] = ()  # () = every class after the first


def checkpoint_info(checkpoint: Path | str) -> CheckpointInfo:
    """Read the spec, classes, normalisation and ignore value a training stage stored in ``checkpoint``."""
    state = load_checkpoint(checkpoint)
    run = (state.get("config") or {}).get("run") or {}
    if not state.get("model_spec"):
        raise CheckpointError(
            f"checkpoint {checkpoint} has no model_spec: it was not written by a training stage"
        )
    if "normalization" not in run or "class_names" not in run:
        raise CheckpointError(
            f"checkpoint {checkpoint} lacks class names/normalisation: "
            "use a checkpoint written by a training stage"
        )
    return CheckpointInfo(
        spec=ModelSpec.model_validate(state["model_spec"]),
        class_names=tuple(run["class_names"]),
        normalization_mean=tuple(run["normalization"]["mean"]),
        normalization_std=tuple(run["normalization"]["std"]),
        ignore_index=int(run.get("ignore_index", 255)),
        class_colors=tuple((int(r), int(g), int(b)) for r, g, b in run.get("class_colors") or ()),
        positive_classes=tuple(int(i) for i in run.get("positive_classes") or ()),
    )


def load_trained_model(checkpoint: Path | str, prefer_ema: bool = True) -> SegmentationModel:
    """The model of a stage checkpoint in eval mode (EMA weights when present: those were validated)."""
    state = load_checkpoint(checkpoint)
    if not state.get("model_spec"):
        raise CheckpointError(
            f"checkpoint {checkpoint} has no model_spec: it was not written by a training stage"
        )
    model = build_model(ModelSpec.model_validate(state["model_spec"]))
    load_model_weights(model, checkpoint, prefer_ema=prefer_ema)
    return model.eval()
