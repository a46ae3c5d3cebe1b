"""One training stage as a library call, in named steps: model, data, objective, optimiser, fit, track.

:class:`StageJob` holds everything a stage needs (settings, data contracts, teachers, checkpoint
folder, tracking), is plain JSON (torchrun ranks receive it as a file) and is run by
:func:`run_stage`. Stage 1 and stage 2 differ only in the job they build (``workflows.train``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict, Field

from seg_pipeline.contracts import BandStatistics, Catalog, ShardSet, TrackingRecord, TrainedModel
from seg_pipeline.contracts.base import Contract
from seg_pipeline.data.batching import SourceBatches
from seg_pipeline.data.combined import InterleavedSources
from seg_pipeline.data.loaders import (
    build_eval_loader,
    build_train_loader,
    cache_choice,
    prefetch_thread_wanted,
    with_prefetch_thread,
)
from seg_pipeline.hardware import resolve_device
from seg_pipeline.models import SegmentationModel, build_model
from seg_pipeline.models.checkpoint import load_model_weights
from seg_pipeline.models.loading import load_trained_model
from seg_pipeline.progress import default_log_fn
from seg_pipeline.settings import KDStageSettings, LoopSettings, PretrainSettings, StageSettings
from seg_pipeline.settings.models import ModelSpec
from seg_pipeline.tracking import (
    TAG_MEMBER,
    TAG_PIPELINE_RUN_ID,
    TrackedRun,
    TrackingSettings,
    check_tracking_uri,
    log_environment,
    start_run,
)
from seg_pipeline.training.distill import DistillationObjective
from seg_pipeline.training.distributed import init_distributed, is_initialized, is_main_process, world_size
from seg_pipeline.training.losses import KnowledgeDistillationLoss, build_loss, inverse_frequency_weights
from seg_pipeline.training.multiscale import MultiScaleObjective
from seg_pipeline.training.objectives import Objective, SupervisedObjective
from seg_pipeline.training.optim import build_optimizer, build_scheduler
from seg_pipeline.training.plots import plot_training_curves
from seg_pipeline.training.sources import (
    TrainingSource,
    band_stats,
    build_training_data,
    build_validation_data,
    class_pixel_totals,
    patch_size,
)
from seg_pipeline.training.steps import optimizer_steps_per_epoch
from seg_pipeline.training.trainer import EvaluateFn, FitResult, Trainer, precision_policy
from seg_pipeline.training.validation import STREAM_PIXELS, collate_tiles, make_evaluate_fn, validation_keys

LogFn = Callable[[str], None]


class StageJob(Contract):
    """Everything one training stage needs besides the process it runs in."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    stage: str
    settings: KDStageSettings | PretrainSettings
    target: ShardSet
    sources: list[TrainingSource]
    checkpoint_dir: str
    spec: ModelSpec
    init_checkpoint: str | None = None
    teachers: list[str] = Field(default_factory=list)
    tracking: TrackingSettings | None = None
    run_tags: dict[str, str] = Field(default_factory=dict)
    register_as: str | None = None
    resume: bool | str = True  # True: last.pt of checkpoint_dir if any; a path: that checkpoint
    metrics_csv: str | None = None  # per-epoch history CSV; None: checkpoint_dir/metrics.csv
    # the teacher's per-epoch logs, drawn before this stage's in its training curves (KD stages)
    curve_before: list[dict[str, float]] = Field(default_factory=list)

    @property
    def is_kd(self) -> bool:
        """Whether this is a distillation stage (it has teachers and KD settings)."""
        return isinstance(self.settings, KDStageSettings)


