"""The training loop: :class:`Trainer` runs epochs of an objective (F12-F16).

It validates, checkpoints, stops early, resumes and runs under DDP.

A trainer is built from its parts (model, objective, optimizer, scheduler, loop settings, checkpoint
folder) and hooks (``on_epoch_end``, ``log_fn``); :meth:`Trainer.fit` takes the data. The loop knows
nothing about losses or metrics: the objective turns a batch into a loss, ``evaluate_fn`` turns
``(model, loader)`` into metrics. Under DDP the loader partitions the data, DDP averages gradients,
epoch losses are all-reduced, validation runs on rank 0 (full validation set) and its metrics are
broadcast so every rank takes the same scheduling and early-stopping decisions; only rank 0 logs,
calls ``on_epoch_end`` and writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seg_pipeline.io import sweep_stale_temps, write_json
from seg_pipeline.models.checkpoint import link_or_copy
from seg_pipeline.settings import LoopSettings
from seg_pipeline.training.checkpoints import CheckpointManager
from seg_pipeline.training.distributed import (
    barrier,
    broadcast_object,
    is_initialized,
    is_main_process,
    rank,
    unwrap_model,
    world_size,
    wrap_ddp,
)
from seg_pipeline.training.ema import ModelEMA
from seg_pipeline.training.history import write_history_csv
from seg_pipeline.training.objectives import Batch, Objective
from seg_pipeline.training.optim import scheduler_interval
from seg_pipeline.training.precision import PrecisionPolicy
from seg_pipeline.training.progress import ProgressLogger, default_log_fn, format_duration
from seg_pipeline.training.reproducibility import run_manifest, seed_everything
from seg_pipeline.training.resume import restore_training_state, training_state
from seg_pipeline.training.steps import EpochRunner, loader_length, optimizer_steps_per_epoch

EvaluateFn = Callable[[nn.Module, Any], Mapping[str, float]]
EpochEndFn = Callable[[int, dict[str, float]], None]


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


def precision_policy(settings: LoopSettings) -> PrecisionPolicy:
    """The device/AMP/channels_last policy ``settings`` resolve to on this machine (DDP: this rank's GPU)."""
    policy = PrecisionPolicy.for_device(settings.device, settings.amp, settings.channels_last)
    if is_initialized() and policy.device.type == "cuda" and policy.device.index is None:
        policy = dataclasses.replace(policy, device=torch.device("cuda", torch.cuda.current_device()))
    return policy


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


def _base_lr(optimizer: torch.optim.Optimizer) -> float:
    group = optimizer.param_groups[0]
    return float(group["lr"]) / float(group.get("lr_mult", 1.0))


def memory_logs(device: torch.device) -> dict[str, float]:
    """Memory use for the epoch logs (``loop.log_memory``): what an OOM would have run into.

    ``memory/peak_rss_mb``: this process's peak RSS since it started (loader workers not counted);
    on CUDA ``memory/cuda_max_allocated_mb``: the peak since the last ``reset_peak_memory_stats``.
    """
    logs: dict[str, float] = {}
    try:
        import resource  # POSIX only
    except ImportError:
        pass
    else:  # ru_maxrss is in KiB on Linux, in bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        logs["memory/peak_rss_mb"] = peak / (2**20 if sys.platform == "darwin" else 2**10)
    if device.type == "cuda":
        logs["memory/cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return logs


class Trainer:
    """Fit ``model`` with ``objective`` under ``settings``, writing checkpoints to ``checkpoint_dir``.

    Args:
        model: Bare model (moved to the policy's device and memory format in place; wrapped in DDP
            when a process group of more than one rank is initialised).
        objective: ``objective(model, batch, epoch) -> (loss, parts)``.
        optimizer: Built on ``model``'s parameters (``build_optimizer``).
        scheduler: From ``build_scheduler`` (or any torch scheduler), or None.
        settings: Loop settings.
        checkpoint_dir: Receives ``last.pt``, ``best.pt`` (and ``best-epoch-NNNN.pt`` with
            ``save_top_k > 1``), ``epoch-NNNN.pt``, ``final.pt`` and
            ``run_manifest.json``.
        model_spec: Plain dict describing the architecture, stored in every checkpoint.
        run_config: Plain dict of the resolved run config, stored in checkpoints and the manifest.
        on_epoch_end: Hook called on rank 0 as ``on_epoch_end(epoch, logs)`` after the epoch's checkpoint.
        log_fn: Sink for progress lines (default: the ``seg_pipeline.training`` logger).
        metrics_csv: Per-epoch history as CSV, rewritten each epoch (default ``checkpoint_dir/metrics.csv``).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        settings: LoopSettings,
        checkpoint_dir: str | Path,
        *,
        model_spec: Mapping[str, Any] | None = None,
        run_config: Mapping[str, Any] | None = None,
        on_epoch_end: EpochEndFn | None = None,
        log_fn: Callable[[str], None] | None = None,
        metrics_csv: str | Path | None = None,
    ) -> None:
        self.settings = settings
        self.checkpoint_dir = Path(checkpoint_dir)
        self.metrics_csv = Path(metrics_csv) if metrics_csv else self.checkpoint_dir / "metrics.csv"
        self.model_spec = dict(model_spec or {})
        self.run_config = dict(run_config or {})
        self.on_epoch_end = on_epoch_end
        self.main = is_main_process()
        log = log_fn or default_log_fn()
        self.log = log if self.main else (lambda _line: None)
        self.policy = precision_policy(settings)
        seed_everything(settings.seed + rank(), settings.deterministic)
        self.manager = CheckpointManager(
            self.checkpoint_dir,
            settings.monitor_key,
            settings.mode,
            settings.save_every,
            save_top_k=settings.save_top_k,
        )
        bare = self.policy.prepare_model(unwrap_model(model))
        ema = (
            ModelEMA(bare, settings.ema_decay, settings.ema_warmup)
            if settings.ema_decay is not None
            else None
        )
        self.runner = EpochRunner(
            wrap_ddp(bare, self.policy.device),
            bare,
            objective,
            optimizer,
            scheduler,
            scheduler_interval(scheduler),
            settings,
            self.policy,
            ema,
        )
        self.history: list[dict[str, float]] = []
        self.stopped_early = False

    # ----- setup -----------------------------------------------------------------------------
    def _resume_path(self, resume: bool | str | Path) -> Path | None:
        if resume is False or resume is None:
            return None
        if resume is True:
            return self.manager.last_path if self.manager.last_path.is_file() else None
        path = Path(resume)
        if not path.is_file():
            raise ValueError(
                f"resume={str(resume)!r} does not exist; pass True (use last.pt if present) or False."
            )
        return path

    def _start(self, resume: bool | str | Path) -> int:
        """Sweep dead writers' temps, resume when asked, write the run manifest; the last finished epoch."""
        if self.main:
            for stale in sweep_stale_temps(self.checkpoint_dir):
                self.log(
                    f"removed {stale.name}: a temp file of a killed writer (its checkpoint never landed)"
                )
        last_done = 0
        path = self._resume_path(resume)
        if path is not None:
            barrier()
            last_done, self.history, self.stopped_early = restore_training_state(
                self.runner, self.manager, path
            )
            self.log(f"resumed from {path} (epoch {last_done}, step {self.runner.global_step})")
        if self.main:
            manifest = run_manifest(
                {
                    "train": self.settings.model_dump(),
                    "run": self.run_config,
                    "model_spec": self.model_spec,
                    "precision": self.policy.describe(),
                    "world_size": world_size(),
                    "resumed_from_epoch": last_done,
                }
            )
            write_json(self.checkpoint_dir / "run_manifest.json", manifest)
        return last_done

    def _state(self, epoch: int, logs: Mapping[str, float]) -> dict[str, Any]:
        extra = {
            "model_spec": self.model_spec,
            "config": {"train": self.settings.model_dump(), "run": self.run_config},
        }
        return training_state(self.runner, self.manager, epoch, logs, self.history, self.stopped_early, extra)

    # ----- one epoch -------------------------------------------------------------------------
    def evaluate(self, evaluate_fn: EvaluateFn | None, val_loader: Any) -> dict[str, float]:
        """Run ``evaluate_fn`` on rank 0 with EMA weights applied; broadcast the metrics to all ranks."""
        if evaluate_fn is None:
            return {}
        metrics: dict[str, float] | None = None
        if self.main:
            model, ema = self.runner.bare_model, self.runner.ema
            model.eval()
            swap = ema.apply_to(model) if ema is not None else contextlib.nullcontext()
            try:
                with swap, torch.no_grad(), self.policy.autocast_context():
                    raw = evaluate_fn(model, val_loader)
            finally:
                model.train()
            metrics = {
                (key if "/" in key else f"val/{key}"): float(value) for key, value in dict(raw).items()
            }
        return broadcast_object(metrics)

    def _epoch(
        self, epoch: int, train_loader: Iterable[Batch], val_loader: Any, evaluate_fn: EvaluateFn | None,
        progress: ProgressLogger,
    ) -> dict[str, float]:  # fmt: skip
        started = time.perf_counter()
        track_cuda = self.settings.log_memory and self.policy.device.type == "cuda"
        if track_cuda:  # the logged CUDA peak is this epoch's (training and validation)
            torch.cuda.reset_peak_memory_stats(self.policy.device)
        _set_epoch(train_loader, epoch)
        logs = self.runner.run_epoch(train_loader, epoch, progress)
        logs["lr"] = _base_lr(self.runner.optimizer)
        logs.update(self.evaluate(evaluate_fn, val_loader))
        if self.settings.log_memory:
            logs.update(memory_logs(self.policy.device))
        monitor = self.settings.monitor_key
        if monitor not in logs:
            raise ValueError(
                f"loop.monitor={monitor!r} is not among the epoch logs {sorted(logs)}; "
                "return it from evaluate_fn or monitor a train key such as 'train/loss' (mode='min')."
            )
        improved = self.manager.update(logs[monitor], epoch)
        scheduler = self.runner.scheduler
        if self.runner.interval == "epoch":
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(logs[monitor])
            else:
                scheduler.step()
        patience = self.settings.early_stopping_patience
        self.stopped_early = patience is not None and self.manager.epochs_without_improvement >= patience
        logs["epoch"] = float(epoch)
        logs["epoch_time_s"] = time.perf_counter() - started
        self.history.append(dict(logs))
        state = self._state(epoch, logs)
        if self.main:
            self.manager.save_epoch(state, epoch, improved)
            write_history_csv(self.history, self.metrics_csv)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, dict(logs))
        self._log_epoch(epoch, logs, improved)
        return logs

    def _log_epoch(self, epoch: int, logs: Mapping[str, float], improved: bool) -> None:
        manager, monitor = self.manager, self.settings.monitor_key
        best = "none" if manager.best_score is None else f"{manager.best_score:.4f}"
        self.log(
            f"epoch {epoch}/{self.settings.epochs} done in {format_duration(logs['epoch_time_s'])} | "
            f"train/loss {logs['train/loss']:.4f} | {monitor} {logs[monitor]:.4f} "
            f"(best {best} @ epoch {manager.best_epoch}) | lr {logs['lr']:.3g} | "
            f"data wait {logs['train/data_wait_fraction']:.0%}"
            + "".join(
                f" | {label} {logs[key]:.0f} MB"
                for key, label in (
                    ("memory/peak_rss_mb", "peak rss"),
                    ("memory/cuda_max_allocated_mb", "cuda max allocated"),
                )
                if key in logs
            )
            + (" | new best" if improved else "")
        )
        if self.stopped_early:
            patience = self.settings.early_stopping_patience
            self.log(f"early stopping: {monitor} did not improve for {patience} epochs")

    # ----- the run ---------------------------------------------------------------------------
    def fit(
        self,
        train_loader: Iterable[Batch],
        val_loader: Any = None,
        evaluate_fn: EvaluateFn | None = None,
        resume: bool | str | Path = True,
    ) -> FitResult:
        """Train for ``settings.epochs`` epochs (continuing a resumed run), validating each epoch.

        ``resume``: True continues from ``last.pt`` when it exists, a path resumes from that file,
        False starts fresh (overwriting files). ``evaluate_fn=None`` skips validation (then monitor
        a train key such as ``train/loss`` with ``mode='min'``).
        """
        started = time.perf_counter()
        start_epoch = self._start(resume) + 1
        self.log(
            f"training on {self.policy.describe()} | world size {world_size()} | "
            f"epochs {start_epoch}..{self.settings.epochs}"
        )
        num_batches = loader_length(train_loader)
        steps = (
            optimizer_steps_per_epoch(
                num_batches, self.settings.grad_accum_steps, self.settings.max_steps_per_epoch
            )
            if num_batches is not None
            else None
        )
        remaining = max(0, self.settings.epochs - start_epoch + 1) if not self.stopped_early else 0
        progress = ProgressLogger(
            total_steps=remaining * (steps or 0),
            every_n_steps=self.settings.log_every_n_steps,
            log_fn=self.log,
            epochs=self.settings.epochs,
            steps_per_epoch=steps,
        )
        epoch = start_epoch - 1
        logs: dict[str, float] = self.history[-1] if self.history else {}
        for epoch in range(start_epoch, start_epoch + remaining):
            logs = self._epoch(epoch, train_loader, val_loader, evaluate_fn, progress)
            if self.stopped_early:
                break
        self._finish(epoch, logs, ran=remaining > 0)
        return self._result(epoch, start_epoch, time.perf_counter() - started)

    def _finish(self, epoch: int, logs: Mapping[str, float], ran: bool) -> None:
        manager = self.manager
        if ran:
            final_state = self._state(epoch, logs)  # collective: every rank builds it
            if self.main:
                manager.save_final(final_state)
        elif self.main and manager.last_path.is_file() and not manager.final_path.is_file():
            link_or_copy(manager.last_path, manager.final_path)
        barrier()

    def _result(self, epoch: int, start_epoch: int, seconds: float) -> FitResult:
        manager, runner = self.manager, self.runner
        return FitResult(
            best_score=manager.best_score,
            best_epoch=manager.best_epoch,
            epochs_run=epoch,
            start_epoch=start_epoch,
            stopped_early=self.stopped_early,
            best_checkpoint=manager.best_path if manager.best_epoch is not None else None,
            last_checkpoint=manager.last_path if epoch > 0 else None,
            final_checkpoint=manager.final_path if epoch > 0 else None,
            history=self.history,
            wall_time_s=seconds,
            images_per_s=runner.train_images / runner.train_seconds if runner.train_seconds else 0.0,
            device=str(self.policy.device),
            precision=self.policy.describe(),
        )


def fit(
    model: nn.Module,
    objective: Objective,
    train_loader: Iterable[Batch],
    val_loader: Any,
    evaluate_fn: EvaluateFn | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: LoopSettings,
    checkpoint_dir: str | Path,
    resume: bool | str | Path = True,
    on_epoch_end: EpochEndFn | None = None,
    model_spec: Mapping[str, Any] | None = None,
    run_config: Mapping[str, Any] | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> FitResult:
    """One call for the common case: build a :class:`Trainer` and fit it (see there for the arguments)."""
    trainer = Trainer(
        model,
        objective,
        optimizer,
        scheduler,
        config,
        checkpoint_dir,
        model_spec=model_spec,
        run_config=run_config,
        on_epoch_end=on_epoch_end,
        log_fn=log_fn,
    )
    return trainer.fit(train_loader, val_loader, evaluate_fn, resume=resume)
