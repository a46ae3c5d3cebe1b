"""The command line, called as main(argv) and as ``python -m seg_pipeline.export``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from seg_pipeline.export import CARD_NAME, main
from seg_pipeline_tests.export.helpers import siblings

REPO = Path(__file__).resolve().parents[2]


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
    assert siblings(tmp_path) == ["cli"]
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli(tmp_path: Path) -> None:
    """``python -m seg_pipeline.export`` (the README's command) reaches ``main`` through ``__main__``."""
    missing = tmp_path / "missing.pt"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "seg_pipeline.export",
            "--checkpoint",
            str(missing),
            "--out",
            str(tmp_path / "x"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "export failed:" in done.stderr and "missing.pt does not exist" in done.stderr
    assert siblings(tmp_path) == []
