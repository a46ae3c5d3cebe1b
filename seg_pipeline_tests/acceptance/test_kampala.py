"""Real data through the README's bring-your-own-data path: ``configs/kampala.yaml`` as shipped, run
with the `dagster` CLI on copies of real Kampala chips (target) and Nairobi chips (0/255 masks,
auxiliary), with a second config file that only points at the copies and shrinks the stages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest
import yaml

from seg_pipeline.data.catalog import read_catalog_mask_values
from seg_pipeline_tests.conftest import copy_real
from seg_pipeline_tests.defs.cli_helpers import dagster_cli, for_dataset, new_dagster_home

SMALL = {
    "loop": {"epochs": 1, "max_steps_per_epoch": 2, "ema_decay": None},
    "loader": {"batch_size": 4},
    "scheduler": {"warmup_epochs": 0.0},
}


@pytest.mark.slow
def test_configs_kampala_runs_the_full_pipeline_on_real_tiles(tmp_path: Path) -> None:
    raw = tmp_path / "shared"
    kampala, nairobi = copy_real("kampala", raw), copy_real("nairobi", raw)
    override = {
        "ops": {
            "tile_headers": {"config": {"raw_dir": str(kampala)}},
            "auxiliary_sources": {
                "config": {
                    "datasets": [
                        {
                            "dataset_id": "nairobi",
                            "raw_dir": str(nairobi),
                            "class_names": ["background", "building"],
                        }
                    ]
                }
            },
            "pretrained_model": {"config": SMALL},
            "kd_student_model": {"config": SMALL},
            "extra_members": {"config": SMALL},  # the shipped config's second student, shrunk
            "ensemble_predictions": {"config": {"tta": {"scales": [1.0], "flips": ["none"]}}},
            "evaluation_report": {"config": {"miou_floor": 0.0, "ensemble_tolerance": 1.0}},
        }
    }
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(override))
    home = new_dagster_home(tmp_path / "home")
    data_root = tmp_path / "data"
    env = {**os.environ, "DAGSTER_HOME": str(home), "SEG_PIPELINE_DATA_ROOT": str(data_root)}
    run = dagster_cli(
        "job", "execute", "-m", "seg_pipeline.definitions", "-j", "full_pipeline_job",
        "-c", "configs/kampala.yaml", "-c", str(small), *for_dataset("kampala"), env=env, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # Nairobi's 0/255 masks were detected and recoded; Kampala's 0/1 masks were left alone.
    assert read_catalog_mask_values(data_root / "processed" / "nairobi" / "headers.parquet") == {255: 1}
    assert read_catalog_mask_values(data_root / "processed" / "kampala" / "headers.parquet") == {}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        headers = instance.get_latest_materialization_event(dg.AssetKey("tile_headers"))
        assert headers is not None and headers.asset_materialization is not None
        meta = headers.asset_materialization.metadata
        building = [r for r in meta["class_histogram"].value.records if r.data["class"] == "building"]
        assert building[0].data["pixels"] > 0
        aux = instance.get_latest_materialization_event(dg.AssetKey("auxiliary_sources"))
        assert aux is not None
    reports = list((data_root / "reports").rglob("metrics.json"))
    assert reports, "the evaluation report was not written"
    report = json.loads(max(reports, key=lambda p: p.stat().st_mtime).read_text())
    assert "building" in json.dumps(report)
    assert "seed_b" in json.dumps(report)  # the shipped config's second KD student was scored
    # The raw copies are untouched: nothing was written next to the tiles.
    assert sorted(p.name for p in (kampala / "chips").iterdir()) == sorted(
        p.name for p in (Path(__file__).parents[1] / "fixtures" / "real" / "kampala" / "chips").iterdir()
    )
