"""Export a trained stage checkpoint to TorchScript and ONNX with a model card (DESIGN F24).

Deployment targets (a C++/Java service, ONNX Runtime on an edge box, a GIS plugin) cannot run
our Python wrapper, so the export bakes everything the model needs into the graph and writes the
rest into ``model_card.json``: classes, bands, normalisation, input constraints, metrics, lineage.

Choices, each measured on torch 2.14.1 / SMP 0.6 / onnxruntime 1.31 (CPU):

* **Padding inside the graph, any input size.** :class:`SegmentationModel` pads to the encoder
  stride with Python ``if``/``max`` that tracing would freeze. :class:`_TraceablePaddedNet` computes
  the same reflect pad with shape arithmetic only (``(m - h % m) % m``), which ``torch.jit.trace``
  and the ONNX exporter record as graph ops: one trace serves every batch size and H/W, no
  TracerWarning. The parity check below runs a second, off-stride shape to prove it.
* **ONNX via the TorchScript-based exporter** (``torch.onnx.export(..., dynamo=False)``). The
  dynamo exporter (the torch >= 2.9 default) needs the extra ``onnxscript`` package, took 13-22 s
  instead of 4 s for a UNet-resnet18, and could not honour opset 17 (it fell back to 18 because
  ONNX has no Pad adapter). The legacy exporter is deprecated upstream but exact here (max abs
  difference ~1e-5 in onnxruntime) with dynamic batch, height and width. It cannot export SMP's
  PSPNet and UPerNet (``adaptive_avg_pool2d`` on traced sizes, even with static shapes; dynamo
  fails on UPerNet too), so those raise :class:`ExportError` suggesting TorchScript only.
* **Parity check.** Eager, the saved TorchScript file and the saved ONNX file (in onnxruntime when
  installed, else only ``onnx.checker``) run the same seeded inputs; differences above the
  tolerances raise :class:`ExportParityError` and nothing is published.
* **Atomic output.** Files are built in a hidden temp folder next to ``out_dir`` and renamed into
  place, so readers never see half an export and failures leave nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seg_pipeline.io import atomic_dir, file_sha256
from seg_pipeline.models import SegmentationModel
from seg_pipeline.models.checkpoint import CheckpointError, load_checkpoint
from seg_pipeline.provenance import package_versions

FORMATS: tuple[str, ...] = ("torchscript", "onnx")
FILE_NAMES: dict[str, str] = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
CARD_NAME = "model_card.json"
CARD_VERSION = 1
DEFAULT_TOLERANCES: dict[str, float] = {"torchscript": 1e-4, "onnx": 1e-3}
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
PARITY_SEED = 0
#: Off-stride extra rows/columns of the second parity input, so the in-graph padding is exercised.
_PARITY_EXTRA_ROWS, _PARITY_EXTRA_COLS = 5, 11
# The legacy exporter's ceiling (20 in torch 2.14); read from torch where it says so.
_MAX_OPSET: int = int(
    getattr(getattr(torch.onnx, "_constants", None), "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
)
_RESERVED_LINEAGE_KEYS = ("checkpoint_path", "checkpoint_sha256")
_VERSIONED_PACKAGES = ("torch", "segmentation-models-pytorch", "timm", "onnx", "onnxruntime", "seg_pipeline")


class ExportError(ValueError):
    """The checkpoint or the export arguments cannot produce an export."""


class ExportParityError(RuntimeError):
    """An exported format disagrees with the eager model by more than its tolerance."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` published.

    Attributes:
        out_dir: The export folder.
        files: Format name (``torchscript``, ``onnx``, ``card``) -> file path.
        card: The model card as written to ``model_card.json``.
        max_abs_diff: Format -> largest absolute logit difference to eager (``None`` when the
            format could only be validated structurally, i.e. ONNX without onnxruntime).
    """

    out_dir: Path
    files: dict[str, Path]
    card: dict[str, Any]
    max_abs_diff: dict[str, float | None] = field(default_factory=dict)

    def to_value(self) -> dict[str, Any]:
        """JSON-friendly dict (paths as strings) for Dagster metadata or CLI output."""
        return {
            "out_dir": str(self.out_dir),
            "files": {name: str(path) for name, path in self.files.items()},
            "max_abs_diff": dict(self.max_abs_diff),
        }


class _TraceablePaddedNet(nn.Module):
    """The SMP net plus :class:`SegmentationModel`'s bottom/right reflect padding, trace-friendly.

    Only shape arithmetic (no Python ``if``/``max``) so tracing keeps H/W symbolic. Matches the
    eager wrapper exactly whenever both sides are at least ``max(pad_multiple, min_side)``; below
    that the eager wrapper switches to replicate padding or a larger minimum size, which this
    graph does not reproduce (the card states the minimum side).
    """

    def __init__(self, net: nn.Module, pad_multiple: int) -> None:
        super().__init__()
        self.net = net
        self.pad_multiple = int(pad_multiple)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        pad_bottom = (self.pad_multiple - height % self.pad_multiple) % self.pad_multiple
        pad_right = (self.pad_multiple - width % self.pad_multiple) % self.pad_multiple
        logits = self.net(F.pad(x, (0, pad_right, 0, pad_bottom), mode="reflect"))
        return logits[:, :, :height, :width]


@dataclass(frozen=True)
class _StageInfo:
    """What the card needs from a stage checkpoint, validated once."""

    model_spec: dict[str, Any]
    run: dict[str, Any]
    class_names: list[str]
    mean: list[float]
    std: list[float]
    state: dict[str, Any]


def _read_stage_checkpoint(checkpoint: Path) -> _StageInfo:
    """Load the checkpoint and insist on what only a training stage writes (spec, classes, stats)."""
    state = load_checkpoint(checkpoint)
    run = (state.get("config") or {}).get("run") if isinstance(state.get("config"), Mapping) else None
    missing = []
    if not isinstance(state.get("model_spec"), Mapping) or not state["model_spec"]:
        missing.append("model_spec")
    if not isinstance(run, Mapping) or "class_names" not in run:
        missing.append("config.run.class_names")
    if not isinstance(run, Mapping) or not isinstance(run.get("normalization"), Mapping):
        missing.append("config.run.normalization")
    if missing:
        raise CheckpointError(
            f"checkpoint {checkpoint} is not a training-stage checkpoint: it lacks {missing} "
            f"(top-level keys: {sorted(map(str, state))[:8]}). Export a best.pt/last.pt/final.pt written "
            "by seg_pipeline.training.stages.run_stage; a bare state_dict has no classes or band statistics."
        )
    normalization = run["normalization"]
    return _StageInfo(
        model_spec=dict(state["model_spec"]),
        run=dict(run),
        class_names=[str(name) for name in run["class_names"]],
        mean=[float(v) for v in normalization["mean"]],
        std=[float(v) for v in normalization["std"]],
        state=state,
    )


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


def _validate_arguments(
    formats: Sequence[str], example_size: int, opset: int, tolerances: Mapping[str, float], lineage: Any
) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = [part for part in formats.replace(",", " ").split() if part]
    chosen = tuple(dict.fromkeys(str(name).strip().lower() for name in formats))
    unknown = [name for name in chosen if name not in FORMATS]
    if not chosen or unknown:
        raise ExportError(
            f"formats={list(formats)!r}: choose one or more of {list(FORMATS)} (unknown: {unknown})."
        )
    if isinstance(example_size, bool) or not isinstance(example_size, int) or example_size < 1:
        raise ExportError(f"example_size={example_size!r} must be a positive integer (pixels per side).")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 11 <= opset <= _MAX_OPSET:
        raise ExportError(
            f"opset={opset!r} must be an integer in [11, {_MAX_OPSET}]: 11 is the first with dynamic "
            f"reflect Pad, {_MAX_OPSET} the last the TorchScript-based exporter of torch "
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
    if lineage is not None:
        if not isinstance(lineage, Mapping):
            raise ExportError(
                f"lineage must be a dict (run id, model URI, ...), got {type(lineage).__name__}."
            )
        clashing = [key for key in _RESERVED_LINEAGE_KEYS if key in lineage]
        if clashing:
            raise ExportError(
                f"lineage sets {clashing}: export_model fills these from the checkpoint itself."
            )
        try:
            json.dumps(dict(lineage))
        except (TypeError, ValueError) as error:
            raise ExportError(f"lineage={lineage!r} is not JSON-serialisable: {error}") from error
    return chosen


@contextlib.contextmanager
def _staging_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a hidden temp folder next to ``out_dir``; publish it by rename on success only.

    An existing ``out_dir`` holding a previous export (it has a model card) or nothing is replaced;
    any other existing folder is refused, so a typo like ``--out .`` never deletes user files.
    """
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"out_dir={out_dir} exists and is not a folder; choose a folder path.")
        if any(out_dir.iterdir()) and not (out_dir / CARD_NAME).is_file():
            raise ExportError(
                f"out_dir={out_dir} exists and is not a previous export (no {CARD_NAME}); "
                "choose an empty or new folder."
            )
    with atomic_dir(out_dir) as staging:
        yield staging