def _prepare_process(job: StageJob) -> TrackingSettings | None:
    """Join torchrun's process group when launched by it; rank 0 alone talks to MLflow."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized():
        init_distributed()  # NCCL on GPU, gloo on CPU
    tracking = job.tracking if is_main_process() else None
    if tracking is not None:
        check_tracking_uri(tracking)  # fail before any training work
    return tracking


def _build_model(job: StageJob, log: LogFn) -> SegmentationModel:
    torch.manual_seed(job.settings.loop.seed)
    model = build_model(job.spec)
    resuming = isinstance(job.resume, str) or (job.resume and (Path(job.checkpoint_dir) / "last.pt").exists())
    if job.init_checkpoint is not None and not resuming:
        load_model_weights(model, job.init_checkpoint, prefer_ema=True)
        log(f"{job.stage}: initialised from {job.init_checkpoint}")
    return model


def _supervised_loss(job: StageJob, class_weights: torch.Tensor | None) -> torch.nn.Module:
    """The stage's ``loss`` settings as a loss module (training, and ``val/loss`` in validation)."""
    catalog, loss = job.target.catalog, job.settings.loss
    return build_loss(
        loss.name,
        catalog.num_classes,
        ignore_index=catalog.ignore_index,
        class_weights=class_weights,
        weights=loss.term_weights or None,
        focal_gamma=loss.focal_gamma,
        label_smoothing=loss.label_smoothing,
    )


def check_monitor(loop: LoopSettings, catalog: Catalog) -> None:
    """Refuse a ``loop.monitor`` validation never logs before any training work (not after epoch 1)."""
    monitor = loop.monitor_key
    if not monitor.startswith("val/"):
        return  # train/... keys depend on the objective; the trainer checks them after the first epoch
    known = validation_keys(catalog.class_names, catalog.positive_ids, with_loss=True)
    if monitor not in known:
        scalars = sorted(
            k for k in known if k.count("/") == 1 or k.startswith(("val/pooled", "val/detection"))
        )
        raise ValueError(
            f"loop.monitor={loop.monitor!r} is not a validation metric; use one of {scalars} or "
            f"val/iou/<class> (classes {catalog.class_names}); mode: max, except val/loss (min)"
        )


def _objective(job: StageJob, class_weights: torch.Tensor | None) -> Objective:
    catalog = job.target.catalog
    settings = job.settings
    if not isinstance(settings, KDStageSettings):
        loss = _supervised_loss(job, class_weights)
        return _multi_scale(SupervisedObjective(loss), settings, catalog.ignore_index)
    kd = settings.kd
    kd_loss = KnowledgeDistillationLoss(
        alpha=kd.alpha,
        temperature=kd.temperature,
        confidence_threshold=kd.confidence_threshold,
        ignore_index=catalog.ignore_index,
        ce_weight=class_weights,
    )
    objective = DistillationObjective(
        [load_trained_model(path) for path in job.teachers],
        kd_loss,
        warmup_epochs=kd.warmup_epochs,
    ).to(precision_policy(settings.loop).device)
    return _multi_scale(objective, settings, catalog.ignore_index)


def _multi_scale(objective: Objective, settings: StageSettings, ignore_index: int) -> Objective:
    """Per-size loss normalisation when the stage trains a patch-size schedule."""
    if not settings.patches.sizes:
        return objective
    return MultiScaleObjective(
        objective,
        settings.patches.sizes,
        settings.patches.mode,
        ignore_index=ignore_index,
        sampling=settings.patches.sampling,
        seed=settings.loop.seed,
    )


def _train_data(job: StageJob, log: LogFn) -> InterleavedSources:
    catalog, settings = job.target.catalog, job.settings
    transfer = settings.kd.transfer_split if isinstance(settings, KDStageSettings) else None
    size = patch_size(job.sources, settings.patches)
    chosen = "patches.size" if settings.patches.size else "auto: median tile side"
    log(f"{job.stage}: training on {size} px patches ({chosen}); schedule {settings.patches.sizes or 'off'}")
    data = build_training_data(
        job.sources,
        catalog.class_names,
        catalog.ignore_index,
        settings,
        include_unlabeled=transfer is not None,
        size=size,
    )
    if transfer:
        extra = build_training_data(
            [TrainingSource(shards=job.target, splits=[transfer])],
            catalog.class_names,
            catalog.ignore_index,
            settings,
            include_unlabeled=True,
            size=size,
        )
        data = InterleavedSources(
            [*data.sources, *extra.sources], seed=settings.loop.seed, limits=[*data.limits, *extra.limits]
        )
    shares = ", ".join(f"{s.name} {n}" for s, n in zip(data.sources, data.per_epoch(), strict=True))
    log(f"{job.stage}: patches per epoch: {shares}")
    return data


