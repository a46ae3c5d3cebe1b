"""Helpers for tests that drive the `dagster` CLI against a temp instance and data root."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from seg_pipeline.data.synthetic import SyntheticSpec, write_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
#: Every asset of the graph, in pipeline order.
PIPELINE_ASSETS = (
    "raw_tiles",
    "tile_headers",
    "dataset_splits",
    "tile_shards",
    "auxiliary_sources",
    "pretrained_model",
    "kd_student_model",
    "extra_members",
    "ensemble_predictions",
    "evaluation_report",
    "champion_model",
    "exported_model",
)
DAGSTER = Path(sys.executable).with_name("dagster")


def instance_for(*datasets: str) -> dg.DagsterInstance:
    """An ephemeral instance with ``datasets`` registered as partitions: in-process runs
    (``dg.materialize``, ``execute_in_process``) check the partition key before any resource starts,
    so they cannot rely on the run registering its own dataset as the CLI does.
    """
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("dataset", list(datasets))
    return instance


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def for_dataset(dataset: str = "demo") -> tuple[str, str]:
    """The `dagster job execute` options that run a job for one dataset (its partition)."""
    return ("--tags", json.dumps({"dagster/partition": dataset}))


@dataclass(frozen=True)
class MaterializedPipeline:
    """Where the run left its instance and outputs, and what the CLI printed."""

    home: Path
    data_root: Path
    run: subprocess.CompletedProcess[str]
    mlflow_ui_url: str = "http://127.0.0.1:5000"  # what the asset pages link to

    @property
    def env(self) -> dict[str, str]:
        """Environment that points Dagster and the pipeline at this instance and data."""
        return {**os.environ, "DAGSTER_HOME": str(self.home), "SEG_PIPELINE_DATA_ROOT": str(self.data_root)}


def new_dagster_home(path: Path, initialize: bool = False) -> Path:
    """An instance folder holding a copy of the repo's dagster.yaml.

    ``initialize`` creates its SQLite schemas first with `dagster instance migrate`, as the Makefile
    does: runs started together on a brand-new instance would race to create the same tables.
    """
    path.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", path / "dagster.yaml")
    if initialize:
        env = {**os.environ, "DAGSTER_HOME": str(path)}
        done = dagster_cli("instance", "migrate", env=env, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return path


def write_demo_data(data_root: Path, rows: int = 3, cols: int = 4, tile_size: int = 32) -> None:
    """Tiny target (demo) and auxiliary (demo_aux) datasets as the pipeline expects them."""
    target = SyntheticSpec(grid_rows=rows, grid_cols=cols, tile_size=tile_size)
    write_synthetic_dataset(data_root / "raw" / "demo", target, seed=1)
    aux = SyntheticSpec(grid_rows=1, grid_cols=3, tile_size=32, class_scheme="aux", item_prefix="oem")
    write_synthetic_dataset(data_root / "raw" / "demo_aux", aux, seed=2)


def dagster_cli(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the `dagster` CLI of this venv from the repo root, capturing its output."""
    return subprocess.run(
        [str(DAGSTER), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM a server the test started, then SIGKILL it if it has not gone within ``timeout``.

    A server started with ``start_new_session=True`` leads its own process group, and the whole
    group is stopped: the processes it started itself (the daemon's code server, the MLflow UI's
    workers) would otherwise outlive the test.
    """
    try:
        group = process.pid if os.getpgid(process.pid) == process.pid else None
    except ProcessLookupError:  # the leader already exited and was reaped; what it started may not have
        group = process.pid

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group is not None:
                os.killpg(group, sig)
            else:
                process.send_signal(sig)

    send(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()
    send(signal.SIGKILL)  # what the leader started and left behind
