"""Atomic, ``weights_only``-loadable checkpoint files: save, load, and load weights into a model.

Checkpoints hold only tensors, numbers, strings, None and lists/dicts of those, so they load with
``torch.load(weights_only=True)``: opening a checkpoint never executes code from it. Files are
written through :func:`seg_pipeline.io.atomic_write` (a hidden temp name, fsync, ``os.replace``), so
a killed process leaves either the previous complete file or the new one, never half a file; the
temp a killed writer leaves behind is swept by the next run (:func:`seg_pipeline.io.sweep_stale_temps`).
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seg_pipeline.io import atomic_write

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
    with atomic_write(target, keep_suffix=False) as tmp, open(tmp, "xb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return target


def link_or_copy(source: str | Path, target: str | Path) -> Path:
    """Publish an existing checkpoint under another name atomically, without re-serialising it.

    A hard link is enough because checkpoints are never modified in place (every save replaces the
    directory entry), so later saves to ``source`` do not change ``target``.
    """
    source, target = Path(source), Path(target)
    with atomic_write(target, keep_suffix=False) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
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
        path: a checkpoint written by the training loop or a ``torch.save(state_dict)`` file.
        prefer_ema: use the EMA weights when the checkpoint has them, because those are the weights
            that were evaluated (and selected ``best.pt``) when EMA was enabled.
        map_location: where tensors are loaded (``torch.load``'s argument).

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
