"""Parity with the eager model: recorded per format, and a format beyond its tolerance publishes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from seg_pipeline.export import DEFAULT_TOLERANCES, ExportParityError, ExportResult, export_model
from seg_pipeline_tests.export.helpers import EXAMPLE_SIZE, siblings


def test_parity_differences_are_recorded_and_within_tolerance(exported: ExportResult) -> None:
    parity = exported.card["parity"]
    assert set(parity["max_abs_diff"]) == {"torchscript", "onnx"}
    for name, difference in parity["max_abs_diff"].items():
        assert isinstance(difference, float) and 0.0 <= difference <= DEFAULT_TOLERANCES[name]
        assert parity["tolerance"][name] == DEFAULT_TOLERANCES[name]
        assert exported.max_abs_diff[name] == difference
        # The second parity input has another batch size and an off-stride size (padding exercised).
        assert exported.card["formats"][name]["parity_input_shapes"] == [
            [1, 3, EXAMPLE_SIZE, EXAMPLE_SIZE],
            [2, 3, EXAMPLE_SIZE + 5, EXAMPLE_SIZE + 11],
        ]
    assert "onnxruntime" in exported.card["formats"]["onnx"]["checked_with"]
    assert exported.card["formats"]["torchscript"]["tracer_warnings"] == []


def test_parity_failure_names_the_format_and_publishes_nothing(checkpoint: Path, tmp_path: Path) -> None:
    # A zero tolerance is real: onnxruntime's kernels differ from torch's by ~1e-5.
    with pytest.raises(ExportParityError, match=r"onnx export differs from the eager model by max abs \d"):
        export_model(
            checkpoint,
            tmp_path / "out",
            formats=("onnx",),
            example_size=EXAMPLE_SIZE,
            tolerances={"onnx": 0.0},
        )
    assert siblings(tmp_path) == []
