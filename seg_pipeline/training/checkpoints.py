"""Which checkpoint files a training run writes after each epoch, and the best score so far (F14).

``last.pt`` every epoch (the full state, for resume), ``best.pt`` when the monitored metric improved,
with ``save_top_k > 1`` ``best-epoch-N.pt`` for each of the k best epochs (seed 001: a few good
candidates to compare or average, not only the single best), ``epoch-N.pt`` every ``save_every``
epochs and ``final.pt`` at the end (all but ``last.pt`` hold weights and EMA weights only:
Adam's moments would double their size, and nothing deployed needs them); the files go through
:mod:`seg_pipeline.models.checkpoint` (atomic, ``weights_only``-loadable).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seg_pipeline.models.checkpoint import CheckpointError, link_or_copy, save_checkpoint

#: What only resuming needs: optimizer moments (as large as the model again for Adam), scheduler,
#: loss scaler and RNG states. ``last.pt`` keeps them; the checkpoints people deploy do not.
RESUME_ONLY_KEYS = ("optimizer", "scheduler", "scaler", "rng")


def weights_only_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without :data:`RESUME_ONLY_KEYS`: weights, EMA weights, metrics, spec and config."""
    return {key: value for key, value in state.items() if key not in RESUME_ONLY_KEYS} | {
        "weights_only": True
    }


