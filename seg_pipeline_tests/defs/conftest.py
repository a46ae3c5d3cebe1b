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
    for_dataset,
    free_loopback_port,
    new_dagster_home,
    write_demo_data,
)


@pytest.fixture(scope="session")
def materialized_pipeline(tmp_path_factory: pytest.TempPathFactory) -> MaterializedPipeline:
    """`dagster job execute -m seg_pipeline.definitions -j full_pipeline_job -c configs/ci.yaml` for the
    demo dataset (``--tags '{"dagster/partition": "demo"}'``), run once."""
    root = tmp_path_factory.mktemp("pipeline")
    home = new_dagster_home(root / "dagster_home")
    data_root = root / "data"
    write_demo_data(data_root)
    env = {**os.environ, "DAGSTER_HOME": str(home), "SEG_PIPELINE_DATA_ROOT": str(data_root)}
    # the links and pictures on the asset pages point at an MLflow UI the browser test can start
    mlflow_ui_url = f"http://127.0.0.1:{free_loopback_port()}"
    resources = root / "resources.yaml"
    resources.write_text(f"resources:\n  mlflow:\n    config:\n      mlflow_ui_url: {mlflow_ui_url}\n")
    run = dagster_cli(
        "job",
        "execute",
        "-m",
        "seg_pipeline.definitions",
        "-j",
        "full_pipeline_job",
        "-c",
        "configs/ci.yaml",
        "-c",
        str(resources),
        *for_dataset("demo"),
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return MaterializedPipeline(home, data_root, run, mlflow_ui_url)
