"""A training stage run from a terminal into one experiment folder (``seg-pipeline train``).

Seed 004 writes each run to ``outputs/experiments/{timestamp}-{name}/`` with ``checkpoints/``,
``logs/``, ``metrics/`` and ``results/``; seed 003 writes the full run config beside them. This
module builds that folder around the same stage call the Dagster assets make
(:func:`seg_pipeline.workflows.train.pretrain` / :func:`~seg_pipeline.workflows.train.distill_from`),
so a run from the CLI and a materialization train the same way:

- ``config.json``: the validated stage settings, the datasets and the command line;
- ``checkpoints/``: ``best.pt``, ``last.pt``, ``epoch-NNNN.pt``, ``final.pt`` (``--resume`` takes any);
- ``logs/train.log``: the progress lines;
- ``metrics/metrics.csv``: one row per epoch, every logged value (train and validation);
- ``results/``: the validation split predicted by the best checkpoint (GeoTIFF class maps) and its
  scores (``metrics.json``, ``confusion.csv``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seg_pipeline.contracts import ShardSet, TrainedModel
from seg_pipeline.data.shards import raster_input
from seg_pipeline.evaluation.report import comparison_rows, evaluate_pairs, write_confusion_csv, write_json
from seg_pipeline.inference.ensemble import ENSEMBLE
from seg_pipeline.inference.predict import load_stage_model, predict_files
from seg_pipeline.settings import KDStageSettings, PredictSettings, PretrainSettings, TTASettings
from seg_pipeline.tracking import TrackingSettings
from seg_pipeline.workflows.ingest import auxiliary_set, load_shard_set
from seg_pipeline.workflows.layout import DataLayout
from seg_pipeline.workflows.predict import labeled_rows
from seg_pipeline.workflows.resolve import resolve_model_checkpoint
from seg_pipeline.workflows.stage import check_monitor
from seg_pipeline.workflows.train import StageRun, distill_from, pretrain

LogFn = Callable[[str], None]

#: Registered model names of the CLI's runs (the Dagster assets register ``seg_pipeline_pretrained``...).
REGISTERED_NAMES = {"pretrain": "seg_pipeline_cli_pretrained", "kd": "seg_pipeline_cli_student"}


@dataclass(frozen=True)
class ExperimentFolder:
    """The folders of one run (seed 004's layout)."""

    root: Path

    @classmethod
    def new(cls, parent: Path, name: str, now: dt.datetime | None = None) -> ExperimentFolder:
        """``parent/{YYYYmmdd-HHMMSS}-{name}``; a second run in the same second gets ``-2``, ``-3``..."""
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "run"
        stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
        root = parent / f"{stamp}-{slug}"
        counter = 2
        while root.exists():
            root, counter = parent / f"{stamp}-{slug}-{counter}", counter + 1
        return cls(root)

    @property
    def checkpoints(self) -> Path:
        """``best.pt``, ``last.pt``, ... of the stage."""
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        """``train.log``: the progress lines."""
        return self.root / "logs"

    @property
    def metrics(self) -> Path:
        """``metrics.csv``: the per-epoch history."""
        return self.root / "metrics"

    @property
    def results(self) -> Path:
        """Validation predictions of the best checkpoint and their scores."""
        return self.root / "results"

    def create(self) -> ExperimentFolder:
        """Make the folders (an existing run folder is reused: that is how ``--resume`` continues)."""
        for folder in (self.checkpoints, self.logs, self.metrics, self.results):
            folder.mkdir(parents=True, exist_ok=True)
        return self


@dataclass(frozen=True)
class ExperimentRequest:
    """What ``seg-pipeline train`` was asked to do, validated."""

    stage: str
    settings: PretrainSettings | KDStageSettings
    dataset: str
    auxiliary: Sequence[str] = ()
    teacher: str | None = None
    resume: str | None = None
    nproc_per_node: int = 1
    command: str = ""


def file_logger(log_file: Path, echo: LogFn) -> LogFn:
    """A sink that writes each line to ``log_file`` (appending: a resumed run continues it) and ``echo``."""

    def log(line: str) -> None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("a") as handle:
            handle.write(f"{dt.datetime.now().isoformat(timespec='seconds')} {line}\n")
        echo(line)

    return log


def _config_record(request: ExperimentRequest, target: ShardSet) -> dict[str, Any]:
    return {
        "stage": request.stage,
        "command": request.command,
        "dataset": {"id": target.dataset_id, "dir": target.dataset_dir, "data_version": target.data_version},
        "auxiliary": list(request.auxiliary),
        "teacher": request.teacher,
        "resume": request.resume,
        "settings": request.settings.model_dump(mode="json"),
    }


def validation_results(
    model: TrainedModel,
    settings: PretrainSettings | KDStageSettings,
    target: ShardSet,
    out_dir: Path,
    log: LogFn,
) -> dict[str, Any]:
    """Predict the validation split with the best checkpoint (the validation's own windows and views)
    into ``out_dir/val_predictions`` and score it: seed 004's ``results/``.
    """
    split, rows = labeled_rows(target, settings.val_split)
    loaded = load_stage_model(model.checkpoint, model.stage)
    validation = settings.validation
    predict = PredictSettings(tta=TTASettings(**validation.tta.model_dump()), windows=validation.windows)
    folder = out_dir / "val_predictions"
    predict_files([loaded], [(row.item_id, raster_input(row)) for row in rows], {ENSEMBLE: folder}, predict)
    evaluation = evaluate_pairs(
        [(folder / f"{row.item_id}.tif", Path(row.target_path or "")) for row in rows],
        len(loaded.class_names),
        loaded.ignore_index,
        validation.scoring.ignore_nonpositive,
        positive_classes=target.catalog.positive_ids,
        detection_min_pixels=validation.scoring.detection_min_pixels,
    )
    row = comparison_rows({"best": evaluation.metrics}, loaded.class_names)[0]
    detection = evaluation.detection.to_dict() if evaluation.detection else {}
    scores = {
        "split": split,
        "checkpoint": model.checkpoint,
        **row,
        **{f"pooled/{k}": v for k, v in evaluation.pooled().items()},
        **{f"detection/{k}": v for k, v in detection.items()},
    }
    write_json(out_dir / "metrics.json", scores)
    write_confusion_csv(out_dir / "confusion.csv", evaluation.matrix.matrix, list(loaded.class_names))
    log(f"results: {len(rows)} {split} tiles predicted -> {folder}; mIoU {evaluation.metrics.miou:.4f}")
    return scores


def run_experiment(
    request: ExperimentRequest,
    folder: ExperimentFolder,
    layout: DataLayout,
    tracking: TrackingSettings | None,
    log: LogFn,
    *,
    main_process: bool = True,
) -> TrainedModel:
    """Train ``request``'s stage into ``folder`` (on ``nproc_per_node`` torchrun ranks when > 1).

    ``main_process=False`` on torchrun ranks other than 0: they train, rank 0 writes the files.
    """
    target = load_shard_set(layout.processed_dir(request.dataset))
    check_monitor(request.settings.loop, target.catalog)
    if isinstance(request.settings, KDStageSettings) and not request.teacher:
        raise ValueError("--stage kd needs --teacher: a stage-1 checkpoint (best.pt) or models:/name@alias")
    if main_process:  # the folder appears once the run can start
        folder.create()
        log(f"experiment folder {folder.root}")
        write_json(folder.root / "config.json", _config_record(request, target))
    run = StageRun(
        checkpoint_dir=folder.checkpoints,
        tracking=tracking,
        run_tags={"seg_pipeline.experiment_dir": str(folder.root)},
        register_as=REGISTERED_NAMES[request.stage],
        nproc_per_node=request.nproc_per_node,
        log_fn=log,
        resume=request.resume or True,
        metrics_csv=folder.metrics / "metrics.csv",
    )
    if isinstance(request.settings, KDStageSettings):
        assert request.teacher is not None
        teacher = resolve_model_checkpoint(request.teacher, tracking) if tracking else Path(request.teacher)
        model = distill_from(request.settings, target, teacher, run)
    else:
        names = request.auxiliary if request.settings.use_auxiliary else ()
        auxiliary = auxiliary_set([load_shard_set(layout.processed_dir(name)) for name in names])
        model = pretrain(request.settings, target, auxiliary, run)
    if main_process:
        validation_results(model, request.settings, target, folder.results, log)
        write_json(folder.results / "model.json", json.loads(model.model_dump_json(exclude={"history"})))
    return model
