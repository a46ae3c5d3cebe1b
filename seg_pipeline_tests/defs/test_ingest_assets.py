"""Ingest assets materialized in-process on a real (ephemeral) Dagster instance."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from seg_pipeline.contracts import AuxiliarySet, ShardSet
from seg_pipeline.data.synthetic import SyntheticSpec, write_synthetic_dataset
from seg_pipeline.defs.io_manager import ContractIOManager
from seg_pipeline.defs.metadata import type_name
from seg_pipeline.defs.pipeline import ingest
from seg_pipeline.defs.resources import StorageResource
from seg_pipeline_tests.defs.cli_helpers import instance_for

ASSETS = [ingest.tile_headers, ingest.dataset_splits, ingest.tile_shards, ingest.auxiliary_sources]
CHECKS = [
    ingest.quarantine_below_threshold,
    ingest.splits_leakage_free,
    ingest.shards_match_headers,
    ingest.auxiliary_quarantine_below_threshold,
]


def _materialize(
    data_root: Path, headers: dict | None = None, splits: dict | None = None, dataset: str = "demo"
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [*ASSETS, *CHECKS],
        partition_key=dataset,
        instance=instance_for(dataset),
        resources={
            "storage": StorageResource(data_root=str(data_root)),
            "io_manager": ContractIOManager(base_dir=str(data_root / "storage")),
        },
        run_config=dg.RunConfig(
            ops={
                "tile_headers": {"config": headers or {}},
                "dataset_splits": {"config": splits or {}},
                "auxiliary_sources": {"config": {"datasets": [{"dataset_id": "demo_aux"}]}},
            }
        ),
        raise_on_error=False,
    )


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    spec = SyntheticSpec(grid_rows=3, grid_cols=4, tile_size=32, labeled_fraction=0.75)
    write_synthetic_dataset(tmp_path / "raw" / "demo", spec, seed=3)
    aux = SyntheticSpec(grid_rows=2, grid_cols=2, tile_size=32, class_scheme="aux", item_prefix="oem")
    write_synthetic_dataset(tmp_path / "raw" / "demo_aux", aux, seed=4)
    return tmp_path


def _versions(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    return {
        mat.asset_key.to_user_string(): mat.tags["dagster/data_version"]
        for mat in result.asset_materializations_for_node("tile_headers")
        + result.asset_materializations_for_node("dataset_splits")
        + result.asset_materializations_for_node("tile_shards")
    }


def test_ingest_materializes_catalog_splits_shards_and_checks_pass(data_root: Path) -> None:
    result = _materialize(data_root)
    assert result.success
    processed = data_root / "processed" / "demo"
    for name in ("headers.parquet", "splits.parquet", "manifest.json", "quarantine.json"):
        assert (processed / name).exists(), name
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 4 and all(c.passed for c in checks)
    auxiliary = result.output_for_node("auxiliary_sources")
    assert isinstance(auxiliary, AuxiliarySet) and [s.dataset_id for s in auxiliary.sources] == ["demo_aux"]
    aux = auxiliary.sources[0]
    assert aux.catalog.class_names[0] == "unknown" and sum(aux.items.values()) == 4
    shards = result.output_for_node("tile_shards")
    assert isinstance(shards, ShardSet) and sum(shards.items.values()) == 12
    meta = result.asset_materializations_for_node("tile_headers")[0].metadata
    assert meta["tiles"].value == 12 and meta["tiles_quarantined"].value == 0
    assert "class_histogram" in meta


def test_the_catalogs_columns_are_described_as_they_are_stored(data_root: Path) -> None:
    """The asset's column schema is the parquet file's own: every column, its type and meaning."""
    import pyarrow.parquet as pq

    result = _materialize(data_root)
    processed = data_root / "processed" / "demo"
    for node, file in (("tile_headers", "headers.parquet"), ("dataset_splits", "splits.parquet")):
        schema = result.asset_materializations_for_node(node)[0].metadata["dagster/column_schema"].value
        stored = pq.read_schema(processed / file)
        assert [(c.name, c.type) for c in schema.columns] == [(f.name, type_name(f.type)) for f in stored]
        assert all(c.description for c in schema.columns), node
    columns = {c.name: c for c in result.asset_materializations_for_node("tile_headers")[0]
               .metadata["dagster/column_schema"].value.columns}  # fmt: skip
    assert columns["class_counts"].type == "list<int64>" and columns["width"].type == "int64"
    assert "recoding" in columns["class_counts"].description


def test_rerun_over_unchanged_data_keeps_data_versions(data_root: Path) -> None:
    first = _versions(_materialize(data_root))
    second_result = _materialize(data_root)
    assert _versions(second_result) == first
    meta = second_result.asset_materializations_for_node("tile_headers")[0].metadata
    assert meta["tiles_reused"].value == 12 and meta["tiles_read"].value == 0


def test_too_many_quarantined_tiles_fail_the_blocking_check_and_stop_downstream(data_root: Path) -> None:
    for image in sorted((data_root / "raw" / "demo" / "images").glob("*.tif"))[:8]:
        image.write_bytes(b"not a raster")
    result = _materialize(data_root, headers={"max_quarantine_fraction": 0.25})
    check = next(
        c for c in result.get_asset_check_evaluations() if c.check_name == "quarantine_below_threshold"
    )
    assert not check.passed
    assert not result.asset_materializations_for_node("tile_shards")
    reasons = (data_root / "processed" / "demo" / "quarantine.json").read_text()
    assert "not a readable raster" in reasons


def test_a_choice_outside_the_schema_is_refused_at_launch_with_the_choices(data_root: Path) -> None:
    with pytest.raises(dg.DagsterInvalidConfigError, match="random") as caught:
        _materialize(data_root, splits={"policy": "random"})
    assert "supervised" in str(caught.value) and not (data_root / "processed").exists()


def test_a_bound_violation_fails_the_run_before_any_step(data_root: Path) -> None:
    result = _materialize(data_root, splits={"metrics_fraction": 1.5})
    assert not result.success
    assert not [e for e in result.all_events if e.event_type_value == "STEP_START"]  # nothing ran
    failure = next(e for e in result.all_events if e.is_failure)
    assert "dataset_splits.metrics_fraction=1.5: Input should be less than or equal to 1" in str(
        failure.event_specific_data
    )
    assert not (data_root / "processed").exists()
