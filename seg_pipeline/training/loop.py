"""The training loop: ``fit`` runs epochs of an objective with AMP, accumulation, clipping, EMA,
scheduling, validation, checkpoints, early stopping, resume and DDP (DESIGN F12-F16).

The loop knows nothing about losses or metrics: an *objective* turns ``(model, batch, epoch)`` into
a scalar loss plus per-term logs (supervised CE/Dice here, KD elsewhere), and an ``evaluate_fn``
turns ``(model, loader)`` into metrics. Under DDP the data loader partitions the data, gradients are
averaged by DDP, epoch losses are all-reduced, validation runs on rank 0 only (with the full
validation loader) and its metrics are broadcast so every rank takes the same scheduling and
early-stopping decisions; only rank 0 logs, calls ``on_epoch_end`` and writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from seg_pipeline.io import sweep_stale_temps, write_json
from seg_pipeline.models.checkpoint import (
    CheckpointError,
    check_state_dict_compatible,
    link_or_copy,
    load_checkpoint,
)
from seg_pipeline.training.checkpoints import CheckpointManager
from seg_pipeline.training.distributed import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    in_lockstep,
    is_initialized,
    is_main_process,
    min_across_ranks,
    rank,
    unwrap_model,
    world_size,
    wrap_ddp,
)
from seg_pipeline.training.ema import ModelEMA
from seg_pipeline.training.optim import scheduler_interval
from seg_pipeline.training.precision import PrecisionPolicy
from seg_pipeline.training.progress import ProgressLogger, default_log_fn, format_duration
from seg_pipeline.training.reproducibility import (
    capture_rng_state,
    restore_rng_state,
    run_manifest,
    seed_everything,
)

Batch = dict[str, Any]
EvaluateFn = Callable[[nn.Module, Any], Mapping[str, float]]
EpochEndFn = Callable[[int, dict[str, float]], None]
CHECKPOINT_FORMAT_VERSION = 1


class Objective(Protocol):
    """``objective(model, batch, epoch) -> (loss, parts)``: scalar loss and detached per-term values."""

    def __call__(
        self, model: nn.Module, batch: Batch, epoch: int
    ) -> tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]: ...


class SupervisedObjective:
    """Plain supervised objective: ``loss_fn(model(batch["image"]), batch["mask"])``.

    If ``loss_fn`` has a ``last_parts`` dict (e.g. ``{"ce": .., "dice": ..}`` from a combined loss),
    it is merged into the logs as ``train/<term>``.
    """

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        image_key: str = "image",
        target_key: str = "mask",
    ) -> None:
        self.loss_fn = loss_fn
        self.image_key = image_key
        self.target_key = target_key

    def __call__(
        self, model: nn.Module, batch: Batch, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        logits = model(batch[self.image_key])
        loss = self.loss_fn(logits, batch[self.target_key])
        parts = getattr(self.loss_fn, "last_parts", None) or {}
        return loss, {
            name: value.detach() if isinstance(value, torch.Tensor) else value
            for name, value in parts.items()
        }


@dataclass
class TrainConfig:
    """Loop settings; optimizer/scheduler hyper-parameters live with ``build_optimizer``/``build_scheduler``.

    Attributes:
        epochs: total epochs (a resumed run continues up to this number).
        grad_accum_steps: micro-batches per optimizer step.
        clip_grad_norm: max global gradient L2 norm, None disables clipping.
        ema_decay: EMA decay for evaluation weights, None disables EMA.
        ema_warmup: ramp the EMA decay up as ``(1 + n) / (10 + n)``.
        monitor: log key that selects best checkpoints, plateau steps and early stopping; evaluation
            keys without a ``/`` get a ``val/`` prefix (``miou`` -> ``val/miou``).
        mode: ``max`` or ``min`` for ``monitor``.
        early_stopping_patience: epochs without improvement before stopping, None disables.
        save_every: period of ``epoch-N.pt`` snapshots, 0 disables.
        log_every_n_steps: progress line period in optimizer steps, 0 disables.
        device: ``auto|cuda|mps|cpu``.
        amp: None = policy default (CUDA on, MPS off, CPU off); True on CPU = bf16 autocast.
        channels_last: None = policy default.
        seed: seeds python/numpy/torch at the start of ``fit`` (plus the DDP rank).
        deterministic: deterministic kernels (slower).
        max_steps_per_epoch: cap on optimizer steps per epoch (smoke runs, very large datasets).
    """

    epochs: int = 20
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = 1.0
    ema_decay: float | None = 0.999
    ema_warmup: bool = True
    monitor: str = "val/miou"
    mode: str = "max"
    early_stopping_patience: int | None = 10
    save_every: int = 5
    log_every_n_steps: int = 20
    device: str = "auto"
    amp: bool | None = None
    channels_last: bool | None = None
    seed: int = 42
    deterministic: bool = False
    max_steps_per_epoch: int | None = None

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the first bad field; returns ``self`` for chaining."""

        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(
                    f"TrainConfig.{name}={value!r} is invalid: it must be an integer >= {minimum}."
                )

        positive_int("epochs", self.epochs)
        positive_int("grad_accum_steps", self.grad_accum_steps)
        positive_int("save_every", self.save_every, minimum=0)
        positive_int("log_every_n_steps", self.log_every_n_steps, minimum=0)
        if self.early_stopping_patience is not None:
            positive_int("early_stopping_patience", self.early_stopping_patience)
        if self.max_steps_per_epoch is not None:
            positive_int("max_steps_per_epoch", self.max_steps_per_epoch)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32 - 1024:
            raise ValueError(f"TrainConfig.seed={self.seed!r} must be an integer in [0, 2**32 - 1024).")
        if self.clip_grad_norm is not None and not (
            isinstance(self.clip_grad_norm, int | float)
            and math.isfinite(self.clip_grad_norm)
            and self.clip_grad_norm > 0
        ):
            raise ValueError(
                f"TrainConfig.clip_grad_norm={self.clip_grad_norm!r} must be > 0, or None to disable."
            )
        if self.ema_decay is not None and not (
            isinstance(self.ema_decay, int | float) and 0.0 <= self.ema_decay < 1.0
        ):
            raise ValueError(
                f"TrainConfig.ema_decay={self.ema_decay!r} must be in [0, 1), or None to disable EMA."
            )
        if self.mode not in ("max", "min"):
            raise ValueError(f"TrainConfig.mode={self.mode!r} must be 'max' or 'min'.")
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(
                f"TrainConfig.monitor={self.monitor!r} must be a metric name such as 'val/miou'."
            )
        if self.device.split(":")[0] not in ("auto", "cuda", "mps", "cpu"):
            raise ValueError(f"TrainConfig.device={self.device!r} must be one of auto, cuda, mps, cpu.")
        for name in ("amp", "channels_last"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(
                    f"TrainConfig.{name}={value!r} must be True, False or None (policy default)."
                )
        return self

    @property
    def monitor_key(self) -> str:
        """``monitor`` as it appears in the epoch logs (``miou`` -> ``val/miou``)."""
        return self.monitor if "/" in self.monitor else f"val/{self.monitor}"

    def precision_policy(self) -> PrecisionPolicy:
        """The device/AMP/channels_last policy this config resolves to on this machine."""
        return PrecisionPolicy.for_device(self.device, self.amp, self.channels_last)


@dataclass
class FitResult:
    """Summary of a ``fit`` call (also filled on ranks > 0, where no files are written)."""

    best_score: float | None
    best_epoch: int | None
    epochs_run: int
    start_epoch: int
    stopped_early: bool
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    final_checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    wall_time_s: float = 0.0
    images_per_s: float = 0.0
    device: str = "cpu"
    precision: str = ""


def optimizer_steps_per_epoch(
    num_batches: int, grad_accum_steps: int = 1, max_steps_per_epoch: int | None = None
) -> int:
    """Optimizer steps in one epoch of ``num_batches`` micro-batches (for ``build_scheduler``)."""
    steps = math.ceil(num_batches / grad_accum_steps)
    return min(steps, max_steps_per_epoch) if max_steps_per_epoch else steps


def _loader_length(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _set_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch`` on the sampler/dataset (DistributedSampler and epoch-aware datasets reshuffle)."""
    for owner in (
        getattr(loader, "sampler", None),
        getattr(loader, "batch_sampler", None),
        getattr(loader, "dataset", None),
    ):
        set_epoch = getattr(owner, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


def _move_batch(batch: Mapping[str, Any], policy: PrecisionPolicy) -> Batch:
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"train_loader yielded a {type(batch).__name__}; batches must be dicts with 'image' and "
            "'mask' tensors."
        )
    return {
        key: policy.prepare_tensor(value) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def _batch_size(batch: Batch) -> int:
    image = batch.get("image")
    if isinstance(image, torch.Tensor):
        return int(image.shape[0])
    first = next((value for value in batch.values() if isinstance(value, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None else 1


def _base_lr(optimizer: torch.optim.Optimizer) -> float:
    group = optimizer.param_groups[0]
    return float(group["lr"]) / float(group.get("lr_mult", 1.0))


class _EpochStats:
    """Running sums of loss and terms weighted by batch size, kept on the device (no per-step sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.part_sums: dict[str, torch.Tensor] = {}
        self.images = 0

    def add(self, loss: torch.Tensor, parts: Mapping[str, float | torch.Tensor], batch_size: int) -> None:
        self.loss_sum += loss.detach().float() * batch_size
        for name, value in parts.items():
            if name == "loss":
                continue
            tensor = (
                value.detach().float().to(self.device) if isinstance(value, torch.Tensor) else float(value)
            )
            self.part_sums[name] = (
                self.part_sums.get(name, torch.zeros((), device=self.device)) + tensor * batch_size
            )
        self.images += batch_size

    def reduce(self) -> dict[str, float]:
        """Average over all images of all ranks."""
        names = sorted(self.part_sums)
        images = torch.tensor(float(self.images), device=self.device)
        packed = torch.stack([self.loss_sum, *(self.part_sums[name] for name in names), images])
        if self.device.type != "mps":  # MPS has no float64; elsewhere sum image counts exactly
            packed = packed.double()
        all_reduce_sum(packed)
        values = packed.cpu().tolist()
        count = max(values[-1], 1.0)
        logs = {"train/loss": values[0] / count}
        logs.update({f"train/{name}": values[1 + i] / count for i, name in enumerate(names)})
        logs["train/images"] = values[-1]
        return logs


class _Trainer:
    """State of one ``fit`` call; split into methods so each piece stays readable."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        config: TrainConfig,
        policy: PrecisionPolicy,
        manager: CheckpointManager,
        log_fn: Callable[[str], None],
    ) -> None:
        self.config = config
        self.policy = policy
        self.objective = objective
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.interval = scheduler_interval(scheduler)
        self.manager = manager
        self.log = log_fn if is_main_process() else (lambda _line: None)
        self.bare_model = policy.prepare_model(unwrap_model(model))
        self.model = wrap_ddp(self.bare_model, policy.device)
        self.is_ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.scaler = policy.make_grad_scaler()
        self.ema = (
            ModelEMA(self.bare_model, config.ema_decay, config.ema_warmup)
            if config.ema_decay is not None
            else None
        )
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.stopped_early = False
        self.train_images = 0
        self.train_seconds = 0.0
        self._grads_not_synced = False

    # ----- one epoch of training -------------------------------------------------------------
    def _optimizer_step(self, pending: int) -> None:
        accum = self.config.grad_accum_steps
        if self.is_ddp and pending < accum and self._grads_not_synced:
            for param in self.params:
                if param.grad is not None:
                    all_reduce_sum(param.grad).div_(world_size())
        if pending < accum:  # epoch-end flush: losses were divided by `accum`, rescale to a true mean
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], accum / pending)
        if self.config.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.config.clip_grad_norm, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.bare_model)
        if self.interval == "step":
            self.scheduler.step()

    def train_epoch(self, loader: Iterable[Batch], epoch: int, progress: ProgressLogger) -> dict[str, float]:
        config = self.config
        accum = config.grad_accum_steps
        num_batches = _loader_length(loader)
        if self.is_ddp and num_batches is not None:  # every rank must agree on which batch closes a group
            num_batches = min_across_ranks(num_batches, self.policy.device)
        stats = _EpochStats(self.policy.device)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        pending = 0
        epoch_step = 0
        window_loss = torch.zeros((), device=self.policy.device)
        window_images = 0
        self._grads_not_synced = False
        started = time.perf_counter()
        batches = in_lockstep(loader, self.policy.device) if self.is_ddp else loader
        for batch_index, raw_batch in enumerate(batches):
            batch = _move_batch(raw_batch, self.policy)
            batch_size = _batch_size(batch)
            closes_group = pending + 1 == accum or (
                num_batches is not None and batch_index + 1 == num_batches
            )
            sync = contextlib.nullcontext() if (closes_group or not self.is_ddp) else self.model.no_sync()
            with sync:
                with self.policy.autocast_context():
                    loss, parts = self.objective(self.model, batch, epoch)
                if loss.dim() != 0:
                    raise ValueError(
                        f"objective returned a loss of shape {tuple(loss.shape)}; it must be a scalar."
                    )
                self.scaler.scale(loss / accum).backward()
            self._grads_not_synced = not closes_group
            pending += 1
            stats.add(loss, parts, batch_size)
            window_loss += loss.detach().float()
            window_images += batch_size
            if pending == accum:
                self._optimizer_step(pending)
                pending = 0
                epoch_step += 1
                progress.step(epoch, epoch_step, window_loss / accum, window_images)
                window_loss = torch.zeros((), device=self.policy.device)
                window_images = 0
                if config.max_steps_per_epoch and epoch_step >= config.max_steps_per_epoch:
                    break
        if pending:
            self._optimizer_step(pending)
            epoch_step += 1
            progress.step(epoch, epoch_step, window_loss / pending, window_images)
        if stats.images == 0:
            raise ValueError(
                f"train_loader yielded no batches in epoch {epoch}; check the dataset and batch size."
            )
        logs = stats.reduce()
        seconds = time.perf_counter() - started
        self.train_images += int(logs["train/images"])
        self.train_seconds += seconds
        logs["train/images_per_s"] = logs["train/images"] / max(seconds, 1e-9)
        logs["train/steps"] = float(epoch_step)
        if not math.isfinite(logs["train/loss"]):
            raise FloatingPointError(
                f"train/loss is {logs['train/loss']} in epoch {epoch}: lower the learning rate, enable "
                "clip_grad_norm, or check the inputs for NaN pixels."
            )
        return logs

    # ----- validation --------------------------------------------------------------------------
    def evaluate(self, evaluate_fn: EvaluateFn | None, val_loader: Any) -> dict[str, float]:
        """Run ``evaluate_fn`` on rank 0 with EMA weights applied; broadcast the metrics to all ranks."""
        if evaluate_fn is None:
            return {}
        metrics: dict[str, float] | None = None
        if is_main_process():
            self.bare_model.eval()
            swap = self.ema.apply_to(self.bare_model) if self.ema is not None else contextlib.nullcontext()
            try:
                with swap, torch.no_grad(), self.policy.autocast_context():
                    raw = evaluate_fn(self.bare_model, val_loader)
            finally:
                self.bare_model.train()
            metrics = {
                (key if "/" in key else f"val/{key}"): float(value) for key, value in dict(raw).items()
            }
        return broadcast_object(metrics)

    # ----- checkpoint state -----------------------------------------------------------------
    def state(
        self, epoch: int, logs: Mapping[str, float], model_spec: Any, run_config: Any
    ) -> dict[str, Any]:
        rng_states = all_gather_object(capture_rng_state())
        manager_state = self.manager.state_dict()
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "model": self.bare_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": epoch,
            "global_step": self.global_step,
            "best_score": manager_state["best_score"],
            "best_epoch": manager_state["best_epoch"],
            "epochs_without_improvement": manager_state["epochs_without_improvement"],
            "checkpoint_manager": manager_state,
            "stopped_early": self.stopped_early,
            "rng": rng_states,
            "world_size": world_size(),
            "model_spec": dict(model_spec or {}),
            "config": {"train": dataclasses.asdict(self.config), "run": dict(run_config or {})},
            "metrics": dict(logs),
            "history": list(self.history),
        }

    def restore(self, path: Path) -> int:
        """Load a checkpoint written by ``state``; returns the last completed epoch."""
        state = load_checkpoint(path, map_location="cpu")
        if state.get("format_version") != CHECKPOINT_FORMAT_VERSION or "optimizer" not in state:
            raise CheckpointError(
                f"{path} is not a resumable training checkpoint (no optimizer/format_version)."
            )
        check_state_dict_compatible(self.bare_model, state["model"], path)
        self.bare_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            if state.get("scheduler") is None:
                raise CheckpointError(
                    f"{path} has no scheduler state but this run uses a scheduler; use resume=False."
                )
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state.get("scaler") or {})
        if self.ema is not None:
            if state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            else:  # EMA newly enabled: start it from the restored weights
                self.ema = ModelEMA(self.bare_model, self.config.ema_decay or 0.0, self.config.ema_warmup)
        self.manager.load_state_dict(state["checkpoint_manager"])
        self.global_step = int(state["global_step"])
        self.history = list(state.get("history") or [])
        self.stopped_early = bool(state.get("stopped_early", False))
        rng_states = state.get("rng") or []
        if rng_states:
            own = rng_states[rank()] if len(rng_states) == world_size() else rng_states[0]
            restore_rng_state(own)
        return int(state["epoch"])


def _resolve_resume_path(resume: bool | str | Path, manager: CheckpointManager) -> Path | None:
    if resume is False or resume is None:
        return None
    if resume is True:
        return manager.last_path if manager.last_path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise ValueError(
            f"resume={str(resume)!r} does not exist; pass True (use last.pt if present) or False."
        )
    return path


def fit(
    model: nn.Module,
    objective: Objective,
    train_loader: Iterable[Batch],
    val_loader: Any,
    evaluate_fn: EvaluateFn | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: TrainConfig,
    checkpoint_dir: str | Path,
    resume: bool | str | Path = True,
    on_epoch_end: EpochEndFn | None = None,
    model_spec: Mapping[str, Any] | None = None,
    run_config: Mapping[str, Any] | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> FitResult:
    """Train ``model`` for ``config.epochs`` epochs, validating, checkpointing and early-stopping.

    Args:
        model: bare model (moved to the policy's device/memory format in place; wrapped in DDP when a
            process group with more than one rank is initialised).
        objective: ``objective(model, batch, epoch) -> (loss, parts)``, e.g. :class:`SupervisedObjective`.
        train_loader: yields dict batches (``image``, ``mask``, ``item_id``, ...); partitioned per rank.
        val_loader: passed through to ``evaluate_fn`` on rank 0.
        evaluate_fn: ``evaluate_fn(model, val_loader) -> metrics`` run under ``torch.no_grad`` and the
            AMP policy with the EMA weights applied; None skips validation (monitor a train key then).
        optimizer: built on ``model``'s parameters (e.g. ``build_optimizer``).
        scheduler: from ``build_scheduler`` (or any torch scheduler; see ``scheduler_interval``), or None.
        config: loop settings.
        checkpoint_dir: receives ``last.pt``, ``best.pt``, ``epoch-NNNN.pt``, ``final.pt`` and
            ``run_manifest.json``.
        resume: True continues from ``checkpoint_dir/last.pt`` when it exists; a path resumes from that
            file; False starts fresh (overwriting files).
        on_epoch_end: ``on_epoch_end(epoch, logs)`` on rank 0 after each epoch's checkpoint is written.
        model_spec: plain dict describing the architecture, stored in every checkpoint.
        run_config: plain dict of the resolved run config, stored in checkpoints and the manifest.
        log_fn: sink for progress lines (default: ``seg_pipeline.training`` logger).
    """
    config.validate()
    started = time.perf_counter()
    log = log_fn or default_log_fn()
    policy = config.precision_policy()
    if is_initialized() and policy.device.type == "cuda" and policy.device.index is None:
        policy = dataclasses.replace(policy, device=torch.device("cuda", torch.cuda.current_device()))
    seed_everything(config.seed + rank(), config.deterministic)
    monitor = config.monitor_key
    manager = CheckpointManager(checkpoint_dir, monitor, config.mode, config.save_every)
    trainer = _Trainer(model, objective, optimizer, scheduler, config, policy, manager, log)
    main = is_main_process()
    if main:
        for stale in sweep_stale_temps(checkpoint_dir):
            trainer.log(
                f"removed {stale.name}: a temp file of a killed writer (the checkpoint it held never landed)"
            )

    last_done = 0
    resume_path = _resolve_resume_path(resume, manager)
    if resume_path is not None:
        barrier()
        last_done = trainer.restore(resume_path)
        trainer.log(f"resumed from {resume_path} (epoch {last_done}, step {trainer.global_step})")
    start_epoch = last_done + 1
    if main:
        manifest = run_manifest(
            {
                "train": dataclasses.asdict(config),
                "run": dict(run_config or {}),
                "model_spec": dict(model_spec or {}),
                "precision": policy.describe(),
                "world_size": world_size(),
                "resumed_from_epoch": last_done,
            }
        )
        write_json(Path(checkpoint_dir) / "run_manifest.json", manifest)
    trainer.log(
        f"training on {policy.describe()} | world size {world_size()} | epochs {start_epoch}..{config.epochs}"
    )

    num_batches = _loader_length(train_loader)
    steps_per_epoch = (
        optimizer_steps_per_epoch(num_batches, config.grad_accum_steps, config.max_steps_per_epoch)
        if num_batches is not None
        else None
    )
    remaining_epochs = max(0, config.epochs - start_epoch + 1) if not trainer.stopped_early else 0
    progress = ProgressLogger(
        total_steps=remaining_epochs * (steps_per_epoch or 0),
        every_n_steps=config.log_every_n_steps,
        log_fn=trainer.log,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
    )
    epoch = last_done
    logs: dict[str, float] = trainer.history[-1] if trainer.history else {}
    for epoch in range(start_epoch, start_epoch + remaining_epochs):
        epoch_started = time.perf_counter()
        _set_epoch(train_loader, epoch)
        logs = trainer.train_epoch(train_loader, epoch, progress)
        logs["lr"] = _base_lr(optimizer)
        logs.update(trainer.evaluate(evaluate_fn, val_loader))
        if monitor not in logs:
            raise ValueError(
                f"TrainConfig.monitor={monitor!r} is not among the epoch logs {sorted(logs)}; "
                "return it from evaluate_fn or monitor a train key such as 'train/loss' (mode='min')."
            )
        score = logs[monitor]
        improved = manager.update(score, epoch)
        if trainer.interval == "epoch":
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(score)
            else:
                scheduler.step()
        patience = config.early_stopping_patience
        trainer.stopped_early = patience is not None and manager.epochs_without_improvement >= patience
        logs["epoch"] = float(epoch)
        logs["epoch_time_s"] = time.perf_counter() - epoch_started
        trainer.history.append(dict(logs))
        state = trainer.state(epoch, logs, model_spec, run_config)
        if main:
            manager.save_epoch(state, epoch, improved)
            if on_epoch_end is not None:
                on_epoch_end(epoch, dict(logs))
        best_text = "none" if manager.best_score is None else f"{manager.best_score:.4f}"
        trainer.log(
            f"epoch {epoch}/{config.epochs} done in {format_duration(logs['epoch_time_s'])} | "
            f"train/loss {logs['train/loss']:.4f} | {monitor} {score:.4f} "
            f"(best {best_text} @ epoch {manager.best_epoch}) | lr {logs['lr']:.3g}"
            + (" | new best" if improved else "")
        )
        if trainer.stopped_early:
            trainer.log(f"early stopping: {monitor} did not improve for {patience} epochs")
            break

    if remaining_epochs > 0:
        final_state = trainer.state(epoch, logs, model_spec, run_config)  # collective: every rank builds it
        if main:
            manager.save_final(final_state)
    elif main and manager.last_path.is_file() and not manager.final_path.is_file():
        link_or_copy(manager.last_path, manager.final_path)
    barrier()
    return FitResult(
        best_score=manager.best_score,
        best_epoch=manager.best_epoch,
        epochs_run=epoch,
        start_epoch=start_epoch,
        stopped_early=trainer.stopped_early,
        best_checkpoint=manager.best_path if manager.best_epoch is not None else None,
        last_checkpoint=manager.last_path if epoch > 0 else None,
        final_checkpoint=manager.final_path if epoch > 0 else None,
        history=trainer.history,
        wall_time_s=time.perf_counter() - started,
        images_per_s=trainer.train_images / trainer.train_seconds if trainer.train_seconds else 0.0,
        device=str(policy.device),
        precision=policy.describe(),
    )
