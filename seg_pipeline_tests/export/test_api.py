"""export_model end to end: the published files, atomic replacement, refused arguments and folders."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import torch

from seg_pipeline.export import CARD_NAME, FILE_NAMES, ExportError, ExportResult, export_model
from seg_pipeline_tests.export.helpers import EXAMPLE_SIZE, siblings


def test_export_writes_exactly_the_three_files_and_no_temp_dirs(
    exported: ExportResult, tmp_path: Path
) -> None:
    (tmp_path / "plain").mkdir()  # the published folder follows the umask like any mkdir
    assert stat.S_IMODE(exported.out_dir.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert siblings(exported.out_dir) == sorted([CARD_NAME, *FILE_NAMES.values()])
    assert siblings(exported.out_dir.parent) == [exported.out_dir.name]  # staging folder renamed away
    assert exported.files == {
        "torchscript": exported.out_dir / "model.torchscript.pt",
        "onnx": exported.out_dir / "model.onnx",
        "card": exported.out_dir / CARD_NAME,
    }
    assert json.loads((exported.out_dir / CARD_NAME).read_text()) == exported.card


def test_exporter_crash_leaves_no_out_dir_and_keeps_a_previous_export(
    checkpoint: Path, exported: ExportResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = tmp_path / "model"
    shutil.copytree(exported.out_dir, previous)
    card_before = (previous / CARD_NAME).read_bytes()

    def broken_export(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected ONNX exporter failure")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="injected"):  # TorchScript is already staged when ONNX fails
        export_model(checkpoint, tmp_path / "fresh", example_size=EXAMPLE_SIZE)
    with pytest.raises(RuntimeError, match="injected"):
        export_model(checkpoint, previous, formats=["onnx"], example_size=EXAMPLE_SIZE)
    assert siblings(tmp_path) == ["model"]  # no "fresh", no hidden staging folders
    assert (previous / CARD_NAME).read_bytes() == card_before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"formats": ("tflite",)}, r"formats=\['tflite'\].*unknown: \['tflite'\]"),
        ({"example_size": 16}, r"example_size=16 is below this model's minimum input side 32"),
        ({"opset": 99}, r"opset=99 must be an integer in \[11, 20\]"),
        ({"tolerances": {"onnx": -1.0}}, r"tolerances=.*bad entries: \{'onnx': -1.0\}"),
        ({"lineage": {"checkpoint_sha256": "x"}}, r"lineage sets \['checkpoint_sha256'\]"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(checkpoint: Path, tmp_path: Path, kwargs, message) -> None:
    with pytest.raises(ExportError, match=message):
        export_model(checkpoint, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_out_dir_with_foreign_files_is_never_replaced(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"is not a previous export \(no model_card.json\)"):
        export_model(checkpoint, tmp_path, formats=["torchscript"], example_size=EXAMPLE_SIZE)
    assert siblings(tmp_path) == ["notes.txt"]
