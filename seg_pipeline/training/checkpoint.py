"""Atomic, ``weights_only``-loadable checkpoints and the best/last/every-N/final policy (DESIGN F14).

Checkpoints hold only tensors, numbers, strings, None and lists/dicts of those, so they load with
``torch.load(weights_only=True)``: opening a checkpoint never executes code from it. Files are
written to a hidden ``.<name>.tmp-<pid>`` and moved into place with ``os.replace``, so a killed
process leaves either the previous complete file or the new complete file, never half a file; the
temp file a killed writer leaves behind is swept by the next run (:func:`sweep_dead_writers_temps`).
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

PLAIN_SCALARS = (str, int, float, bool, type(None))


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read (unsafe content, missing file, corrupt data)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's weights do not fit the model (another architecture, class count or band count)."""


def to_plain(value: Any, where: str = "state") -> Any:
    """Return ``value`` converted to checkpoint-safe types, or raise naming the offending key.

    Paths, dtypes and devices become strings (named tuples plain tuples); anything else that is not
    a tensor, number, string, None, list, tuple or str/int-keyed dict is rejected (it would need
    pickle to load).
    """
    if isinstance(value, (torch.Tensor, *PLAIN_SCALARS)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    if isinstance(value, Mapping):
        plain: dict[Any, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise CheckpointError(f"{where}: key {key!r} of type {type(key).__name__} is not a str/int.")
            plain[key] = to_plain(item, f"{where}[{key!r}]")
        return plain
    if isinstance(value, list):
        return [to_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(to_plain(item, f"{where}[{index}]") for index, item in enumerate(value))
    raise CheckpointError(
        f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which "
        "torch.load(weights_only=True) cannot read; store tensors, numbers, strings, lists or dicts "
        "instead (e.g. dataclasses.asdict(config))."
    )


_TMP_MARK = ".tmp-"


def _temp_path(target: Path) -> Path:
    """Hidden, per-process temp name next to ``target`` (same filesystem, so ``os.replace`` is atomic)."""
    return target.with_name(f".{target.name}{_TMP_MARK}{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_dead_writers_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files that killed writers left in ``directory``; return what was removed.

    Only temps whose writer process is gone are touched, so a concurrent writer keeps its own.
    """
    removed = []
    folder = Path(directory)
    if not folder.is_dir():
        return removed
    for path in folder.glob(f"*{_TMP_MARK}*"):
        pid_text = path.name.rsplit(_TMP_MARK, 1)[1]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def save_checkpoint(path: str | Path, state: Mapping[str, Any], check_plain: bool = True) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``).

    Args:
        path: destination; parent folders are created.
        state: checkpoint content; see :func:`to_plain` for what is allowed.
        check_plain: validate/convert ``state`` first (turn off only when it is known to be plain).

    Raises:
        CheckpointError: ``state`` holds objects that would need pickle to load.
    """
    target = Path(path)
    payload = to_plain(state) if check_plain else state
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(target)
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def link_or_copy(source: str | Path, target: str | Path) -> Path:
    """Publish an existing checkpoint under another name atomically, without re-serialising it.

    A hard link is enough because checkpoints are never modified in place (every save replaces the
    directory entry), so later saves to ``source`` do not change ``target``.
    """
    source, target = Path(source), Path(target)
    tmp = _temp_path(target)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``; never runs pickled code.

    Raises:
        CheckpointError: the file is missing, truncated, or holds non-plain (possibly malicious) objects.
    """
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"checkpoint {source} does not exist (or is not a file).")
    try:
        state = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {source} contains objects that weights_only loading refuses to unpickle "
            f"(only tensors and plain containers are allowed); it was not loaded. Detail: {str(error)[:300]}"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"checkpoint {source} is unreadable or truncated: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {source} holds a {type(state).__name__}, expected a dict.")
    return state


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def check_state_dict_compatible(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path, max_listed: int = 5
) -> None:
    """Raise :class:`CheckpointMismatchError` listing the first mismatches instead of torch's wall of text."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    if not (missing or unexpected or wrong_shape):
        return
    lines = [f"checkpoint {source} does not fit {type(model).__name__} (is it from another architecture?):"]
    for label, items in (
        ("shape mismatches", wrong_shape),
        ("missing keys", missing),
        ("unexpected keys", unexpected),
    ):
        if items:
            shown = ", ".join(items[:max_listed])
            more = f" ... and {len(items) - max_listed} more" if len(items) > max_listed else ""
            lines.append(f"  {len(items)} {label}: {shown}{more}")
    raise CheckpointMismatchError("\n".join(lines))


def load_model_weights(
    model: nn.Module,
    path: str | Path,
    prefer_ema: bool = True,
    map_location: str | torch.device | None = "cpu",
) -> dict[str, Any]:
    """Load the weights stored in a checkpoint (or a bare state_dict file) into ``model``.

    Args:
        model: an unwrapped model of the same architecture.
        path: a checkpoint written by :class:`CheckpointManager` or a ``torch.save(state_dict)`` file.
        prefer_ema: use the EMA weights when the checkpoint has them, because those are the weights
            that were evaluated (and selected ``best.pt``) when EMA was enabled.

    Returns:
        The full checkpoint dict (for ``model_spec``, ``metrics``, ...).

    Raises:
        CheckpointMismatchError: keys or shapes do not match; names the file and the first mismatches.
    """
    state = load_checkpoint(path, map_location=map_location)
    if prefer_ema and isinstance(state.get("ema"), Mapping) and "module" in state["ema"]:
        weights = state["ema"]["module"]
    elif isinstance(state.get("model"), Mapping):
        weights = state["model"]
    elif state and all(isinstance(value, torch.Tensor) for value in state.values()):
        weights = state
    else:
        raise CheckpointError(f"checkpoint {path} has no 'model' state_dict (keys: {sorted(state)[:10]}).")
    weights = _strip_prefix(weights, "module.")
    check_state_dict_compatible(model, weights, path)
    model.load_state_dict(weights)
    return state


class CheckpointManager:
    """Decides which checkpoint files to write after each epoch and tracks the best score.

    Files in ``directory``: ``last.pt`` (every epoch), ``best.pt`` (monitored metric improved),
    ``epoch-{N:04d}.pt`` (every ``save_every`` epochs; 0 disables), ``final.pt`` (end of training).

    Args:
        directory: checkpoint folder (created on first save).
        monitor: metric name used for "best", e.g. ``val/miou``.
        mode: ``max`` or ``min``.
        save_every: period of the ``epoch-N`` snapshots in epochs.
        min_delta: an improvement must beat the best score by more than this.
    """

    def __init__(
        self,
        directory: str | Path,
        monitor: str = "val/miou",
        mode: str = "max",
        save_every: int = 5,
        min_delta: float = 0.0,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r} must be 'max' or 'min'.")
        if not isinstance(save_every, int) or save_every < 0:
            raise ValueError(f"save_every={save_every!r} must be an integer >= 0 (0 disables epoch-N files).")
        if min_delta < 0:
            raise ValueError(f"min_delta={min_delta!r} must be >= 0.")
        self.directory = Path(directory)
        self.monitor = monitor
        self.mode = mode
        self.save_every = save_every
        self.min_delta = float(min_delta)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.epochs_without_improvement = 0

    @property
    def last_path(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    @property
    def final_path(self) -> Path:
        return self.directory / "final.pt"

    def epoch_path(self, epoch: int) -> Path:
        return self.directory / f"epoch-{epoch:04d}.pt"

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
        return improved

    def save_epoch(self, state: Mapping[str, Any], epoch: int, improved: bool) -> list[Path]:
        """Write ``last.pt``, then publish it as ``best.pt``/``epoch-N.pt`` when due (no re-serialising)."""
        written = [save_checkpoint(self.last_path, state)]
        if improved:
            written.append(link_or_copy(self.last_path, self.best_path))
        if self.save_every and epoch % self.save_every == 0:
            written.append(link_or_copy(self.last_path, self.epoch_path(epoch)))
        return written

    def save_final(self, state: Mapping[str, Any]) -> Path:
        """Write ``final.pt`` (the state at the end of training, early-stopped or not)."""
        return save_checkpoint(self.final_path, state)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
            "monitor": self.monitor,
            "mode": self.mode,
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
