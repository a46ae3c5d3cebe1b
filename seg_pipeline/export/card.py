"""The model card: everything a deployment needs besides the graph, as ``model_card.json``.

Deployment targets (a C++/Java service, ONNX Runtime on an edge box, a GIS plugin) cannot run
our Python wrapper, so the card carries the rest: classes, bands, normalisation, input
constraints, metrics, lineage (with the checkpoint's sha256), parity results and package versions.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seg_pipeline.export.graph import StageInfo, pad_multiple
from seg_pipeline.export.names import CARD_NAME, FILE_NAMES, INPUT_NAME, OUTPUT_NAME
from seg_pipeline.export.parity import PARITY_SEED
from seg_pipeline.io import file_sha256
from seg_pipeline.provenance import package_versions

CARD_VERSION = 1
_VERSIONED_PACKAGES = ("torch", "segmentation-models-pytorch", "timm", "onnx", "onnxruntime", "seg_pipeline")


def _json_safe(value: Any) -> Any:
    """Metrics may hold NaN/inf (an empty validation class): JSON has no such numbers, use null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _json_safe(value.item())
    return value


def _input_section(
    model: nn.Module, parity: dict[str, dict[str, Any]], example_size: int, min_side: int
) -> dict[str, Any]:
    return {
        "name": INPUT_NAME,
        "layout": "NCHW",
        "dtype": "float32",
        "shape_by_format": {name: details["input_shape"] for name, details in parity.items()},
        "min_side": min_side,
        "pad_multiple": pad_multiple(model),
        "padding": "reflect-padded bottom/right to a multiple of pad_multiple inside the graph; "
        "logits are cropped back, so the output is aligned pixel for pixel with the input",
        "example_size": example_size,
    }


def _parity_section(parity: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "reference": "eager SegmentationModel from the checkpoint (EMA weights when present)",
        "seed": PARITY_SEED,
        "max_abs_diff": {name: details["max_abs_diff"] for name, details in parity.items()},
        "tolerance": {name: details["tolerance"] for name, details in parity.items()},
    }


def build_card(
    info: StageInfo,
    model: nn.Module,
    checkpoint: Path,
    example_size: int,
    min_side: int,
    parity: dict[str, dict[str, Any]],
    opset: int,
    lineage: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The card as a JSON-safe dict (non-finite numbers become null), in the order it is written."""
    state = info.state
    return _json_safe(
        {
            "card_version": CARD_VERSION,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "task": "semantic-segmentation",
            "class_names": info.class_names,
            "num_classes": len(info.class_names),
            "positive_classes": list(getattr(model, "positive_classes", ())),
            "ignore_index": info.run.get("ignore_index"),
            "bands": info.bands,
            "normalization": {
                "mean": info.mean,
                "std": info.std,
                "formula": "x_normalised = (x_raw - mean[band]) / std[band], per band, float32",
            },
            "input": _input_section(model, parity, example_size, min_side),
            "output": {
                "name": OUTPUT_NAME,
                "layout": "NCHW",
                "dtype": "float32",
                "meaning": "raw logits; softmax over dim 1 gives probabilities, argmax the class index",
            },
            "architecture": {
                "architecture": info.architecture,
                "encoder": info.encoder,
                "model_spec": info.model_spec,
            },
            "metrics": dict(state.get("metrics") or {}),
            "training": {
                "stage": info.run.get("stage"),
                "epoch": state.get("epoch"),
                "best_epoch": state.get("best_epoch"),
                "best_score": state.get("best_score"),
                "sources": info.run.get("sources"),
            },
            "lineage": {
                **dict(lineage or {}),
                "checkpoint_path": str(checkpoint),
                "checkpoint_sha256": file_sha256(checkpoint),
            },
            "formats": {name: {"file": FILE_NAMES[name], **details} for name, details in parity.items()},
            "parity": _parity_section(parity),
            "package_versions": package_versions(_VERSIONED_PACKAGES),
        }
    )


def write_card(folder: Path, card: Mapping[str, Any]) -> Path:
    """Write ``card`` to ``folder/model_card.json`` in build order (not sorted), refusing NaN.

    Not :func:`seg_pipeline.io.write_json`: that sorts keys and stringifies unknown objects, while
    the card keeps its reading order and must fail loudly on a value JSON cannot hold. ``folder``
    is the export's staging folder, which is published atomically as a whole.
    """
    path = folder / CARD_NAME
    path.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    return path
