"""A deployable segmenter as one folder: its members' checkpoints and how to combine them.

The champion gate registers what it measured, and what it measured may be an ensemble: several
stage checkpoints, their weights, tuned class offsets and the TTA views and windows of the scored
predictions. A bundle folder holds all of it (``bundle.json`` + ``members/<name>.pt``), so the
registered model predicts exactly what the report scored, on any machine, with one call:
:func:`load_bundle` then :func:`predict_bundle` (or MLflow's ``pyfunc.load_model``, which wraps
these two).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from seg_pipeline.contracts import ENSEMBLE, DeployableModel
from seg_pipeline.inference.predict import LoadedModel, PredictionRun, load_stage_model, predict_files
from seg_pipeline.io import atomic_dir, file_sha256
from seg_pipeline.models.checkpoint import link_or_copy
from seg_pipeline.settings import PredictSettings

BUNDLE_FILE = "bundle.json"
MEMBERS_DIR = "members"


def write_bundle(model: DeployableModel, folder: Path) -> Path:
    """Put the members' checkpoints into ``folder`` beside ``bundle.json`` (paths made relative).

    Members are hard-linked where the filesystem allows (copied elsewhere): checkpoints are never
    modified in place, and a copy would cost each run another checkpoint's worth of disk. Written
    in a temp folder and renamed into place: a reader never sees half a bundle.
    """
    with atomic_dir(folder) as tmp:
        (tmp / MEMBERS_DIR).mkdir()
        members = []
        for member in model.members:
            relative = f"{MEMBERS_DIR}/{member.name}.pt"
            link_or_copy(member.checkpoint, tmp / relative)
            members.append(member.model_copy(update={"checkpoint": relative}))
        portable = model.model_copy(update={"members": members})
        (tmp / BUNDLE_FILE).write_text(json.dumps(json.loads(portable.to_json()), indent=2) + "\n")
    return folder


def read_bundle(folder: Path) -> DeployableModel:
    """The bundle in ``folder``, its members' checkpoints as absolute paths."""
    path = Path(folder) / BUNDLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {BUNDLE_FILE}; not a seg_pipeline model bundle")
    stored = DeployableModel.model_validate_json(path.read_text())
    return stored.model_copy(
        update={
            "members": [
                m.model_copy(update={"checkpoint": str(Path(folder) / m.checkpoint)}) for m in stored.members
            ]
        }
    )


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` holds a bundle."""
    return (Path(folder) / BUNDLE_FILE).is_file()


def load_members(model: DeployableModel) -> list[LoadedModel]:
    """The members as loaded models, in order."""
    return [load_stage_model(member.checkpoint, member.name) for member in model.members]


def predict_bundle(
    model: DeployableModel,
    inputs: Sequence[tuple[str, Path]],
    out_dir: Path,
    settings: PredictSettings | None = None,
    members: Sequence[LoadedModel] | None = None,
) -> PredictionRun:
    """Predict ``inputs`` into ``out_dir`` with the bundle's members, weights, offsets and views
    (``settings``: a caller's own views and windows instead).
    """
    loaded = list(members) if members is not None else load_members(model)
    return predict_files(
        loaded,
        inputs,
        {ENSEMBLE: out_dir},
        settings if settings is not None else model.predict,
        weights=[m.weight for m in model.members],
        class_bias=model.class_bias,
    )


def same_predictions(a: DeployableModel, b: DeployableModel) -> bool:
    """Whether two bundles predict identically: same weights files in the same order, weights,
    offsets and views (their checkpoints compared by content, wherever they are stored).
    """
    if [m.weight for m in a.members] != [m.weight for m in b.members] or a.class_bias != b.class_bias:
        return False
    if a.predict.tta != b.predict.tta or a.predict.windows != b.predict.windows:
        return False
    return [file_sha256(m.checkpoint) for m in a.members] == [file_sha256(m.checkpoint) for m in b.members]
