"""The raw tile folders as an observable source asset: new tiles change its data version."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest

from seg_pipeline.data.synthetic import SyntheticSpec, write_synthetic_dataset
from seg_pipeline.defs.definitions import defs
from seg_pipeline.workflows.layout import DATA_ROOT_ENV

RAW_TILES = dg.AssetKey("raw_tiles")


def _ingest(instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    """``ingest_job`` with the resources a deployment gets: the data root from the environment."""
    return defs.resolve_job_def("ingest_job").execute_in_process(instance=instance)


def _observed_version(instance: dg.DagsterInstance) -> str:
    record = instance.get_latest_data_version_record(RAW_TILES, is_source=True)
    assert record is not None
    return record.asset_observation.data_version  # type: ignore[union-attr]


def _observed_files(instance: dg.DagsterInstance) -> int:
    record = instance.get_latest_data_version_record(RAW_TILES, is_source=True)
    assert record is not None
    return int(record.asset_observation.metadata["files"].value)  # type: ignore[union-attr]


def test_a_new_tile_changes_the_raw_tiles_version_and_the_catalog_records_which_it_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The data root comes from the environment, as in `make run`: Dagster observes source assets with
    # the resources bound in the Definitions, whatever execute_in_process is handed.
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    spec = SyntheticSpec(grid_rows=2, grid_cols=3, tile_size=32, labeled_fraction=1.0)
    write_synthetic_dataset(tmp_path / "raw" / "demo", spec, seed=0)
    aux = SyntheticSpec(grid_rows=2, grid_cols=2, tile_size=32, class_scheme="aux", item_prefix="oem")
    write_synthetic_dataset(tmp_path / "raw" / "demo_aux", aux, seed=1)
    with dg.instance_for_test() as instance:
        assert _ingest(instance).success  # the job observes raw_tiles, then ingests
        first = _observed_version(instance)
        files_before = _observed_files(instance)
        headers = instance.get_latest_materialization_event(dg.AssetKey("tile_headers"))
        assert headers is not None
        tags = headers.asset_materialization.tags  # type: ignore[union-attr]
        assert tags["dagster/input_data_version/raw_tiles"] == first  # what lineage compares

        images = tmp_path / "raw" / "demo" / "images"
        shutil.copy(next(images.glob("*.tif")), images / "new_tile.tif")
        assert _ingest(instance).success
        second = _observed_version(instance)
        assert second != first
        assert _observed_files(instance) == files_before + 1
