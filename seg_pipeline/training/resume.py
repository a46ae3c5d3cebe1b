"""What a training checkpoint holds, and how a run is restored from one (F14 in docs/architecture.md).

A checkpoint is the whole training state: model, optimizer, scheduler, scaler, EMA, epoch, global
step, best score and patience, every rank's RNG state and the history, so a killed run resumes where
its last finished epoch left it and ends with the weights an uninterrupted run would have had.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seg_pipeline.models.checkpoint import CheckpointError, check_state_dict_compatible, load_checkpoint
from seg_pipeline.training.checkpoints import CheckpointManager
from seg_pipeline.training.distributed import all_gather_object, rank, world_size
from seg_pipeline.training.ema import ModelEMA
from seg_pipeline.training.reproducibility import capture_rng_state, restore_rng_state
from seg_pipeline.training.steps import EpochRunner

CHECKPOINT_FORMAT_VERSION = 1


def training_state(
    runner: EpochRunner,
    manager: CheckpointManager,
    epoch: int,
    logs: Mapping[str, float],
    history: list[dict[str, float]],
    stopped_early: bool,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The checkpoint content after ``epoch`` (collective under DDP: every rank must call it)."""
    rng_states = all_gather_object(capture_rng_state())
    manager_state = manager.state_dict()
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": runner.bare_model.state_dict(),
        "optimizer": runner.optimizer.state_dict(),
        "scheduler": runner.scheduler.state_dict() if runner.scheduler is not None else None,
        "scaler": runner.scaler.state_dict(),
        "ema": runner.ema.state_dict() if runner.ema is not None else None,
        "epoch": epoch,
        "global_step": runner.global_step,
        "best_score": manager_state["best_score"],
        "best_epoch": manager_state["best_epoch"],
        "epochs_without_improvement": manager_state["epochs_without_improvement"],
        "checkpoint_manager": manager_state,
        "stopped_early": stopped_early,
        "rng": rng_states,
        "world_size": world_size(),
        "metrics": dict(logs),
        "history": list(history),
        **extra,
    }


def restore_training_state(
    runner: EpochRunner, manager: CheckpointManager, path: Path
) -> tuple[int, list[dict[str, float]], bool]:
    """Load a checkpoint written by :func:`training_state`: (last finished epoch, history, stopped_early)."""
    state = load_checkpoint(path, map_location="cpu")
    if state.get("weights_only"):
        raise CheckpointError(
            f"{path} holds weights only (best.pt, epoch-N.pt and final.pt leave the optimizer state out); "
            f"resume from last.pt in the same folder, or start a new run from these weights"
        )
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION or "optimizer" not in state:
        raise CheckpointError(f"{path} is not a resumable training checkpoint (no optimizer/format_version).")
    check_state_dict_compatible(runner.bare_model, state["model"], path)
    runner.bare_model.load_state_dict(state["model"])
    runner.optimizer.load_state_dict(state["optimizer"])
    if runner.scheduler is not None:
        if state.get("scheduler") is None:
            raise CheckpointError(
                f"{path} has no scheduler state but this run uses a scheduler; use resume=False."
            )
        runner.scheduler.load_state_dict(state["scheduler"])
    runner.scaler.load_state_dict(state.get("scaler") or {})
    if runner.ema is not None:
        if state.get("ema"):
            runner.ema.load_state_dict(state["ema"])
        else:  # EMA newly enabled: start it from the restored weights
            runner.ema = ModelEMA(runner.bare_model, runner.ema.decay, runner.ema.warmup)
    manager.load_state_dict(state["checkpoint_manager"])
    runner.global_step = int(state["global_step"])
    rng_states = state.get("rng") or []
    if rng_states:
        own = rng_states[rank()] if len(rng_states) == world_size() else rng_states[0]
        restore_rng_state(own)
    return int(state["epoch"]), list(state.get("history") or []), bool(state.get("stopped_early", False))
