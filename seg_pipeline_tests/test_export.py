"""Export of a real (tiny) stage checkpoint to TorchScript and ONNX, with parity and model card."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from seg_pipeline.data.headers import build_headers, write_catalog
from seg_pipeline.data.shards import write_shards
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.data.splits import SplitConfig, assign_splits
from seg_pipeline.data.synthetic import TARGET_CLASSES, SyntheticSpec, write_synthetic_dataset
from seg_pipeline.export import (
    CARD_NAME,
    DEFAULT_TOLERANCES,
    FILE_NAMES,
    ExportError,
    ExportParityError,
    ExportResult,
    export_model,
    main,
)
from seg_pipeline.models import ModelSpec
from seg_pipeline.models.checkpoint import CheckpointError
from seg_pipeline.training.loop import TrainConfig
from seg_pipeline.training.stages import SourceSpec, StageConfig, load_trained_model, run_stage

EXAMPLE_SIZE = 32  # one encoder stride; parity also runs 37x43 (off-stride, padded in the graph)
LINEAGE = {"mlflow_run_id": "run-123", "model_uri": "models:/demo@champion", "git_commit": "abc1234"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a one-step UNet-resnet18 stage on 32x32 synthetic shards."""
    root = tmp_path_factory.mktemp("export_stage")
    raw = write_synthetic_dataset(
        root / "raw" / "demo", SyntheticSpec(grid_rows=2, grid_cols=3, tile_size=32), seed=3
    )
    headers = build_headers(DatasetSpec("demo", raw))
    processed = root / "processed" / "demo"
    write_catalog(headers.catalog, processed / "headers.parquet", headers.class_names)
    splits = assign_splits(
        headers.catalog,
        SplitConfig(policy="supervised", train_fraction=0.5, val_fraction=0.5, test_fraction=0.0),
    )
    write_shards(headers.catalog, splits, processed)
    target = SourceSpec("demo", processed, processed / "headers.parquet", TARGET_CLASSES)
    config = StageConfig(
        model=ModelSpec("unet", "resnet18", 3, len(TARGET_CLASSES)),
        train=TrainConfig(epochs=1, max_steps_per_epoch=1, ema_decay=None, log_every_n_steps=0),
        warmup_epochs=0.0,
    )
    result = run_stage("pretrain", config, [target], target, root / "ckpt")
    return result.best_checkpoint


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out_dir = tmp_path_factory.mktemp("export_out") / "model-v1"
    return export_model(checkpoint, out_dir, example_size=EXAMPLE_SIZE, lineage=LINEAGE)


@pytest.fixture(scope="module")
def eager(checkpoint: Path) -> torch.nn.Module:
    """The independent reference: the eager SegmentationModel with its own padding code."""
    return load_trained_model(checkpoint)


def _eager_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_export_writes_exactly_the_three_files_and_no_temp_dirs(
    exported: ExportResult, tmp_path: Path
) -> None:
    (tmp_path / "plain").mkdir()  # the published folder follows the umask like any mkdir
    assert stat.S_IMODE(exported.out_dir.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert _siblings(exported.out_dir) == sorted([CARD_NAME, *FILE_NAMES.values()])
    assert _siblings(exported.out_dir.parent) == [exported.out_dir.name]  # staging folder renamed away
    assert exported.files == {
        "torchscript": exported.out_dir / "model.torchscript.pt",
        "onnx": exported.out_dir / "model.onnx",
        "card": exported.out_dir / CARD_NAME,
    }
    assert json.loads((exported.out_dir / CARD_NAME).read_text()) == exported.card


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


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_file_reproduces_eager_at_a_new_batch_and_size(exported: ExportResult, eager) -> None:
    scripted = torch.jit.load(str(exported.files["torchscript"]), map_location="cpu")
    x = torch.randn(3, 3, 50, 41, generator=torch.Generator().manual_seed(7))  # pads 14 rows, 23 cols
    with torch.no_grad():
        logits = scripted(x).numpy()
    expected = _eager_logits(eager, x)
    assert logits.shape == (3, len(TARGET_CLASSES), 50, 41)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_onnx_runs_in_onnxruntime_with_dynamic_batch_and_size(exported: ExportResult, eager) -> None:
    graph = onnx.load(str(exported.files["onnx"])).graph
    input_dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert graph.input[0].name == "image" and graph.output[0].name == "logits"
    assert input_dims == ["batch", 3, "height", "width"]
    session = onnxruntime.InferenceSession(str(exported.files["onnx"]), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 45, 70, generator=torch.Generator().manual_seed(8))
    (logits,) = session.run(["logits"], {"image": x.numpy()})
    assert logits.shape == (4, len(TARGET_CLASSES), 45, 70)
    np.testing.assert_allclose(logits, _eager_logits(eager, x), atol=1e-3, rtol=0)


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
    assert card["architecture"]["architecture"] == "unet" and card["architecture"]["encoder"] == "resnet18"
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
    assert _siblings(tmp_path) == []


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
    assert _siblings(tmp_path) == ["model"]  # no "fresh", no hidden staging folders
    assert (previous / CARD_NAME).read_bytes() == card_before


def test_bare_state_dict_is_refused_naming_the_file(eager, tmp_path: Path) -> None:
    bare = tmp_path / "weights_only.pt"
    torch.save(eager.state_dict(), bare)
    with pytest.raises(
        CheckpointError, match=r"weights_only\.pt is not a training-stage checkpoint.*model_spec"
    ):
        export_model(bare, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_onnx_without_onnxruntime_falls_back_to_the_checker(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    result = export_model(checkpoint, tmp_path / "out", formats=["onnx"], example_size=EXAMPLE_SIZE)
    assert result.max_abs_diff == {"onnx": None}
    assert "onnx.checker" in result.card["formats"]["onnx"]["checked_with"]
    assert _siblings(result.out_dir) == sorted([CARD_NAME, "model.onnx"])


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
    assert _siblings(tmp_path) == ["notes.txt"]


def test_cli_exports_and_replaces_a_previous_export(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "cli"
    argv = ["--checkpoint", str(checkpoint), "--out", str(out_dir), "--formats", "torchscript"]
    assert main([*argv, "--example-size", "32", "--lineage", '{"data_version": "v7"}']) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["files"]["torchscript"] == str(out_dir / "model.torchscript.pt")
    assert json.loads((out_dir / CARD_NAME).read_text())["lineage"]["data_version"] == "v7"
    assert main([*argv, "--example-size", "40"]) == 0  # same folder again: swapped in atomically
    card = json.loads((out_dir / CARD_NAME).read_text())
    assert card["input"]["example_size"] == 40 and "data_version" not in card["lineage"]
    assert _siblings(tmp_path) == ["cli"]
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
