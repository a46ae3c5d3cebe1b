"""Training stages as plain functions: stage 1 (supervised pretraining on combined sources)
and stage 2 (KD finetuning), each one MLflow run. Usable from a notebook; the Dagster assets
only call these.

A stage wires data (shards of one or more sources, class remaps, per-source normalisation),
model, loss, optimizer, scheduler and the loop together, logs params, per-epoch metrics,
the resolved config and the best checkpoint to MLflow, and registers the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seg_pipeline.data.augment import AugmentConfig, Augmenter
from seg_pipeline.data.combined import InterleavedSources, RemappedSource, remap_table, resolve_remap
from seg_pipeline.data.datasets import ShardIterableDataset, ShardMapDataset
from seg_pipeline.data.headers import read_catalog
from seg_pipeline.data.loaders import LoaderConfig, build_eval_loader, build_train_loader
from seg_pipeline.data.normalization import BandStats, band_stats_from_catalog
from seg_pipeline.metrics import ConfusionMatrix
from seg_pipeline.models import ModelSpec, SegmentationModel, build_model
from seg_pipeline.models.checkpoint import load_checkpoint, load_model_weights
from seg_pipeline.training.distill import MULTI_SCALE_MODES, DistillationObjective
from seg_pipeline.training.distributed import init_distributed, is_initialized, is_main_process, world_size
from seg_pipeline.training.loop import (
    FitResult,
    Objective,
    SupervisedObjective,
    TrainConfig,
    fit,
    optimizer_steps_per_epoch,
)
from seg_pipeline.training.losses import KnowledgeDistillationLoss, build_loss, inverse_frequency_weights
from seg_pipeline.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger("seg_pipeline.training")


@dataclass(frozen=True)
class SourceSpec:
    """One sharded dataset feeding a stage.

    Attributes:
        name: Dataset id (shown in logs and MLflow params).
        dataset_dir: ``<processed>/<dataset>`` holding ``manifest.json``.
        catalog_path: Its header catalog (band statistics, class counts).
        class_names: The source's own class names.
        splits: Splits of this source used for training.
        class_remap: Source class -> target class (names or ids; ``None`` value = ignore).
            ``None`` means the source already uses the target scheme.
    """

    name: str
    dataset_dir: Path
    catalog_path: Path
    class_names: tuple[str, ...]
    splits: tuple[str, ...] = ("train",)
    class_remap: Mapping[str, str | None] | None = None


@dataclass(frozen=True)
class KDSettings:
    """Stage-2 distillation knobs (seed 002 defaults)."""

    alpha: float = 0.7
    temperature: float = 3.0
    confidence_threshold: float = 0.5
    warmup_epochs: int = 5
    transfer_split: str | None = None
    patch_sizes: tuple[int, ...] | None = None
    multi_scale_mode: str = "sample_one_scale_per_step"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value is impossible."""
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"kd.alpha={self.alpha}: must be within [0, 1] (weight of CE; KD gets 1 - alpha)"
            )
        if self.temperature <= 0:
            raise ValueError(f"kd.temperature={self.temperature}: must be > 0")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"kd.confidence_threshold={self.confidence_threshold}: must be within [0, 1]")
        if self.warmup_epochs < 0:
            raise ValueError(f"kd.warmup_epochs={self.warmup_epochs}: must be >= 0")
        if self.multi_scale_mode not in MULTI_SCALE_MODES:
            raise ValueError(
                f"kd.multi_scale_mode={self.multi_scale_mode!r}: choose one of {MULTI_SCALE_MODES}"
            )


@dataclass
class StageConfig:
    """Everything one training stage needs besides its data and tracking."""

    model: ModelSpec
    loss: str = "ce+dice"
    class_weighting: bool = False
    optimizer: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 1e-2
    encoder_lr_mult: float = 1.0
    scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    train: TrainConfig = field(default_factory=TrainConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig.light)
    ignore_index: int = 255
    val_split: str = "val"
    kd: KDSettings | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value is impossible."""
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}: the learning rate must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay}: must be >= 0")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr}: must be within [0, lr={self.lr}]")
        self.train.validate()
        self.loader.validate()
        if self.kd is not None:
            self.kd.validate()

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (logged to MLflow and saved in checkpoints)."""
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()
        return data


