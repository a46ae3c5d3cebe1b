"""A Dagster instance on which `full_pipeline_job` ran once, shared by the CLI and UI tests.

The job runs as users run it (`dagster job execute ... -c configs/ci.yaml`) against a temp
DAGSTER_HOME and data root, once per test session: it is the most expensive thing the suite does.
"""

from __future__ import annotations

import os

import pytest

from seg_pipeline_tests.defs.cli_helpers import (
    MaterializedPipeline,
    dagster_cli,
    new_dagster_home,
    write_demo_data,
)


@pytest.fixture(scope="session")
def materialized_pipeline(tmp_path_factory: pytest.TempPathFactory) -> MaterializedPipeline:
    """`dagster job execute -m seg_pipeline.definitions -j full_pipeline_job -c configs/ci.yaml`, run once."""
    root = tmp_path_factory.mktemp("pipeline")
    home = new_dagster_home(root / "dagster_home")
    data_root = root / "data"
    write_demo_data(data_root)
    env = {**os.environ, "DAGSTER_HOME": str(home), "SEG_PIPELINE_DATA_ROOT": str(data_root)}
    run = dagster_cli(
        "job",
        "execute",
        "-m",
        "seg_pipeline.definitions",
        "-j",
        "full_pipeline_job",
        "-c",
        "configs/ci.yaml",
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return MaterializedPipeline(home, data_root, run)