class CheckpointManager:
    """Decides which checkpoint files to write after each epoch and tracks the best score.

    Files in ``directory``: ``last.pt`` (every epoch), ``best.pt`` (monitored metric improved),
    ``best-epoch-{N:04d}.pt`` (``save_top_k > 1``: the k best epochs, the others deleted),
    ``epoch-{N:04d}.pt`` (every ``save_every`` epochs; 0 disables), ``final.pt`` (end of training).

    Args:
        directory: checkpoint folder (created on first save).
        monitor: metric name used for "best", e.g. ``val/miou``.
        mode: ``max`` or ``min``.
        save_every: period of the ``epoch-N`` snapshots in epochs.
        min_delta: an improvement must beat the best score by more than this (``best.pt`` only; the
            top-k ranking is by plain score, ties keep the earlier epoch).
        save_top_k: how many best epochs keep a ``best-epoch-N.pt``; 1 = ``best.pt`` alone.
    """

    def __init__(
        self,
        directory: str | Path,
        monitor: str = "val/miou",
        mode: str = "max",
        save_every: int = 5,
        min_delta: float = 0.0,
        save_top_k: int = 1,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r} must be 'max' or 'min'.")
        if not isinstance(save_every, int) or save_every < 0:
            raise ValueError(f"save_every={save_every!r} must be an integer >= 0 (0 disables epoch-N files).")
        if min_delta < 0:
            raise ValueError(f"min_delta={min_delta!r} must be >= 0.")
        if not isinstance(save_top_k, int) or save_top_k < 1:
            raise ValueError(f"save_top_k={save_top_k!r} must be an integer >= 1 (best.pt is always kept).")
        self.directory = Path(directory)
        self.monitor = monitor
        self.mode = mode
        self.save_every = save_every
        self.min_delta = float(min_delta)
        self.save_top_k = save_top_k
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.epochs_without_improvement = 0
        #: ``(score, epoch)`` of the best epochs, best first, at most ``save_top_k`` long.
        self.top_k: list[tuple[float, int]] = []

    @property
    def last_path(self) -> Path:
        """``last.pt``: written every epoch (what resume reads)."""
        return self.directory / "last.pt"

    @property
    def best_path(self) -> Path:
        """``best.pt``: the epoch with the best monitored score."""
        return self.directory / "best.pt"

    @property
    def final_path(self) -> Path:
        """``final.pt``: the state at the end of training."""
        return self.directory / "final.pt"

    def epoch_path(self, epoch: int) -> Path:
        """``epoch-NNNN.pt`` of ``epoch``."""
        return self.directory / f"epoch-{epoch:04d}.pt"

    def top_k_path(self, epoch: int) -> Path:
        """``best-epoch-NNNN.pt`` of ``epoch`` (named by epoch, not rank: ranks change, files do not)."""
        return self.directory / f"best-epoch-{epoch:04d}.pt"

    @property
    def top_k_paths(self) -> list[Path]:
        """The top-k files, best first (empty with ``save_top_k=1``: ``best.pt`` is the one)."""
        return [self.top_k_path(epoch) for _, epoch in self.top_k] if self.save_top_k > 1 else []

    def is_improvement(self, score: float) -> bool:
        """True when ``score`` beats the best so far (NaN never does)."""
        if score is None or not math.isfinite(score):
            return False
        if self.best_score is None:
            return True
        if self.mode == "max":
            return score > self.best_score + self.min_delta
        return score < self.best_score - self.min_delta

    def update(self, score: float, epoch: int) -> bool:
        """Record an epoch's score; returns whether it is a new best (resets the patience counter)."""
        improved = self.is_improvement(score)
        if improved:
            self.best_score = float(score)
            self.best_epoch = int(epoch)
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        if score is not None and math.isfinite(score):
            self.top_k = self._ranked([*self.top_k, (float(score), int(epoch))])
        return improved

    def _ranked(self, entries: list[tuple[float, int]]) -> list[tuple[float, int]]:
        """``entries`` best first (ties: earlier epoch first), cut to ``save_top_k``."""
        sign = -1.0 if self.mode == "max" else 1.0
        return sorted(entries, key=lambda entry: (sign * entry[0], entry[1]))[: self.save_top_k]

    def save_epoch(self, state: Mapping[str, Any], epoch: int, improved: bool) -> list[Path]:
        """Write ``last.pt`` (full state, to resume), then ``best.pt``/top-k/``epoch-N.pt`` when due.

        A top-k file that fell out of the k best is deleted only after the new one landed, so a kill
        in between leaves one file too many (removed by the next save), never one too few.
        """
        written = [save_checkpoint(self.last_path, state)]
        published = [self.best_path] if improved else []
        keep = set(self.top_k_paths)
        if self.top_k_path(epoch) in keep:
            published.append(self.top_k_path(epoch))
        if self.save_every and epoch % self.save_every == 0:
            published.append(self.epoch_path(epoch))
        if published:
            written.append(save_checkpoint(published[0], weights_only_state(state)))
            written.extend(link_or_copy(published[0], path) for path in published[1:])
        if self.save_top_k > 1:
            for stale in self.directory.glob("best-epoch-*.pt"):
                if stale not in keep:
                    stale.unlink(missing_ok=True)
        return written

    def save_final(self, state: Mapping[str, Any]) -> Path:
        """Write ``final.pt`` (the weights at the end of training, early-stopped or not)."""
        return save_checkpoint(self.final_path, weights_only_state(state))

    def state_dict(self) -> dict[str, Any]:
        """What resume needs: best score and epoch, patience counter, monitor, the top-k list."""
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
            "monitor": self.monitor,
            "mode": self.mode,
            "top_k": [[score, epoch] for score, epoch in self.top_k],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the best score and patience counter; refuses a checkpoint tracking another metric."""
        if state.get("monitor", self.monitor) != self.monitor or state.get("mode", self.mode) != self.mode:
            raise CheckpointError(
                f"checkpoint tracks monitor={state.get('monitor')!r} mode={state.get('mode')!r} but this "
                f"run uses monitor={self.monitor!r} mode={self.mode!r}; use resume=False or the same monitor."
            )
        self.best_score = None if state.get("best_score") is None else float(state["best_score"])
        self.best_epoch = None if state.get("best_epoch") is None else int(state["best_epoch"])
        self.epochs_without_improvement = int(state.get("epochs_without_improvement", 0))
        entries = state.get("top_k")
        if entries is None and self.best_epoch is not None:  # written before top-k: the best is the list
            entries = [(self.best_score, self.best_epoch)]
        self.top_k = self._ranked([(float(score), int(epoch)) for score, epoch in entries or []])