@dataclass
class StageResult:
    """What a stage produced; the Dagster asset returns it as its value."""

    stage: str
    best_checkpoint: Path
    last_checkpoint: Path | None
    checkpoint_dir: Path
    best_score: float | None
    best_epoch: int | None
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int
    per_class_iou: dict[str, float]
    history: list[dict[str, float]]
    wall_time_s: float
    images_per_s: float
    device: str
    precision: str
    model_spec: dict[str, Any]
    class_names: list[str]
    normalization: dict[str, list[float]]
    run_id: str | None = None
    run_url: str | None = None
    model_uri: str | None = None
    registered_model: str | None = None
    registered_version: str | None = None
    curve_path: Path | None = None
    world_size: int = 1  # DDP ranks that trained it (torchrun), 1 in a single process

    def to_value(self) -> dict[str, Any]:
        """JSON-friendly dict (paths as strings)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def source_stats(source: SourceSpec) -> BandStats:
    """Per-band statistics of a source's labeled training tiles (pooled over valid pixels)."""
    catalog = read_catalog(source.catalog_path)
    return band_stats_from_catalog(catalog[catalog["status"] == "ok"])


def _lut(source: SourceSpec, target_classes: Sequence[str], ignore_index: int) -> np.ndarray | None:
    if source.class_remap is None and tuple(source.class_names) == tuple(target_classes):
        return None
    remap = resolve_remap(source.class_remap or {}, source.class_names, target_classes)
    return remap_table(remap, ignore_index)


def build_training_data(
    sources: Sequence[SourceSpec],
    target_classes: Sequence[str],
    config: StageConfig,
    *,
    include_unlabeled: bool = False,
) -> InterleavedSources:
    """Interleave every (source, split) as one stream with masks remapped to the target scheme."""
    streams = []
    for index, source in enumerate(sources):
        stats = source_stats(source)
        lut = _lut(source, target_classes, config.ignore_index)
        for split in source.splits:
            dataset = ShardIterableDataset(
                source.dataset_dir,
                split,
                stats=stats,
                augmenter=Augmenter(config.augment, seed=config.train.seed + index),
                ignore_index=config.ignore_index,
                seed=config.train.seed + index,
                cache_mode=config.loader.cache_mode,
                cache_max_items=config.loader.cache_max_items,
                drop_unlabeled=not include_unlabeled,
            )
            streams.append(RemappedSource(dataset, lut, name=f"{source.name}/{split}"))
    return InterleavedSources(streams, seed=config.train.seed)


def make_evaluate_fn(
    num_classes: int, ignore_index: int, class_names: Sequence[str]
) -> Callable[[nn.Module, Any], dict[str, float]]:
    """An ``evaluate_fn`` for the loop: one confusion matrix over the loader, macro metrics.

    Keys are ``val/miou``, ``val/iou/<class>``...: prefixed here so per-class keys (which hold a
    ``/`` already) land under ``val/`` like the scalars.
    """

    @torch.inference_mode()
    def evaluate(model: nn.Module, loader: Any) -> dict[str, float]:
        device = next(model.parameters()).device
        matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index)
        was_training = model.training
        model.eval()
        for batch in loader:
            logits = model(batch["image"].to(device))
            matrix.update(logits.argmax(1).cpu().numpy(), batch["mask"].numpy())
        model.train(was_training)
        metrics = matrix.compute()
        return {f"val/{k}": v for k, v in metrics.to_dict(list(class_names)).items() if np.isfinite(v)}

    return evaluate


def load_trained_model(checkpoint: Path | str, prefer_ema: bool = True) -> SegmentationModel:
    """Rebuild a model from a stage checkpoint (spec and weights both come from the file)."""
    state = load_checkpoint(checkpoint)
    if not state.get("model_spec"):
        raise ValueError(f"checkpoint {checkpoint} has no model_spec: it was not written by a training stage")
    model = build_model(ModelSpec.from_dict(state["model_spec"]))
    load_model_weights(model, checkpoint, prefer_ema=prefer_ema)
    return model.eval()


def _class_weights(
    sources: Sequence[SourceSpec], target_classes: Sequence[str], ignore_index: int
) -> torch.Tensor:
    totals = np.zeros(len(target_classes), dtype=np.int64)
    for source in sources:
        catalog = read_catalog(source.catalog_path)
        lut = _lut(source, target_classes, ignore_index)
        for counts in catalog.loc[catalog["status"] == "ok", "class_counts"]:
            if counts is None or not len(counts):
                continue
            for source_class, n in enumerate(counts):
                target_class = source_class if lut is None else int(lut[source_class])
                if target_class < len(target_classes):
                    totals[target_class] += int(n)
    return inverse_frequency_weights(totals.tolist(), power=0.5)


