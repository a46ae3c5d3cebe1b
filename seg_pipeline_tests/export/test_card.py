"""The model card: classes, bands, normalisation, metrics, lineage, versions, against the raw checkpoint."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import onnx
import pytest
import torch

from seg_pipeline.data.synthetic import TARGET_CLASSES
from seg_pipeline.export import ExportResult
from seg_pipeline_tests.export.helpers import LINEAGE


def test_card_holds_classes_bands_normalisation_metrics_and_lineage(
    exported: ExportResult, checkpoint: Path
) -> None:
    card = exported.card
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)  # read independently of the module
    assert card["class_names"] == list(TARGET_CLASSES) and card["num_classes"] == 6
    assert card["bands"] == 3
    assert card["normalization"]["mean"] == pytest.approx(raw["config"]["run"]["normalization"]["mean"])
    assert card["normalization"]["std"] == pytest.approx(raw["config"]["run"]["normalization"]["std"])
    assert card["ignore_index"] == 255
    assert (
        card["architecture"]["architecture"] == "unet" and card["architecture"]["encoder"] == "mobilenet_v2"
    )
    assert card["input"]["pad_multiple"] == 32 and card["input"]["min_side"] == 32
    assert "val/miou" in card["metrics"]
    for key, value in raw["metrics"].items():
        assert card["metrics"][key] == (pytest.approx(value) if math.isfinite(value) else None)
    assert card["lineage"]["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert card["lineage"]["checkpoint_path"] == str(checkpoint.resolve())
    assert {key: card["lineage"][key] for key in LINEAGE} == LINEAGE
    assert set(card["formats"]) == {"torchscript", "onnx"}
    assert card["package_versions"]["torch"] == torch.__version__.split("+")[0]
    assert card["package_versions"]["onnx"] == onnx.__version__
    assert card["package_versions"]["segmentation-models-pytorch"]
