"""Three `dagster job execute` runs at once on one SQLite-backed instance: no lock errors, no lost events."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from seg_pipeline_tests.defs.cli_helpers import DAGSTER, REPO, for_dataset, new_dagster_home, write_demo_data

CONCURRENT_RUNS = 3
INGEST_ASSETS = ("tile_headers", "dataset_splits", "tile_shards", "auxiliary_sources")
LOCK_ERRORS = ("database is locked", "OperationalError", "SQLITE_BUSY")


@pytest.mark.slow
def test_three_concurrent_runs_share_one_instance(tmp_path: Path) -> None:
    home = new_dagster_home(tmp_path / "dagster_home", initialize=True)
    procs = []
    for n in range(CONCURRENT_RUNS):
        data_root = tmp_path / f"data{n}"  # one data root each: the runs share only the instance
        write_demo_data(data_root, rows=6, cols=6, tile_size=128)  # ingest long enough to overlap
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "SEG_PIPELINE_DATA_ROOT": str(data_root),
        }
        procs.append(
            subprocess.Popen(
                # One dataset name in each: the runs race to register the same partition too.
                [
                    str(DAGSTER),
                    "job",
                    "execute",
                    "-m",
                    "seg_pipeline.definitions",
                    "-j",
                    "ingest_job",
                    *for_dataset("demo"),
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
        for error in LOCK_ERRORS:
            assert error not in output, output[-3000:]

    instance = dg.DagsterInstance.from_config(str(home))
    try:
        runs = instance.get_runs()
        assert len(runs) == CONCURRENT_RUNS
        windows = sorted((r.start_time, r.end_time) for r in instance.get_run_records())
        overlapping = sum(a[1] > b[0] for a, b in itertools.combinations(windows, 2))
        assert overlapping >= 1, f"no two runs overlapped, so nothing was concurrent: {windows}"
        print("overlapping run pairs:", overlapping, [round(end - start, 2) for start, end in windows])
        assert {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}
        for run in runs:
            records = instance.all_logs(run.run_id)
            materialized = sorted(
                r.dagster_event.asset_key.path[-1]
                for r in records
                if r.is_dagster_event and r.dagster_event_type == dg.DagsterEventType.ASSET_MATERIALIZATION
            )
            assert materialized == sorted(INGEST_ASSETS), (run.run_id, materialized)
            checks = [
                r
                for r in records
                if r.is_dagster_event and r.dagster_event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
            ]
            assert checks and all(r.dagster_event.event_specific_data.passed for r in checks)
            types = [r.dagster_event_type for r in records if r.is_dagster_event]
            assert types.count(dg.DagsterEventType.RUN_START) == 1, types
            assert types.count(dg.DagsterEventType.RUN_SUCCESS) == 1, types
            steps = types.count(dg.DagsterEventType.STEP_START)  # assets and their checks
            assert steps >= len(INGEST_ASSETS) and types.count(dg.DagsterEventType.STEP_SUCCESS) == steps
        for asset in INGEST_ASSETS:  # every run's materialization is in the asset's history
            events = instance.fetch_materializations(dg.AssetKey(asset), limit=10).records
            assert sorted(e.run_id for e in events) == sorted(run.run_id for run in runs), asset
    finally:
        instance.dispose()