def _plot_curves(history: Sequence[Mapping[str, float]], path: Path, monitor: str) -> Path | None:
    """Training curves PNG (loss and the monitored metric per epoch)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot(epochs, [h.get("train/loss", np.nan) for h in history], marker="o", label="train/loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("training loss")
    ax_metric.plot(epochs, [h.get(monitor, np.nan) for h in history], marker="o", color="tab:green")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_title(monitor)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_stage(
    stage: str,
    config: StageConfig,
    sources: Sequence[SourceSpec],
    target: SourceSpec,
    checkpoint_dir: Path | str,
    *,
    init_checkpoint: Path | str | None = None,
    teacher_checkpoints: Sequence[Path | str] = (),
    tracking: Any = None,
    run_tags: Mapping[str, str] | None = None,
    register_as: str | None = None,
    resume: bool = True,
    log_fn: Callable[[str], None] | None = None,
) -> StageResult:
    """Train one stage and track it.

    Args:
        stage: ``pretrain`` or ``kd`` (names the MLflow run and the tag).
        config: Model, loss, optimizer, loop, loader and augmentation settings.
        sources: Training sources (target first, then auxiliary ones).
        target: The target dataset; its ``val_split`` is the validation set and its class
            names define the output classes.
        checkpoint_dir: ``best.pt``/``last.pt``/``epoch-N.pt``/``final.pt`` go here; a
            ``last.pt`` already there is resumed (a retried run continues).
        init_checkpoint: Start from these weights (stage 2 starts from stage 1).
        teacher_checkpoints: Stage 2 teachers; required when ``config.kd`` is set.
        tracking: A :class:`seg_pipeline.tracking.TrackingSettings`; ``None`` disables MLflow.
        run_tags: Extra MLflow tags (Dagster run id, asset key, data version...).
        register_as: Registered model name in the MLflow registry.
        resume: Resume from ``checkpoint_dir/last.pt`` when present.
        log_fn: Progress line sink (the Dagster logger in assets).
    """
    from seg_pipeline import tracking as trk

    config.validate()
    log = log_fn or logger.info
    class_names = list(target.class_names)
    if config.model.num_classes != len(class_names):
        raise ValueError(
            f"model.num_classes={config.model.num_classes} but the target {target.name!r} has "
            f"{len(class_names)} classes {class_names}; set num_classes to match"
        )
    if config.kd is not None and not teacher_checkpoints:
        raise ValueError("a KD stage needs teacher_checkpoints (the stage-1 model or a list of models)")
    checkpoint_dir = Path(checkpoint_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized():
        init_distributed()  # launched by torchrun: NCCL on GPU, gloo on CPU
    if not is_main_process():
        tracking = None  # rank 0 alone talks to MLflow (the loop already keeps checkpoints to rank 0)
    if tracking is not None:
        trk.check_tracking_uri(tracking)  # fail before any training work

    torch.manual_seed(config.train.seed)
    model = build_model(config.model)
    if init_checkpoint is not None and not (resume and (checkpoint_dir / "last.pt").exists()):
        load_model_weights(model, init_checkpoint, prefer_ema=True)
        log(f"{stage}: initialised from {init_checkpoint}")

    train_data = build_training_data(
        sources,
        class_names,
        config,
        include_unlabeled=config.kd is not None and config.kd.transfer_split is not None,
    )
    if config.kd is not None and config.kd.transfer_split:
        transfer = dataclasses.replace(target, splits=(config.kd.transfer_split,), class_remap=None)
        extra = build_training_data([transfer], class_names, config, include_unlabeled=True)
        train_data = InterleavedSources([*train_data.sources, *extra.sources], seed=config.train.seed)
    target_stats = source_stats(target)
    val_data = ShardMapDataset(
        target.dataset_dir, config.val_split, stats=target_stats, ignore_index=config.ignore_index
    )
    train_loader = build_train_loader(train_data, config.loader, seed=config.train.seed)
    val_loader = build_eval_loader(val_data, dataclasses.replace(config.loader, cache_mode="none"))

    weights = _class_weights(sources, class_names, config.ignore_index) if config.class_weighting else None
    objective: Objective
    if config.kd is None:
        loss = build_loss(
            config.loss, len(class_names), ignore_index=config.ignore_index, class_weights=weights
        )
        objective = SupervisedObjective(loss)
    else:
        teachers = [load_trained_model(path) for path in teacher_checkpoints]
        kd_loss = KnowledgeDistillationLoss(
            alpha=config.kd.alpha,
            temperature=config.kd.temperature,
            confidence_threshold=config.kd.confidence_threshold,
            ignore_index=config.ignore_index,
            ce_weight=weights,
        )
        objective = DistillationObjective(
            teachers,
            kd_loss,
            warmup_epochs=config.kd.warmup_epochs,
            patch_sizes=config.kd.patch_sizes,
            multi_scale_mode=config.kd.multi_scale_mode,
            seed=config.train.seed,
        )

    optimizer = build_optimizer(
        model,
        config.optimizer,
        lr=config.lr,
        weight_decay=config.weight_decay,
        encoder_lr_mult=config.encoder_lr_mult,
    )
    num_batches = -(-len(train_data) // config.loader.batch_size)
    steps = optimizer_steps_per_epoch(
        num_batches, config.train.grad_accum_steps, config.train.max_steps_per_epoch
    )
    scheduler = build_scheduler(
        optimizer,
        config.scheduler,
        epochs=config.train.epochs,
        steps_per_epoch=steps,
        warmup_epochs=config.warmup_epochs,
        min_lr=config.min_lr,
        plateau_mode=config.train.mode,
    )
    normalization = {"mean": list(target_stats.mean), "std": list(target_stats.std)}
    run_config = {
        "stage": stage,
        "config": config.to_dict(),
        "sources": [
            {"name": s.name, "splits": list(s.splits), "class_remap": dict(s.class_remap or {})}
            for s in sources
        ],
        "class_names": class_names,
        "normalization": normalization,
        "ignore_index": config.ignore_index,
        "teachers": [str(p) for p in teacher_checkpoints],
        "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
    }
    if isinstance(objective, DistillationObjective):
        device = config.train.precision_policy().device
        objective.to(device)

    run_context = (
        trk.start_run(tracking, run_name=stage, tags={**(run_tags or {}), "seg_pipeline.stage": stage})
        if tracking is not None
        else None
    )
    evaluate_fn = make_evaluate_fn(len(class_names), config.ignore_index, class_names)

    def train(on_epoch_end: Callable[[int, dict[str, float]], None] | None) -> FitResult:
        return fit(
            model,
            objective,
            train_loader,
            val_loader,
            evaluate_fn,
            optimizer,
            scheduler,
            config.train,
            checkpoint_dir,
            resume=resume,
            on_epoch_end=on_epoch_end,
            model_spec=config.model.to_dict(),
            run_config=run_config,
            log_fn=log,
        )

    started = time.perf_counter()
    if run_context is None:
        return _stage_result(stage, train(None), config, class_names, normalization, checkpoint_dir, started)
    with run_context as run:
        run.log_params({"stage": stage, **run_config})
        trk.log_environment(run)

        def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
            run.log_metrics({k: v for k, v in logs.items() if np.isfinite(v)}, step=epoch)

        stage_result = _stage_result(
            stage, train(on_epoch_end), config, class_names, normalization, checkpoint_dir, started
        )
        run.log_dict(run_config, "resolved_config.json")
        run.log_artifact(stage_result.best_checkpoint, artifact_path="checkpoints")
        if stage_result.curve_path is not None:
            run.log_artifact(stage_result.curve_path, artifact_path="plots")
        best_model = load_trained_model(stage_result.best_checkpoint)
        logged = run.log_model(best_model, artifact_path="model", registered_model_name=register_as)
        run.set_tags({"seg_pipeline.best_checkpoint": str(stage_result.best_checkpoint)})
        stage_result.run_id = run.run_id
        stage_result.run_url = run.url
        stage_result.model_uri = logged.model_uri
        stage_result.registered_model = logged.registered_model_name
        stage_result.registered_version = logged.registered_version
    return stage_result


def _stage_result(
    stage: str,
    result: FitResult,
    config: StageConfig,
    class_names: Sequence[str],
    normalization: dict[str, list[float]],
    checkpoint_dir: Path,
    started: float,
) -> StageResult:
    best = result.best_checkpoint or result.final_checkpoint or result.last_checkpoint
    if best is None:
        raise RuntimeError(f"{stage}: training wrote no checkpoint in {checkpoint_dir}")
    best_logs = next(
        (h for h in result.history if result.best_epoch is not None and h.get("epoch") == result.best_epoch),
        result.history[-1] if result.history else {},
    )
    per_class = {
        name: float(best_logs[f"val/iou/{name}"]) for name in class_names if f"val/iou/{name}" in best_logs
    }
    curve = _plot_curves(result.history, checkpoint_dir / "training_curves.png", config.train.monitor)
    return StageResult(
        stage=stage,
        best_checkpoint=Path(best),
        last_checkpoint=result.last_checkpoint,
        checkpoint_dir=checkpoint_dir,
        best_score=result.best_score,
        best_epoch=result.best_epoch,
        epochs_run=result.epochs_run,
        stopped_early=result.stopped_early,
        resumed_from_epoch=result.start_epoch - 1,
        per_class_iou=per_class,
        history=result.history,
        wall_time_s=time.perf_counter() - started,
        images_per_s=result.images_per_s,
        device=result.device,
        precision=result.precision,
        world_size=world_size(),
        model_spec=config.model.to_dict(),
        class_names=list(class_names),
        normalization=normalization,
        curve_path=curve,
    )