def run_config(job: StageJob, normalization: BandStatistics) -> dict[str, Any]:
    """The resolved run config: logged to MLflow and stored in every checkpoint (inference reads it)."""
    catalog = job.target.catalog
    return {
        "stage": job.stage,
        "config": job.settings.model_dump(),
        "sources": [
            {"name": s.name, "splits": list(s.splits), "class_remap": dict(s.class_remap or {})}
            for s in job.sources
        ],
        "class_names": list(catalog.class_names),
        "class_colors": [list(rgb) for rgb in catalog.class_colors],
        "positive_classes": catalog.positive_ids,
        "normalization": {"mean": list(normalization.mean), "std": list(normalization.std)},
        "ignore_index": catalog.ignore_index,
        "teachers": list(job.teachers),
        "init_checkpoint": job.init_checkpoint,
    }


def _trainer(
    job: StageJob, model: SegmentationModel, objective: Objective, num_samples: int, log: LogFn
) -> Trainer:
    settings = job.settings
    optimizer = build_optimizer(
        model,
        settings.optimizer.name,
        lr=settings.optimizer.lr,
        weight_decay=settings.optimizer.weight_decay,
        encoder_lr_mult=settings.optimizer.encoder_lr_mult,
        decoder_lr_mult=settings.optimizer.decoder_lr_mult,
        layer_decay=settings.optimizer.layer_decay,
        head_lr_mult=settings.optimizer.head_lr_mult,
    )
    num_batches = -(-num_samples // settings.loader.batch_size)
    steps = optimizer_steps_per_epoch(
        num_batches, settings.loop.grad_accum_steps, settings.loop.max_steps_per_epoch
    )
    scheduler = build_scheduler(
        optimizer,
        settings.scheduler.name,
        epochs=settings.loop.epochs,
        steps_per_epoch=steps,
        warmup_epochs=settings.scheduler.warmup_epochs,
        min_lr=settings.scheduler.min_lr,
        step_size=settings.scheduler.step_size,
        gamma=settings.scheduler.gamma,
        plateau_factor=settings.scheduler.plateau_factor,
        plateau_patience=settings.scheduler.plateau_patience,
        plateau_mode=settings.loop.mode,
    )
    normalization = job.target.catalog.normalization
    assert normalization is not None  # band_stats() refused a catalog without statistics before
    return Trainer(
        model,
        objective,
        optimizer,
        scheduler,
        settings.loop,
        job.checkpoint_dir,
        model_spec=job.spec.model_dump(),
        run_config=run_config(job, normalization),
        log_fn=log,
        metrics_csv=job.metrics_csv,
    )


@dataclass
class PreparedStage:
    """A stage ready to fit: the trainer and the data it runs on."""

    trainer: Trainer
    train_loader: Any
    val_loader: Any
    evaluate_fn: EvaluateFn


def prepare_stage(job: StageJob, log: LogFn) -> PreparedStage:
    """Build model, data, objective and optimiser of ``job``; nothing has trained yet."""
    catalog = job.target.catalog
    normalization = band_stats(catalog.normalization, job.target.dataset_id)
    check_monitor(job.settings.loop, catalog)
    model = _build_model(job, log)
    train_data = _train_data(job, log)
    val_data = build_validation_data(job.target, job.settings.val_split, normalization)
    streamed = val_data.take_large(STREAM_PIXELS)
    if streamed:
        log(f"{job.stage}: {len(streamed)} validation scenes above {STREAM_PIXELS} px are scored from disk")
    loader_settings = job.settings.loader
    cache, why = cache_choice(loader_settings, train_data)
    log(f"{job.stage}: tile cache {cache} ({why})")
    loader_settings = loader_settings.replace(cache_mode=cache)
    device_type = resolve_device(job.settings.loop.device).type
    prefetch, why = prefetch_thread_wanted(loader_settings, device_type)
    log(f"{job.stage}: batches read {'ahead in a thread' if prefetch else 'in the step'} ({why})")
    weights = None
    if job.settings.loss.class_weighting:
        totals = class_pixel_totals(job.sources, catalog.class_names, catalog.ignore_index)
        weights = inverse_frequency_weights(totals, power=0.5)
    return PreparedStage(
        trainer=_trainer(job, model, _objective(job, weights), len(train_data), log),
        train_loader=with_prefetch_thread(
            build_train_loader(
                SourceBatches(train_data, loader_settings.batch_size),
                loader_settings,
                seed=job.settings.loop.seed,
            ),
            loader_settings,
            device_type,
        ),
        val_loader=build_eval_loader(
            val_data, loader_settings.replace(cache_mode="none"), collate_fn=collate_tiles
        ),
        evaluate_fn=make_evaluate_fn(
            catalog.num_classes,
            catalog.ignore_index,
            catalog.class_names,
            job.settings.validation,
            positive_classes=catalog.positive_ids,
            loss_fn=_supervised_loss(job, weights),
            streamed=streamed,
            stats=normalization,
        ),
    )


def _handed_over(job: StageJob, fit: FitResult) -> tuple[Path, int | None, float | None]:
    """The checkpoint the stage hands on (``loop.hand_over``), its epoch and its monitor value."""
    loop = job.settings.loop
    if loop.hand_over == "final" and fit.final_checkpoint is not None and fit.history:
        last = fit.history[-1]
        score = last.get(loop.monitor_key)
        epoch = last.get("epoch")
        return fit.final_checkpoint, None if epoch is None else int(epoch), score
    chosen = fit.best_checkpoint or fit.final_checkpoint or fit.last_checkpoint
    if chosen is None:
        raise RuntimeError(f"{job.stage}: training wrote no checkpoint in {job.checkpoint_dir}")
    return chosen, fit.best_epoch, fit.best_score


def _result(job: StageJob, fit: FitResult, started: float, tracking: TrackingRecord | None) -> TrainedModel:
    best, best_epoch, best_score = _handed_over(job, fit)
    best_logs = next(
        (h for h in fit.history if best_epoch is not None and h.get("epoch") == best_epoch),
        fit.history[-1] if fit.history else {},
    )
    catalog = job.target.catalog
    per_class = {
        name: float(best_logs[f"val/iou/{name}"])
        for name in catalog.class_names
        if f"val/iou/{name}" in best_logs
    }
    curve = plot_training_curves(
        fit.history,
        Path(job.checkpoint_dir) / "training_curves.png",
        job.settings.loop.monitor_key,
        before=job.curve_before,
        kd_warmup_epochs=job.settings.kd.warmup_epochs if isinstance(job.settings, KDStageSettings) else 0,
    )
    assert catalog.normalization is not None
    return TrainedModel(
        stage=job.stage,
        checkpoint=str(best),
        last_checkpoint=None if fit.last_checkpoint is None else str(fit.last_checkpoint),
        checkpoint_dir=job.checkpoint_dir,
        spec=job.spec,
        class_names=list(catalog.class_names),
        ignore_index=catalog.ignore_index,
        normalization=catalog.normalization,
        monitor=job.settings.loop.monitor_key,
        best_score=best_score,
        score_floor=job.settings.score_floor,
        best_epoch=best_epoch,
        epochs_run=fit.epochs_run,
        stopped_early=fit.stopped_early,
        resumed_from_epoch=fit.start_epoch - 1,
        per_class_iou=per_class,
        history=fit.history,
        wall_time_s=time.perf_counter() - started,
        images_per_s=fit.images_per_s,
        device=fit.device,
        precision=fit.precision,
        world_size=world_size(),
        curve_path=None if curve is None else str(curve),
        tracking=tracking,
    )


def _log_outputs(
    run: TrackedRun, job: StageJob, model: TrainedModel, config: Mapping[str, Any]
) -> TrackingRecord:
    """Resolved config, best checkpoint, curves and the registered model of a finished stage."""
    run.log_dict(dict(config), "resolved_config.json")
    run.log_artifact(model.checkpoint, artifact_path="checkpoints")
    if model.curve_path is not None:
        run.log_artifact(model.curve_path, artifact_path="plots")
    logged = run.log_model(
        load_trained_model(model.checkpoint),
        artifact_path="model",
        registered_model_name=job.register_as,
        bands=model.spec.in_channels,
        classes=model.spec.num_classes,
    )
    run.set_tags({"seg_pipeline.best_checkpoint": model.checkpoint})
    if logged.registered_model_name and logged.registered_version:
        score = "n/a" if model.best_score is None else f"{model.best_score:.4f}"
        run.describe_model_version(
            logged.registered_model_name,
            logged.registered_version,
            f"{job.stage} stage: {model.spec.architecture}-{model.spec.encoder} on "
            f"{job.target.dataset_id} (data {job.target.data_version[:12]}), best {model.monitor} {score} "
            f"at epoch {model.best_epoch}.",
            {
                model.monitor: score,
                "dataset": job.target.dataset_id,
                "data_version": job.target.data_version,
                "stage": job.stage,
                "mlflow_run_id": run.run_id,
                **{key: value for key, value in job.run_tags.items() if key.startswith("dagster.")},
            },
        )
    return TrackingRecord(
        run_id=run.run_id,
        run_url=run.url,
        model_uri=logged.model_uri,
        model_id=logged.model_id,
        model_url=run.settings.logged_model_link(run.experiment_id, logged.model_id)
        if logged.model_id
        else None,
        registered_model=logged.registered_model_name,
        registered_version=logged.registered_version,
        registered_version_url=run.settings.model_version_link(
            logged.registered_model_name, logged.registered_version
        )
        if logged.registered_model_name and logged.registered_version
        else None,
        curves_url=run.settings.artifact_link(run.run_id, f"plots/{Path(model.curve_path).name}")
        if model.curve_path
        else None,
    )


def _run_name(job: StageJob) -> str:
    """``<stage> [<member>] <dataset> <Dagster run id[:8]>``: a run list that says what each run trained."""
    pipeline_run = job.run_tags.get(TAG_PIPELINE_RUN_ID, "")
    member = job.run_tags.get(TAG_MEMBER, "")  # an extra ensemble member says which
    parts = (job.stage, member, job.target.dataset_id, pipeline_run[:8])
    return " ".join(part for part in parts if part)


def run_stage(job: StageJob, log_fn: LogFn | None = None) -> TrainedModel:
    """Train one stage in this process (a torchrun rank or the Dagster step) and track it in MLflow."""
    log = log_fn or default_log_fn()
    if job.is_kd and not job.teachers:
        raise ValueError("a KD stage needs teachers (the stage-1 model or a list of models)")
    tracking = _prepare_process(job)
    prepared = prepare_stage(job, log)
    trainer = prepared.trainer
    started = time.perf_counter()

    def fit() -> FitResult:
        return trainer.fit(
            prepared.train_loader, prepared.val_loader, prepared.evaluate_fn, resume=job.resume
        )

    if tracking is None:
        return _result(job, fit(), started, None)
    with start_run(
        tracking, run_name=_run_name(job), tags={**job.run_tags, "seg_pipeline.stage": job.stage}
    ) as run:
        run.log_params({"stage": job.stage, "precision": trainer.policy.describe(), **trainer.run_config})
        log_environment(run)
        for source in job.sources:
            run.log_dataset(source.name, source.shards.dataset_dir, source.shards.data_version)

        def log_epoch(epoch: int, logs: dict[str, float]) -> None:
            run.log_metrics({k: v for k, v in logs.items() if np.isfinite(v)}, step=epoch)

        trainer.on_epoch_end = log_epoch
        model = _result(job, fit(), started, None)
        record = _log_outputs(run, job, model, trainer.run_config)
    return model.model_copy(update={"tracking": record})