def _parity_inputs(bands: int, example_size: int) -> list[torch.Tensor]:
    """Seeded inputs: the trace example shape, then batch 2 at an off-stride size, so the parity
    check also proves that batch and H/W are dynamic and the in-graph padding is right."""
    generator = torch.Generator().manual_seed(PARITY_SEED)
    shapes = [
        (1, bands, example_size, example_size),
        (2, bands, example_size + _PARITY_EXTRA_ROWS, example_size + _PARITY_EXTRA_COLS),
    ]
    return [torch.randn(shape, generator=generator) for shape in shapes]


def _max_abs_diff(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    for output, reference in zip(outputs, references, strict=True):
        if tuple(output.shape) != tuple(reference.shape):
            return math.inf
        worst = max(worst, float((output.float() - reference.float()).abs().max()))
    return worst


def _check_parity(name: str, difference: float, tolerance: float, detail: str) -> None:
    if not difference <= tolerance:  # also catches NaN
        raise ExportParityError(
            f"{name} export differs from the eager model by max abs {difference:.3g} > tolerance "
            f"{tolerance:.3g} ({detail}); nothing was written. Check the architecture traces with "
            "dynamic shapes, or raise the tolerance if the difference is numerical noise."
        )


@contextlib.contextmanager
def _quiet_export_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Silence torch's deprecation notices for jit/legacy-ONNX (a documented choice), keep the rest."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    for message in caught:
        if issubclass(message.category, DeprecationWarning | FutureWarning):
            continue
        warnings.warn_explicit(message.message, message.category, message.filename, message.lineno)


def _eager(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The reference outputs: the eager wrapper, with its own (non-traced) padding code."""
    with torch.no_grad():
        return [model(x) for x in inputs]


def _export_torchscript(
    eager: SegmentationModel, exportable: nn.Module, path: Path, bands: int, example_size: int
) -> dict[str, Any]:
    """Trace, save, reload the saved file and compare it with eager at two shapes.

    Tracer warnings (each a value frozen into the graph) are recorded; the off-stride parity input
    is what proves the trace still generalises.
    """
    inputs = _parity_inputs(bands, example_size)
    with _quiet_export_warnings() as caught, torch.no_grad():
        traced = torch.jit.trace(exportable, inputs[0], check_trace=False)
        traced.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
        outputs = [loaded(x) for x in inputs]
    return {
        "method": "torch.jit.trace (padding traced as shape arithmetic)",
        "dynamic_axes": ["batch", "height", "width"],
        "input_shape": ["batch", bands, "height", "width"],
        "max_abs_diff": _max_abs_diff(outputs, _eager(eager, inputs)),
        "parity_input_shapes": [list(x.shape) for x in inputs],
        "checked_with": f"torch.jit.load (torch {torch.__version__})",
        "tracer_warnings": sorted(
            {str(m.message) for m in caught if issubclass(m.category, torch.jit.TracerWarning)}
        ),
    }


def _export_onnx(
    eager: SegmentationModel, exportable: nn.Module, path: Path, opset: int, bands: int, example_size: int
) -> dict[str, Any]:
    """Export with dynamic batch/height/width, check the graph, run it in onnxruntime if installed."""
    try:
        import onnx
    except ImportError as error:
        raise ExportError(
            "formats includes 'onnx' but the onnx package is not installed; "
            "pip install onnx onnxruntime (the 'export' extra) or use formats=('torchscript',)."
        ) from error
    inputs = _parity_inputs(bands, example_size)
    axes = {0: "batch", 2: "height", 3: "width"}
    try:
        with _quiet_export_warnings(), torch.no_grad():
            torch.onnx.export(
                exportable,
                (inputs[0],),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                do_constant_folding=True,
            )
    except torch.onnx.errors.OnnxExporterError as error:
        # PSPNet and UPerNet (adaptive_avg_pool2d on traced sizes) fail here even for static shapes.
        raise ExportError(
            f"torch.onnx cannot export architecture {eager.spec.architecture!r}: "
            f"{str(error).splitlines()[0][:200]}. Use formats=('torchscript',) for this model."
        ) from error
    onnx.checker.check_model(str(path), full_check=True)
    details: dict[str, Any] = {
        "method": f"torch.onnx.export(dynamo=False, opset_version={opset})",
        "opset": opset,
        "dynamic_axes": ["batch", "height", "width"],
        "input_shape": ["batch", bands, "height", "width"],
        "max_abs_diff": None,
        "parity_input_shapes": [list(x.shape) for x in inputs],
    }
    try:
        import onnxruntime
    except ImportError:
        return {
            **details,
            "checked_with": f"onnx.checker {onnx.__version__} only (onnxruntime not installed)",
        }
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]) for x in inputs]
    return {
        **details,
        "max_abs_diff": _max_abs_diff(outputs, _eager(eager, inputs)),
        "checked_with": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
    }


def _build_card(
    info: _StageInfo,
    model: nn.Module,
    checkpoint: Path,
    example_size: int,
    min_side: int,
    parity: dict[str, dict[str, Any]],
    opset: int,
    lineage: Mapping[str, Any] | None,
) -> dict[str, Any]:
    spec = info.model_spec
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
            "bands": int(spec["in_channels"]),
            "normalization": {
                "mean": info.mean,
                "std": info.std,
                "formula": "x_normalised = (x_raw - mean[band]) / std[band], per band, float32",
            },
            "input": {
                "name": INPUT_NAME,
                "layout": "NCHW",
                "dtype": "float32",
                "shape_by_format": {name: details["input_shape"] for name, details in parity.items()},
                "min_side": min_side,
                "pad_multiple": int(getattr(model, "pad_multiple", 1)),
                "padding": "reflect-padded bottom/right to a multiple of pad_multiple inside the graph; "
                "logits are cropped back, so the output is aligned pixel for pixel with the input",
                "example_size": example_size,
            },
            "output": {
                "name": OUTPUT_NAME,
                "layout": "NCHW",
                "dtype": "float32",
                "meaning": "raw logits; softmax over dim 1 gives probabilities, argmax the class index",
            },
            "architecture": {
                "architecture": spec.get("architecture"),
                "encoder": spec.get("encoder"),
                "model_spec": spec,
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
            "parity": {
                "reference": "eager SegmentationModel from the checkpoint (EMA weights when present)",
                "seed": PARITY_SEED,
                "max_abs_diff": {name: details["max_abs_diff"] for name, details in parity.items()},
                "tolerance": {name: details["tolerance"] for name, details in parity.items()},
            },
            "package_versions": package_versions(_VERSIONED_PACKAGES),
        }
    )


def export_model(
    checkpoint: Path | str,
    out_dir: Path | str,
    *,
    formats: Sequence[str] = FORMATS,
    example_size: int = 256,
    opset: int = 17,
    lineage: Mapping[str, Any] | None = None,
    tolerances: Mapping[str, float] | None = None,
) -> ExportResult:
    """Export a stage checkpoint's model (EMA weights when present) and publish it atomically.

    Args:
        checkpoint: A ``best.pt``/``last.pt``/``final.pt`` written by a training stage.
        out_dir: Folder to create (or replace, when it holds a previous export).
        formats: Any of ``torchscript`` and ``onnx``; the model card is always written.
        example_size: Side of the square trace example; must be >= the model's minimum side. The
            exports accept any batch and H/W anyway; parity also runs ``example_size + 5/11``.
        opset: ONNX opset (>= 11).
        lineage: JSON-friendly provenance for the card (MLflow run id, model URI, data version,
            git commit, ...); the checkpoint path and sha256 are added here.
        tolerances: Max abs logit difference per format; defaults to :data:`DEFAULT_TOLERANCES`.

    Raises:
        ExportError: bad arguments, or ``onnx`` requested without the onnx package.
        CheckpointError: the file is missing, unreadable, or not a training-stage checkpoint.
        ExportParityError: an export disagrees with eager beyond its tolerance (nothing written).
    """
    from seg_pipeline.training.stages import load_trained_model

    tolerance_by_format = {**DEFAULT_TOLERANCES, **dict(tolerances or {})}
    chosen = _validate_arguments(formats, example_size, opset, tolerance_by_format, lineage)
    checkpoint = Path(checkpoint).resolve()
    out_dir = Path(out_dir).resolve()
    info = _read_stage_checkpoint(checkpoint)
    model = load_trained_model(checkpoint).eval()
    pad_multiple = int(getattr(model, "pad_multiple", 1))
    min_side = max(pad_multiple, int(getattr(model, "min_side", 1)))
    if example_size < min_side:
        raise ExportError(
            f"example_size={example_size} is below this model's minimum input side {min_side} "
            f"({info.model_spec.get('architecture')}); use example_size >= {min_side}."
        )
    exportable = _TraceablePaddedNet(model.net, pad_multiple).eval()
    for parameter in exportable.parameters():
        parameter.requires_grad_(False)
    bands = int(info.model_spec["in_channels"])

    parity: dict[str, dict[str, Any]] = {}
    with _staging_dir(out_dir) as staging:
        for name in chosen:
            path = staging / FILE_NAMES[name]
            if name == "torchscript":
                details = _export_torchscript(model, exportable, path, bands, example_size)
            else:
                details = _export_onnx(model, exportable, path, opset, bands, example_size)
            details["tolerance"] = tolerance_by_format[name]
            if details["max_abs_diff"] is not None:
                _check_parity(name, details["max_abs_diff"], details["tolerance"], details["checked_with"])
            parity[name] = details
        card = _build_card(info, model, checkpoint, example_size, min_side, parity, opset, lineage)
        (staging / CARD_NAME).write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    files = {name: out_dir / FILE_NAMES[name] for name in chosen}
    files["card"] = out_dir / CARD_NAME
    return ExportResult(
        out_dir=out_dir,
        files=files,
        card=card,
        max_abs_diff={name: details["max_abs_diff"] for name, details in parity.items()},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m seg_pipeline.export --checkpoint best.pt --out exports/v1``: prints a JSON summary."""
    parser = argparse.ArgumentParser(
        prog="python -m seg_pipeline.export", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="stage checkpoint (best.pt)")
    parser.add_argument("--out", required=True, type=Path, help="export folder to create or replace")
    parser.add_argument(
        "--formats", nargs="+", default=list(FORMATS), choices=FORMATS, help="formats to write"
    )
    parser.add_argument("--example-size", type=int, default=256, help="trace example side in pixels")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset")
    parser.add_argument(
        "--lineage", type=json.loads, default=None, help='JSON object, e.g. \'{"git_commit": "abc123"}\''
    )
    args = parser.parse_args(argv)
    try:
        result = export_model(
            args.checkpoint,
            args.out,
            formats=args.formats,
            example_size=args.example_size,
            opset=args.opset,
            lineage=args.lineage,
        )
    except (ValueError, ExportParityError) as error:
        print(f"export failed: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_value(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
