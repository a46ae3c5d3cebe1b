"""The ONNX file: dynamic batch and size in onnxruntime, and the onnx.checker fallback without it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from seg_pipeline.data.synthetic import TARGET_CLASSES
from seg_pipeline.export import CARD_NAME, ExportResult, export_model
from seg_pipeline_tests.export.helpers import EXAMPLE_SIZE, eager_logits, siblings


def test_onnx_runs_in_onnxruntime_with_dynamic_batch_and_size(exported: ExportResult, eager) -> None:
    graph = onnx.load(str(exported.files["onnx"])).graph
    input_dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert graph.input[0].name == "image" and graph.output[0].name == "logits"
    assert input_dims == ["batch", 3, "height", "width"]
    session = onnxruntime.InferenceSession(str(exported.files["onnx"]), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 45, 70, generator=torch.Generator().manual_seed(8))
    (logits,) = session.run(["logits"], {"image": x.numpy()})
    assert logits.shape == (4, len(TARGET_CLASSES), 45, 70)
    np.testing.assert_allclose(logits, eager_logits(eager, x), atol=1e-3, rtol=0)


def test_onnx_without_onnxruntime_falls_back_to_the_checker(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    result = export_model(checkpoint, tmp_path / "out", formats=["onnx"], example_size=EXAMPLE_SIZE)
    assert result.max_abs_diff == {"onnx": None}
    assert "onnx.checker" in result.card["formats"]["onnx"]["checked_with"]
    assert siblings(result.out_dir) == sorted([CARD_NAME, "model.onnx"])
