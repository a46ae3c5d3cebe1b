"""The run queue of dagster.yaml as the daemon enforces it: one GPU-tagged run at a time.

Four `ingest_job` runs are queued with `dagster job launch` (two tagged ``seg_pipeline/gpu=true``,
two untagged, each with its own data root through the storage resource's run config); a real
`dagster-daemon run` then launches them. Polling the run statuses, never two GPU-tagged runs are
starting or running at once, while the queue as a whole does run several at once (so the limit,
not a serial queue, kept them apart).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest

from seg_pipeline_tests.defs.cli_helpers import (
    DAGSTER,
    REPO,
    dagster_cli,
    new_dagster_home,
    stop_process,
    write_demo_data,
)

GPU_TAG = {"seg_pipeline/gpu": "true"}
PARTITION = {"dagster/partition": "demo"}  # every run ingests its own data root's demo dataset
DAEMON = DAGSTER.with_name("dagster-daemon")


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.mark.slow
def test_queue_runs_one_gpu_tagged_run_at_a_time(tmp_path: Path) -> None:
    home = new_dagster_home(tmp_path / "dagster_home", initialize=True)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    gpu_runs = 2
    for n, tags in enumerate([GPU_TAG] * gpu_runs + [{}] * 2):
        data_root = tmp_path / f"data{n}"
        write_demo_data(data_root, rows=2, cols=2)
        run_config = {"resources": {"storage": {"config": {"data_root": str(data_root)}}}}
        launched = dagster_cli(
            "job", "launch", "-m", "seg_pipeline.definitions", "-j", "ingest_job",
            "--config-json", json.dumps(run_config), "--tags", json.dumps({**tags, **PARTITION}),
            env=env, timeout=120,
        )  # fmt: skip
        assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-2000:]

    instance = dg.DagsterInstance.from_config(str(home))
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [str(DAEMON), "run", "-m", "seg_pipeline.definitions"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # stop_process stops what it starts, too
    )
    try:
        assert {r.status for r in instance.get_runs()} == {dg.DagsterRunStatus.QUEUED}
        deadline = time.monotonic() + 400
        finished = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
        in_flight = (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED)
        most_in_flight = most_gpu_in_flight = 0
        while True:
            runs = instance.get_runs()
            busy = [r for r in runs if r.status in in_flight]
            most_in_flight = max(most_in_flight, len(busy))
            most_gpu_in_flight = max(
                most_gpu_in_flight, sum(r.tags.get("seg_pipeline/gpu") == "true" for r in busy)
            )
            if all(r.status in finished for r in runs):
                break
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            assert time.monotonic() < deadline, [r.status for r in runs]
            time.sleep(0.2)
        records = instance.get_run_records()
        assert {r.dagster_run.status for r in records} == {dg.DagsterRunStatus.SUCCESS}
        gpu = [r for r in records if r.dagster_run.tags.get("seg_pipeline/gpu") == "true"]
        assert len(gpu) == gpu_runs
        assert not _overlap(*[(r.start_time, r.end_time) for r in gpu])  # the tag limit held
        assert most_gpu_in_flight == 1
        assert most_in_flight >= 2, "the queue ran everything one by one: the limit proved nothing"
    finally:
        stop_process(daemon, timeout=30)
        log.close()
        instance.dispose()
