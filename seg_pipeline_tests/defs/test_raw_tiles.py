"""Each dataset is a partition: its own raw-tiles version, its own history, its own staleness.

The raw tile folders are an observable source asset partitioned by dataset: a new tile in one
dataset changes that dataset's data version only, so only its ingest assets become unsynced, and
each dataset's catalog keeps a materialization history of its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from seg_pipeline.data.synthetic import SyntheticSpec, write_synthetic_dataset
from seg_pipeline.defs.definitions import defs
from seg_pipeline.defs.partitions import DATASET_PARTITIONS
from seg_pipeline.workflows.layout import DATA_ROOT_ENV

RAW_TILES = dg.AssetKey("raw_tiles")
TILE_HEADERS = dg.AssetKey("tile_headers")


def _ingest(instance: dg.DagsterInstance, dataset: str) -> dg.ExecuteInProcessResult:
    """``ingest_job`` for one dataset with the resources a deployment gets (data root from the env)."""
    return defs.resolve_job_def("ingest_job").execute_in_process(instance=instance, partition_key=dataset)


def _observation(instance: dg.DagsterInstance, dataset: str) -> dg.AssetObservation:
    record = instance.get_latest_data_version_record(RAW_TILES, is_source=True, partition_key=dataset)
    assert record is not None and record.asset_observation is not None
    return record.asset_observation


def _headers_status(instance: dg.DagsterInstance, dataset: str) -> StaleStatus:
    resolver = get_stale_status_resolver(instance, [*defs.assets])  # type: ignore[list-item]
    return resolver.get_status(TILE_HEADERS, dataset)


def _write(root: Path, dataset: str, seed: int) -> None:
    spec = SyntheticSpec(grid_rows=2, grid_cols=3, tile_size=32, labeled_fraction=1.0)
    write_synthetic_dataset(root / "raw" / dataset, spec, seed=seed)


def test_a_new_tile_marks_only_its_own_dataset_unsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The data root comes from the environment, as in `make run`: Dagster observes source assets with
    # the resources bound in the Definitions, whatever execute_in_process is handed.
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    _write(tmp_path, "demo", seed=0)
    _write(tmp_path, "fields", seed=1)
    aux = SyntheticSpec(grid_rows=2, grid_cols=2, tile_size=32, class_scheme="aux", item_prefix="oem")
    write_synthetic_dataset(tmp_path / "raw" / "demo_aux", aux, seed=2)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASET_PARTITIONS, ["demo", "fields"])  # demo_aux is no target
        assert _ingest(instance, "demo").success  # observes raw_tiles, then ingests
        assert _ingest(instance, "fields").success
        demo_version = _observation(instance, "demo").tags["dagster/data_version"]
        fields_before = _observation(instance, "fields")
        # Dagster's staleness, per partition: each catalog is as new as its dataset's raw tiles
        assert {_headers_status(instance, d) for d in ("demo", "fields")} == {StaleStatus.FRESH}

        images = tmp_path / "raw" / "fields" / "images"
        shutil.copy(next(images.glob("*.tif")), images / "new_tile.tif")
        # the UI's "Observe sources": a run of raw_tiles alone, which names no dataset and needs none
        observe = defs.resolve_implicit_global_asset_job_def()
        assert observe.execute_in_process(asset_selection=[RAW_TILES], instance=instance).success
        fields_after = _observation(instance, "fields")
        assert fields_after.tags["dagster/data_version"] != fields_before.tags["dagster/data_version"]
        assert fields_after.metadata["files"].value == fields_before.metadata["files"].value + 1
        assert _observation(instance, "demo").tags["dagster/data_version"] == demo_version
        assert _headers_status(instance, "fields") == StaleStatus.STALE
        assert _headers_status(instance, "demo") == StaleStatus.FRESH
        assert _ingest(instance, "fields").success
        assert _headers_status(instance, "fields") == StaleStatus.FRESH

        # each dataset keeps a history of its own
        history = {
            d: instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=TILE_HEADERS, asset_partitions=[d]), limit=10
            ).records
            for d in ("demo", "fields")
        }
        assert {d: len(records) for d, records in history.items()} == {"demo": 1, "fields": 2}
