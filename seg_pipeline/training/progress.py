"""Per-N-steps progress lines with throughput and ETA (F31 in docs/architecture.md).

The running loss is kept as a tensor and only turned into a Python float when a line is printed,
so on CUDA the loop does not synchronise with the GPU on every step. ``format_duration`` lives in
:mod:`seg_pipeline.progress` (shared with the item progress of the other long steps) and is
re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from seg_pipeline.progress import default_log_fn as _package_log_fn
from seg_pipeline.progress import format_duration

__all__ = ["LOGGER_NAME", "ProgressLogger", "default_log_fn", "format_duration"]

LOGGER_NAME = "seg_pipeline.training"


def default_log_fn() -> Callable[[str], None]:
    """``logging.getLogger("seg_pipeline.training").info`` (a child of the package logger)."""
    return _package_log_fn(LOGGER_NAME)


class ProgressLogger:
    """Logs ``epoch e/E step s/S loss x | n img/s | elapsed .. | eta ..`` every ``every_n_steps`` steps.

    Args:
        total_steps: optimizer steps of the whole run still to do in this process (drives the ETA).
        every_n_steps: period of the log line in optimizer steps; 0 disables step lines.
        log_fn: sink for the lines (default: the ``seg_pipeline.training`` logger at INFO).
        epochs: total epochs, shown as ``epoch e/E``.
        steps_per_epoch: optimizer steps per epoch, shown as ``step s/S``.
        clock: time source (injectable for tests).
    """

    def __init__(
        self,
        total_steps: int,
        every_n_steps: int = 20,
        log_fn: Callable[[str], None] | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be >= 0 (0 disables step logging).")
        self.total_steps = max(0, int(total_steps))
        self.every_n_steps = int(every_n_steps)
        self.log_fn = log_fn or default_log_fn()
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.clock = clock
        self.start_time = clock()
        self.steps_done = 0
        self.images_done = 0
        self._window_start = self.start_time
        self._window_images = 0
        self._window_loss: torch.Tensor | float = 0.0
        self._window_steps = 0

    def elapsed(self) -> float:
        """Seconds since the logger was created."""
        return self.clock() - self.start_time

    def eta(self) -> float | None:
        """Seconds left at the average pace so far (None before the first step)."""
        if self.steps_done == 0:
            return None
        remaining = max(0, self.total_steps - self.steps_done)
        return self.elapsed() / self.steps_done * remaining

    def step(self, epoch: int, epoch_step: int, loss: torch.Tensor | float, images: int) -> str | None:
        """Record one optimizer step; returns (and logs) the line when one is due."""
        self.steps_done += 1
        self.images_done += images
        self._window_images += images
        self._window_steps += 1
        detached = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)
        self._window_loss = self._window_loss + detached
        if not self.every_n_steps or self.steps_done % self.every_n_steps:
            return None
        now = self.clock()
        window_s = max(now - self._window_start, 1e-9)
        mean_loss = float(self._window_loss) / self._window_steps
        line = self.format_line(epoch, epoch_step, mean_loss, self._window_images / window_s)
        self._window_start, self._window_images, self._window_loss, self._window_steps = now, 0, 0.0, 0
        self.log_fn(line)
        return line

    def format_line(self, epoch: int, epoch_step: int, loss: float, images_per_s: float) -> str:
        """Build the human-readable progress line."""
        epoch_part = f"epoch {epoch}/{self.epochs}" if self.epochs else f"epoch {epoch}"
        step_part = (
            f"step {epoch_step}/{self.steps_per_epoch}" if self.steps_per_epoch else f"step {epoch_step}"
        )
        eta = self.eta()
        eta_part = format_duration(eta) if eta is not None else "?"
        return (
            f"{epoch_part} {step_part} loss {loss:.3f} | {images_per_s:.1f} img/s | "
            f"elapsed {format_duration(self.elapsed())} | eta {eta_part}"
        )
