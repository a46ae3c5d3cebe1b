"""Prediction of a split as a library call: every single model and their TTA ensemble, in one pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from seg_pipeline.contracts import EnsembleMember, PredictionItem, PredictionSet, ShardSet, TrainedModel
from seg_pipeline.data.shards import ShardRow, raster_input, read_manifest, read_shard_index, shard_dirs
from seg_pipeline.inference.ensemble import ENSEMBLE
from seg_pipeline.inference.predict import LoadedModel, load_stage_model, predict_files
from seg_pipeline.progress import default_log_fn
from seg_pipeline.settings import PredictSettings
from seg_pipeline.tracking import TrackingSettings
from seg_pipeline.workflows.resolve import resolve_model_checkpoint

LogFn = Callable[[str], None]


def labeled_rows(shards: ShardSet, split: str) -> tuple[str, list[ShardRow]]:
    """The labeled tiles of ``split`` (or of ``val`` when the dataset has no such split)."""
    available = read_manifest(shards.dataset_dir)["splits"]
    chosen = split if split in available else "val"
    rows = [row for folder in shard_dirs(shards.dataset_dir, chosen) for row in read_shard_index(folder)]
    labeled = [row for row in rows if row.target_path is not None]
    if not labeled:
        raise ValueError(
            f"split {chosen!r} of {shards.dataset_dir} has no labeled tile to evaluate; choose another split "
            f"(the dataset has {sorted(available)})"
        )
    return chosen, labeled


def _members(
    models: Sequence[tuple[str, TrainedModel]], settings: PredictSettings, tracking: TrackingSettings | None
) -> tuple[list[LoadedModel], list[EnsembleMember]]:
    loaded, members = [], []
    for name, trained in models:
        loaded.append(load_stage_model(trained.checkpoint, name))
        record = trained.tracking
        members.append(
            EnsembleMember(
                name=name,
                checkpoint=trained.checkpoint,
                registered_model=record.registered_model if record else None,
                registered_version=record.registered_version if record else None,
            )
        )
    for index, reference in enumerate(settings.extra_checkpoints):
        path = resolve_model_checkpoint(reference, tracking) if tracking else Path(reference)
        name = f"extra_{index}"
        loaded.append(load_stage_model(path, name))
        members.append(EnsembleMember(name=name, checkpoint=str(path)))
    return loaded, members


def predict_split(
    settings: PredictSettings,
    shards: ShardSet,
    models: Sequence[tuple[str, TrainedModel]],
    candidate: str,
    out_root: Path,
    *,
    tracking: TrackingSettings | None = None,
    log_fn: LogFn | None = None,
) -> PredictionSet:
    """Class maps of the evaluation split by each model and by the ensemble, in ``out_root/<set>/``.

    ``candidate`` names the member the champion gate may promote (it must be a registered model).
    """
    log = log_fn or default_log_fn()
    split, rows = labeled_rows(shards, settings.split)
    loaded, members = _members(models, settings, tracking)
    if candidate not in {m.name for m in members}:
        raise ValueError(f"candidate {candidate!r} is not among the members {[m.name for m in members]}")
    names = [m.name for m in loaded] + [ENSEMBLE] if len(loaded) > 1 else [ENSEMBLE]
    out_dirs = {name: out_root / name for name in names}
    run = predict_files(
        loaded, [(row.item_id, raster_input(row)) for row in rows], out_dirs, settings, log_fn=log
    )
    log(
        f"predicted {len(rows)} {split} tiles with {len(loaded)} models x "
        f"{run.views_per_input // len(loaded)} views in {run.seconds:.1f}s -> {out_root}"
    )
    first = loaded[0]
    return PredictionSet(
        split=split,
        out_root=str(out_root),
        sets={name: str(folder) for name, folder in out_dirs.items()},
        items=[
            PredictionItem(item_id=row.item_id, input=str(raster_input(row)), target=str(row.target_path))
            for row in rows
        ],
        members=members,
        candidate=candidate,
        class_names=list(first.class_names),
        ignore_index=first.ignore_index,
        views_per_input=run.views_per_input,
        settings=settings,
        seconds={"predict": round(run.seconds, 3)},
    )
