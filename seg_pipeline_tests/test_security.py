"""Security: no code runs from data files, no path escapes a shard, the UI stays on loopback.

* Every ``torch.load`` in the package and its scripts passes ``weights_only=True``, every
  ``np.load`` ``allow_pickle=False``; nothing calls ``pickle.load``, ``yaml.load`` or
  ``yaml.unsafe_load``; the only unpickling loader (MLflow's pytorch flavor) sits behind
  :func:`seg_pipeline.tracking.load_model`, which the pipeline itself never calls.
* A malicious checkpoint is refused by every entry point that opens checkpoints (inference,
  KD teachers, export, resume), and its payload never runs.
* A run config with a Python-object YAML tag is refused by `dagster job execute` and never runs.
* `make ui` binds the webserver to 127.0.0.1. (Index rows escaping a shard root are refused:
  ``seg_pipeline_tests/data/test_bad_inputs.py``.)
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from seg_pipeline.models.checkpoint import CheckpointError
from seg_pipeline_tests.defs.cli_helpers import dagster_cli, for_dataset, new_dagster_home

REPO = Path(__file__).resolve().parents[1]
#: Python that ships with the project and may open user files.
SCANNED_DIRS = ("seg_pipeline", "deploy", "bench")


def _python_files() -> Iterator[Path]:
    for folder in SCANNED_DIRS:
        yield from sorted((REPO / folder).rglob("*.py"))


def _calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    """``(dotted name, node)`` of every call whose callee is a name or an attribute chain."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts: list[str] = []
            func: ast.expr = node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
                yield ".".join(reversed(parts)), node


def _keyword_is(node: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in node.keywords
    )


def test_no_unsafe_deserialisation_anywhere_in_the_shipped_code() -> None:
    problems, torch_loads = [], 0
    for path in _python_files():
        where = path.relative_to(REPO)
        for name, node in _calls(ast.parse(path.read_text(), str(path))):
            at = f"{where}:{node.lineno}: {name}"
            if name == "torch.load":
                torch_loads += 1
                if not _keyword_is(node, "weights_only", True):
                    problems.append(f"{at} without weights_only=True")
            elif name in ("np.load", "numpy.load") and not _keyword_is(node, "allow_pickle", False):
                problems.append(f"{at} without allow_pickle=False")
            elif name in ("pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                problems.append(at)
            elif name.endswith("pytorch.load_model") and where != Path("seg_pipeline/tracking/registry.py"):
                problems.append(f"{at}: unpickles; go through seg_pipeline.tracking.load_model")
    assert torch_loads >= 1  # the scan sees the checkpoint loader, so it can fail
    assert problems == []


def test_the_pipeline_never_unpickles_a_logged_mlflow_model() -> None:
    """Teachers and champions given as MLflow URIs resolve to their weights-only stage checkpoints."""
    callers = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in (REPO / "seg_pipeline").rglob("*.py")
        if path.relative_to(REPO) != Path("seg_pipeline/tracking/registry.py")
        for name, node in _calls(ast.parse(path.read_text()))
        if name.split(".")[-1] == "load_model" and name != "load_model_weights"
    ]
    assert callers == []


class _Payload:
    """Unpickling this creates a file: a stand-in for a checkpoint that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[Path]]:
        return (pathlib.Path.touch, (self.marker,))


def _open_with_inference(path: Path) -> object:
    from seg_pipeline.inference.predict import load_stage_model

    return load_stage_model(path)


def _open_as_kd_teacher(path: Path) -> object:
    from seg_pipeline.models.loading import load_trained_model

    return load_trained_model(path)


def _open_with_export(path: Path) -> object:
    from seg_pipeline.export import export_model

    return export_model(path, path.parent / "export")


def _open_to_resume(path: Path) -> object:
    from seg_pipeline.settings import LoopSettings
    from seg_pipeline.training.trainer import fit

    model = torch.nn.Conv2d(3, 2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return fit(model, None, [], None, None, optimizer, None, LoopSettings(epochs=1), path.parent, resume=path)


@pytest.mark.parametrize(
    "open_checkpoint",
    [_open_with_inference, _open_as_kd_teacher, _open_with_export, _open_to_resume],
    ids=["inference", "kd-teacher", "export", "resume"],
)
def test_a_malicious_checkpoint_is_refused_and_its_payload_never_runs(
    tmp_path: Path, open_checkpoint: Callable[[Path], object]
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "ckpt" / "best.pt"
    evil.parent.mkdir()
    torch.save({"model": {}, "model_spec": {}, "payload": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"best\.pt.*refuses to unpickle"):
        open_checkpoint(evil)
    assert not marker.exists()
    assert not (tmp_path / "ckpt" / "export").exists()


def test_a_run_config_with_a_python_yaml_tag_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(
        f"ops:\n  tile_headers:\n    config: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    home = new_dagster_home(tmp_path / "home")
    env = {**os.environ, "DAGSTER_HOME": str(home), "SEG_PIPELINE_DATA_ROOT": str(tmp_path / "data")}
    done = dagster_cli(
        "job", "execute", "-m", "seg_pipeline.definitions", "-j", "ingest_job", "-c", str(evil),
        *for_dataset(), env=env,
    )  # fmt: skip
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert re.search(r"could not determine a constructor for the tag .*python/object/apply", output), output[
        -2000:
    ]
    assert "evil.yaml" in output  # names the file
    assert not marker.exists()


def test_make_ui_binds_the_webserver_to_loopback() -> None:
    recipe = re.search(r"^ui:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert recipe, "no ui target in the Makefile"
    commands = recipe.group(1)
    assert "dagster dev" in commands and re.search(r"(-h|--host) 127\.0\.0\.1\b", commands), commands
