"""`dagster job execute -m seg_pipeline.definitions -j ...` as a user runs it, against a temp DAGSTER_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seg_pipeline.defs.job_config import job_sections
from seg_pipeline_tests.defs.cli_helpers import (
    REPO,
    MaterializedPipeline,
    dagster_cli,
    for_dataset,
    new_dagster_home,
    write_demo_data,
)


def _execute(job: str, home: Path, data_root: Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_HOME": str(home), "SEG_PIPELINE_DATA_ROOT": str(data_root)}
    return dagster_cli(
        "job", "execute", "-m", "seg_pipeline.definitions", "-j", job, "-c", str(config), *for_dataset(),
        env=env, timeout=300,
    )  # fmt: skip


def _latest_data_versions(home: Path) -> dict[str, str]:
    code = (
        "import dagster as dg, json\n"
        "inst = dg.DagsterInstance.get()\n"
        "out = {}\n"
        "for key in ('tile_headers', 'dataset_splits', 'tile_shards', 'auxiliary_sources'):\n"
        "    ev = inst.get_latest_materialization_event(dg.AssetKey(key))\n"
        "    out[key] = ev.asset_materialization.tags['dagster/data_version']\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_ingest_job_cli_twice_reports_same_data_versions(tmp_path: Path) -> None:
    home = new_dagster_home(tmp_path / "dagster_home")
    data_root = tmp_path / "data"
    write_demo_data(data_root, rows=2, cols=3)

    # the ingest sections of configs/ci.yaml, as `python -m seg_pipeline.defs.job_config` prints them
    ingest_config = tmp_path / "ingest.yaml"
    sections, _dropped = job_sections(
        "ingest_job", yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    )
    ingest_config.write_text(yaml.safe_dump(sections))
    first = _execute("ingest_job", home, data_root, ingest_config)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (data_root / "processed" / "demo" / "manifest.json").exists()
    versions = _latest_data_versions(home)

    # A full-pipeline config cannot go to ingest_job as it is (Dagster refuses the other assets'
    # sections); `seg-pipeline ingest` runs ingest_job on that file's ingest sections.
    refused = dagster_cli(
        "job", "execute", "-m", "seg_pipeline.definitions", "-j", "ingest_job", "-c", "configs/ci.yaml",
        *for_dataset(),
        env={**os.environ, "DAGSTER_HOME": str(home), "SEG_PIPELINE_DATA_ROOT": str(data_root)}, timeout=300,
    )  # fmt: skip
    assert refused.returncode != 0 and "pretrained_model" in refused.stdout + refused.stderr
    second = subprocess.run(
        [sys.executable, "-m", "seg_pipeline.cli", "--data-root", str(data_root), "ingest",
         "--config", "configs/ci.yaml", "--dataset", "demo"],
        cwd=REPO, env={**os.environ, "DAGSTER_HOME": str(home)}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert "leaving out the sections of other jobs' assets: ensemble_predictions" in second.stderr
    assert _latest_data_versions(home) == versions
    assert "6 unchanged" in second.stdout + second.stderr  # the catalog re-read nothing


@pytest.mark.slow
def test_full_pipeline_job_cli_with_the_ci_config(materialized_pipeline: MaterializedPipeline) -> None:
    """What CI users run: `dagster job execute -m seg_pipeline.definitions -j full_pipeline_job -c ...`."""
    data_root = materialized_pipeline.data_root
    reports = list((data_root / "reports").glob("*/report.md"))
    assert len(reports) == 1 and "ensemble" in reports[0].read_text()
    assert list((data_root / "predictions").glob("*/ensemble/*.tif"))
    assert (data_root / "mlflow" / "mlflow.db").exists()
    assert "RUN_SUCCESS" in materialized_pipeline.run.stdout + materialized_pipeline.run.stderr


@pytest.mark.slow
def test_the_champion_predicts_from_the_command_line_as_the_report_scored_it(
    materialized_pipeline: MaterializedPipeline, tmp_path: Path
) -> None:
    """`seg-pipeline predict --model models:/demo_segmenter@champion`: the registered bundle's members,
    weights, class offsets and TTA views, whatever the command line's defaults."""
    import numpy as np
    import rasterio

    data_root = materialized_pipeline.data_root
    stored = json.loads((materialized_pipeline.home / "storage" / "champion_model" / "demo.json").read_text())
    deployed = stored["value"]["deployed"]
    scored = (
        "ensemble"
        if deployed["kind"] == "ensemble" or deployed["class_bias"]
        else (deployed["members"][0]["name"])
    )
    predictions = next((data_root / "predictions").iterdir())
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for written in sorted((predictions / scored).glob("*.tif"))[:2]:
        item = written.stem
        source = next((data_root / "processed" / "demo").glob(f"*/shard-*/inputs/{item}.*"))
        (inputs / source.name).write_bytes(source.read_bytes())
    done = subprocess.run(
        [sys.executable, "-m", "seg_pipeline.cli", "--data-root", str(data_root), "predict",
         "--model", "models:/demo_segmenter@champion", "--input", str(inputs),
         "--output", str(tmp_path / "out")],
        cwd=REPO, env=materialized_pipeline.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for ours in sorted((tmp_path / "out").glob("*.tif")):
        with rasterio.open(ours) as a, rasterio.open(predictions / scored / ours.name) as b:
            assert (a.read(1) == b.read(1)).mean() > 0.999, ours.name
    assert len(list((tmp_path / "out").glob("*.tif"))) == 2
    # an ensemble cannot be one of several --model: it is a whole model
    mixed = subprocess.run(
        [sys.executable, "-m", "seg_pipeline.cli", "--data-root", str(data_root), "predict",
         "--model", "models:/demo_segmenter@champion", "--model", "models:/demo_student/1",
         "--input", str(inputs), "--output", str(tmp_path / "mixed")],
        cwd=REPO, env=materialized_pipeline.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert mixed.returncode == 2 and "give it as the only --model" in mixed.stderr
    assert np.isfinite(stored["value"]["candidate_score"])
