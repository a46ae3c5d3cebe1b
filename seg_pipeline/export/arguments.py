"""Checks of :func:`~seg_pipeline.export.api.export_model`'s arguments, before any checkpoint is read.

Each failure is an :class:`ExportError` naming the argument and its allowed values, so a bad call
fails in milliseconds instead of after loading and tracing a model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from seg_pipeline.export.errors import ExportError
from seg_pipeline.export.names import FORMATS
from seg_pipeline.export.onnx import MAX_OPSET

_RESERVED_LINEAGE_KEYS = ("checkpoint_path", "checkpoint_sha256")


def _validate_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = [part for part in formats.replace(",", " ").split() if part]
    chosen = tuple(dict.fromkeys(str(name).strip().lower() for name in formats))
    unknown = [name for name in chosen if name not in FORMATS]
    if not chosen or unknown:
        raise ExportError(
            f"formats={list(formats)!r}: choose one or more of {list(FORMATS)} (unknown: {unknown})."
        )
    return chosen


def _validate_lineage(lineage: Any) -> None:
    if lineage is None:
        return
    if not isinstance(lineage, Mapping):
        raise ExportError(f"lineage must be a dict (run id, model URI, ...), got {type(lineage).__name__}.")
    clashing = [key for key in _RESERVED_LINEAGE_KEYS if key in lineage]
    if clashing:
        raise ExportError(f"lineage sets {clashing}: export_model fills these from the checkpoint itself.")
    try:
        json.dumps(dict(lineage))
    except (TypeError, ValueError) as error:
        raise ExportError(f"lineage={lineage!r} is not JSON-serialisable: {error}") from error


def validate_arguments(
    formats: Sequence[str], example_size: int, opset: int, tolerances: Mapping[str, float], lineage: Any
) -> tuple[str, ...]:
    """Check every argument that does not need the checkpoint; return the chosen formats, deduplicated."""
    chosen = _validate_formats(formats)
    if isinstance(example_size, bool) or not isinstance(example_size, int) or example_size < 1:
        raise ExportError(f"example_size={example_size!r} must be a positive integer (pixels per side).")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 11 <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset={opset!r} must be an integer in [11, {MAX_OPSET}]: 11 is the first with dynamic "
            f"reflect Pad, {MAX_OPSET} the last the TorchScript-based exporter of torch "
            f"{torch.__version__} writes."
        )
    bad_tolerances = {
        name: value
        for name, value in tolerances.items()
        if name not in FORMATS or not isinstance(value, int | float) or not value >= 0
    }
    if bad_tolerances:
        raise ExportError(
            f"tolerances={dict(tolerances)!r}: keys must be in {list(FORMATS)} and values >= 0; "
            f"bad entries: {bad_tolerances}."
        )
    _validate_lineage(lineage)
    return chosen
