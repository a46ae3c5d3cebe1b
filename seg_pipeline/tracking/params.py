"""Params and metrics shaped for MLflow: flattened keys, truncated values, batched calls."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

TRUNCATION_MARKER = "..."


def truncate_value(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters, ending in ``...`` so the cut is visible in the UI."""
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else list(value)
        return json.dumps(items, default=str)
    return str(value)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings (and dataclasses) into dot-joined keys with string values.

    ``{"optim": {"lr": 3e-4}}`` becomes ``{"optim.lr": "0.0003"}``; lists become JSON; values longer
    than MLflow's param limit (6000 characters) are truncated with a trailing ``...``.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        full_key = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            if value:
                flat.update(flatten_params(value, prefix=f"{full_key}."))
            else:
                flat[full_key] = "{}"
            continue
        flat[full_key] = truncate_value(_stringify(value), MAX_PARAM_VAL_LENGTH)
    return flat


def _metric_value(key: str, value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)  # numbers, numpy scalars and one-element tensors
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"metric {key!r} has value {value!r} of type {type(value).__name__}: pass a number "
            "(float, int, numpy scalar or one-element tensor)"
        ) from error


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
