"""``seg-pipeline train`` and ``seg-pipeline export`` as a user runs them: the same settings schema as the
Dagster assets (config files, then ``key=value`` overrides), seed 004's experiment folder, ``--resume``,
the KD stage from a stage-1 checkpoint, and an export of a registered model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seg_pipeline.data.synthetic import SyntheticSpec
from seg_pipeline_tests.conftest import ingest_synthetic, scratch_dir

CONFIG = Path(__file__).parents[1] / "configs" / "ci.yaml"
#: CI size: 1 step per epoch of 2 patches of 32 px.
TINY = ["loop.max_steps_per_epoch=1", "loader.batch_size=2", "loop.log_every_n_steps=0"]


def cli(*args: str, data_root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, "-m", "seg_pipeline.cli", "--data-root", str(data_root), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def data_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = scratch_dir(request, tmp_path_factory, "cli-train")
    ingest_synthetic(root, "demo", SyntheticSpec(grid_rows=2, grid_cols=3, tile_size=32))
    aux = SyntheticSpec(grid_rows=2, grid_cols=2, tile_size=32, class_scheme="aux", item_prefix="oem")
    ingest_synthetic(root, "demo_aux", aux, seed=1)
    return root


def experiment(stdout: str) -> Path:
    line = next(line for line in stdout.splitlines() if line.startswith("experiment folder: "))
    return Path(line.removeprefix("experiment folder: "))


def test_bad_overrides_are_one_line_naming_the_field_before_any_work(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "experiments"
    done = cli("train", "--stage", "pretrain", "--config", str(CONFIG), "--output", str(out),
               "loop.epochs=0", "optimizer.lrr=3", data_root=data_root)  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("seg-pipeline train: error:")
    assert "loop.epochs=0" in line and "optimizer.lrr: unknown setting" in line  # every bad field, named
    unknown = cli(
        "train", "--stage", "pretrain", "--dataset", "nowhere", "--output", str(out), data_root=data_root
    )
    assert unknown.returncode == 2 and "seg-pipeline ingest" in unknown.stderr
    assert not out.exists()  # nothing was written for a run that could not start


@pytest.mark.slow
def test_pretrain_then_resume_then_kd_then_export(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "experiments"
    first = cli("train", "--stage", "pretrain", "--config", str(CONFIG), "--output", str(out),
                "--name", "seed", *TINY, "loop.epochs=2", "optimizer.lr=0.002",
                data_root=data_root)  # fmt: skip
    assert first.returncode == 0, first.stderr
    folder = experiment(first.stdout)
    assert folder.parent == out and folder.name.endswith("-seed")
    # Seed 004's layout: checkpoints, logs, per-epoch metrics CSV, validation results; the config it ran.
    assert {p.name for p in folder.iterdir()} >= {"checkpoints", "logs", "metrics", "results", "config.json"}
    config = json.loads((folder / "config.json").read_text())
    assert config["settings"]["optimizer"]["lr"] == 0.002  # the override
    assert config["settings"]["model"]["encoder"] == "mobilenet_v2"  # from ci.yaml
    assert config["auxiliary"] == ["demo_aux"]  # ci.yaml's auxiliary_sources
    rows = list(csv.DictReader((folder / "metrics" / "metrics.csv").open()))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert {"train/loss", "val/loss", "val/miou", "val/f1", "val/pooled/iou", "val/detection/f1"} <= set(
        rows[0]
    )
    assert "epoch 2/2 done" in (folder / "logs" / "train.log").read_text()
    scores = json.loads((folder / "results" / "metrics.json").read_text())
    predicted = sorted(p.name for p in (folder / "results" / "val_predictions").glob("*.tif"))
    assert predicted and scores["split"] == "val" and 0.0 <= scores["miou"] <= 1.0

    # --resume last.pt continues the same run in its own folder, up to the new epoch count; here on
    # two DDP ranks that the command starts with torchrun (gloo on the CPU).
    resumed = cli("train", "--stage", "pretrain", "--config", str(CONFIG), "--output", str(out), *TINY,
                  "loop.epochs=3", "--resume", str(folder / "checkpoints" / "last.pt"), "--no-tracking",
                  "--nproc-per-node", "2", data_root=data_root)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert experiment(resumed.stdout) == folder
    assert json.loads((folder / "results" / "model.json").read_text())["world_size"] == 2
    assert "resumed from" in (folder / "logs" / "train.log").read_text()
    assert [row["epoch"] for row in csv.DictReader((folder / "metrics" / "metrics.csv").open())] == [
        "1",
        "2",
        "3",
    ]

    kd = cli("train", "--stage", "kd", "--config", str(CONFIG), "--output", str(out), *TINY, "--no-tracking",
             "--teacher", str(folder / "checkpoints" / "best.pt"), "loop.monitor=val/pooled/iou",
             data_root=data_root)  # fmt: skip
    assert kd.returncode == 0, kd.stderr
    assert "best val/pooled/iou" in kd.stdout
    kd_config = json.loads((experiment(kd.stdout) / "config.json").read_text())
    assert kd_config["stage"] == "kd" and kd_config["teacher"].endswith("best.pt")

    # The first run registered its model: export it by registry reference.
    exported = cli("export", "--checkpoint", "models:/seg_pipeline_cli_pretrained/1", "--out",
                   str(tmp_path / "export"), "--formats", "torchscript", "--example-size", "64",
                   data_root=data_root)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["files"]["torchscript"].endswith(".pt")
    assert (tmp_path / "export" / "model_card.json").is_file()


def test_a_monitor_validation_never_logs_is_refused_before_training(data_root: Path, tmp_path: Path) -> None:
    done = cli("train", "--stage", "pretrain", "--config", str(CONFIG), "--output", str(tmp_path), *TINY,
               "loop.monitor=val/fire_iou", "--no-tracking", data_root=data_root)  # fmt: skip
    assert done.returncode == 2
    assert "loop.monitor='val/fire_iou' is not a validation metric" in done.stderr
    assert "val/pooled/iou" in done.stderr  # the message lists what can be monitored
    assert not list(tmp_path.glob("*/checkpoints/*.pt"))
