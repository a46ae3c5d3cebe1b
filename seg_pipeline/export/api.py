"""The entry point :func:`export_model`: read the checkpoint, export each format, publish atomically.

* **Atomic output.** Files are built in a hidden temp folder next to ``out_dir``
  (:func:`seg_pipeline.io.atomic_dir`) and renamed into place, so readers never see half an
  export and failures leave nothing behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from seg_pipeline.export.arguments import validate_arguments
from seg_pipeline.export.card import build_card, write_card
from seg_pipeline.export.errors import ExportError
from seg_pipeline.export.graph import exportable_net, min_side, read_stage_checkpoint
from seg_pipeline.export.names import CARD_NAME, FILE_NAMES, FORMATS
from seg_pipeline.export.onnx import export_onnx
from seg_pipeline.export.parity import DEFAULT_TOLERANCES, check_parity
from seg_pipeline.export.torchscript import export_torchscript
from seg_pipeline.io import atomic_dir
from seg_pipeline.models import SegmentationModel


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


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
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


def _export_formats(
    chosen: Sequence[str],
    model: SegmentationModel,
    exportable: nn.Module,
    staging: Path,
    *,
    opset: int,
    bands: int,
    example_size: int,
    tolerances: Mapping[str, float],
) -> dict[str, dict[str, Any]]:
    """Write each chosen format into ``staging`` and check its parity; format -> card details."""
    parity: dict[str, dict[str, Any]] = {}
    for name in chosen:
        path = staging / FILE_NAMES[name]
        if name == "torchscript":
            details = export_torchscript(model, exportable, path, bands, example_size)
        else:
            details = export_onnx(model, exportable, path, opset, bands, example_size)
        details["tolerance"] = tolerances[name]
        if details["max_abs_diff"] is not None:
            check_parity(name, details["max_abs_diff"], details["tolerance"], details["checked_with"])
        parity[name] = details
    return parity


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
    from seg_pipeline.models.loading import load_trained_model

    tolerance_by_format = {**DEFAULT_TOLERANCES, **dict(tolerances or {})}
    chosen = validate_arguments(formats, example_size, opset, tolerance_by_format, lineage)
    checkpoint = Path(checkpoint).resolve()
    out_dir = Path(out_dir).resolve()
    info = read_stage_checkpoint(checkpoint)
    model = load_trained_model(checkpoint).eval()
    smallest = min_side(model)
    if example_size < smallest:
        raise ExportError(
            f"example_size={example_size} is below this model's minimum input side {smallest} "
            f"({info.architecture}); use example_size >= {smallest}."
        )
    exportable = exportable_net(model)
    bands = info.bands
    with staging_dir(out_dir) as staging:
        parity = _export_formats(
            chosen,
            model,
            exportable,
            staging,
            opset=opset,
            bands=bands,
            example_size=example_size,
            tolerances=tolerance_by_format,
        )
        card = build_card(info, model, checkpoint, example_size, smallest, parity, opset, lineage)
        write_card(staging, card)
    files = {name: out_dir / FILE_NAMES[name] for name in chosen}
    files["card"] = out_dir / CARD_NAME
    return ExportResult(
        out_dir=out_dir,
        files=files,
        card=card,
        max_abs_diff={name: details["max_abs_diff"] for name, details in parity.items()},
    )
