"""One epoch of optimisation: forward, backward, accumulation, clipping, EMA, per-step scheduling, DDP.

:class:`EpochRunner` holds the pieces every step needs (model, objective, optimizer, scaler, EMA) and
runs one pass over a loader. Losses and terms are summed on the device and reduced once per epoch, so
no step waits on a device-to-host sync; under DDP gradients of an accumulation group are synced once.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import nn

from seg_pipeline.settings import LoopSettings
from seg_pipeline.training.distributed import all_reduce_sum, in_lockstep, min_across_ranks, world_size
from seg_pipeline.training.ema import ModelEMA
from seg_pipeline.training.objectives import Batch, Objective, batch_size, move_batch
from seg_pipeline.training.precision import PrecisionPolicy
from seg_pipeline.training.progress import ProgressLogger
from seg_pipeline.training.train_scores import TrainScores, scored_pair


def loader_length(loader: Iterable[Any]) -> int | None:
    """``len(loader)`` when it has one (iterable datasets may not)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def optimizer_steps_per_epoch(
    num_batches: int, grad_accum_steps: int = 1, max_steps_per_epoch: int | None = None
) -> int:
    """Optimizer steps in one epoch of ``num_batches`` micro-batches (for ``build_scheduler``)."""
    steps = math.ceil(num_batches / grad_accum_steps)
    return min(steps, max_steps_per_epoch) if max_steps_per_epoch else steps


class _Waited:
    """Iterates a loader and adds up the seconds spent waiting for its next batch.

    Their share of the epoch (``train/data_wait_fraction``) says whether training is input-bound:
    near 0 the model is the bottleneck, near 1 the loader is (add workers or the tile cache).
    """

    def __init__(self, batches: Iterable[Batch]) -> None:
        self.batches = batches
        self.seconds = 0.0

    def __iter__(self) -> Iterator[Batch]:
        iterator = iter(self.batches)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - started
            yield batch


class EpochStats:
    """Running sums of loss and terms weighted by batch size, kept on the device (no per-step sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.part_sums: dict[str, torch.Tensor] = {}
        self.images = 0

    def add(self, loss: torch.Tensor, parts: Mapping[str, float | torch.Tensor], size: int) -> None:
        """Add one micro-batch of ``size`` samples."""
        self.loss_sum += loss.detach().float() * size
        for name, value in parts.items():
            if name == "loss":
                continue
            tensor = (
                value.detach().float().to(self.device) if isinstance(value, torch.Tensor) else float(value)
            )
            self.part_sums[name] = (
                self.part_sums.get(name, torch.zeros((), device=self.device)) + tensor * size
            )
        self.images += size

    def reduce(self) -> dict[str, float]:
        """Averages over all images of all ranks (``train/loss``, ``train/<term>``, ``train/images``)."""
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


class EpochRunner:
    """The optimisation state shared by every step of a run."""

    def __init__(
        self,
        model: nn.Module,
        bare_model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        interval: str | None,
        settings: LoopSettings,
        policy: PrecisionPolicy,
        ema: ModelEMA | None,
    ) -> None:
        self.model = model
        self.bare_model = bare_model
        self.objective = objective
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.interval = interval
        self.settings = settings
        self.policy = policy
        self.ema = ema
        self.is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.scaler = policy.make_grad_scaler()
        self.global_step = 0
        self.train_images = 0
        self.train_seconds = 0.0
        self._grads_not_synced = False

    def optimizer_step(self, pending: int) -> None:
        """Close an accumulation group of ``pending`` micro-batches: sync, rescale, clip, step, EMA."""
        accum = self.settings.grad_accum_steps
        if self.is_ddp and pending < accum and self._grads_not_synced:
            for param in self.params:
                if param.grad is not None:
                    all_reduce_sum(param.grad).div_(world_size())
        if pending < accum:  # epoch-end flush: losses were divided by `accum`, rescale to a true mean
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], accum / pending)
        if self.settings.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.settings.clip_grad_norm, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.bare_model)
        if self.interval == "step":
            self.scheduler.step()

    def _micro_step(
        self, batch: Batch, epoch: int, closes_group: bool
    ) -> tuple[torch.Tensor, Mapping[str, Any]]:
        if closes_group or not self.is_ddp:
            sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        else:  # is_ddp: the model is the DDP wrapper
            sync = cast(nn.parallel.DistributedDataParallel, self.model).no_sync()
        with sync:
            with self.policy.autocast_context():
                loss, parts = self.objective(self.model, batch, epoch)
            if loss.dim() != 0:
                raise ValueError(
                    f"objective returned a loss of shape {tuple(loss.shape)}; it must be a scalar."
                )
            self.scaler.scale(loss / self.settings.grad_accum_steps).backward()
        self._grads_not_synced = not closes_group
        return loss, parts

    def run_epoch(self, loader: Iterable[Batch], epoch: int, progress: ProgressLogger) -> dict[str, float]:
        """One pass over ``loader``; returns the epoch's training logs."""
        accum = self.settings.grad_accum_steps
        num_batches = loader_length(loader)
        if self.is_ddp and num_batches is not None:  # every rank must agree on which batch closes a group
            num_batches = min_across_ranks(num_batches, self.policy.device)
        stats = EpochStats(self.policy.device)
        scores = TrainScores(self.policy.device) if self.settings.train_metrics else None
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        pending = epoch_step = window_images = 0
        window_loss = torch.zeros((), device=self.policy.device)
        self._grads_not_synced = False
        started = time.perf_counter()
        batches = in_lockstep(loader, self.policy.device) if self.is_ddp else loader
        waited = _Waited(batches)
        for index, raw_batch in enumerate(waited):
            batch = move_batch(raw_batch, self.policy)
            size = batch_size(batch)
            closes = pending + 1 == accum or (num_batches is not None and index + 1 == num_batches)
            loss, parts = self._micro_step(batch, epoch, closes)
            pending += 1
            stats.add(loss, parts, size)
            if scores is not None and (pair := scored_pair(self.objective)) is not None:
                scores.add(*pair)
            window_loss += loss.detach().float()
            window_images += size
            if pending == accum:
                self.optimizer_step(pending)
                epoch_step += 1
                progress.step(epoch, epoch_step, window_loss / accum, window_images)
                pending, window_images = 0, 0
                window_loss = torch.zeros((), device=self.policy.device)
                if self.settings.max_steps_per_epoch and epoch_step >= self.settings.max_steps_per_epoch:
                    break
        if pending:
            self.optimizer_step(pending)
            epoch_step += 1
            progress.step(epoch, epoch_step, window_loss / pending, window_images)
        logs = self._epoch_logs(stats, epoch, epoch_step, time.perf_counter() - started, waited.seconds)
        if scores is not None:
            logs.update(scores.reduce())
        return logs

    def _epoch_logs(
        self, stats: EpochStats, epoch: int, steps: int, seconds: float, waited: float
    ) -> dict[str, float]:
        if stats.images == 0:
            raise ValueError(
                f"train_loader yielded no batches in epoch {epoch}; check the dataset and batch size."
            )
        logs = stats.reduce()
        self.train_images += int(logs["train/images"])
        self.train_seconds += seconds
        logs["train/images_per_s"] = logs["train/images"] / max(seconds, 1e-9)
        logs["train/steps"] = float(steps)
        logs["train/data_wait_fraction"] = waited / max(seconds, 1e-9)
        if not math.isfinite(logs["train/loss"]):
            raise FloatingPointError(
                f"train/loss is {logs['train/loss']} in epoch {epoch}: lower the learning rate, enable "
                "clip_grad_norm, or check the inputs for NaN pixels."
            )
        return logs
