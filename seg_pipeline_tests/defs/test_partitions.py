"""Datasets as partitions: which runs register a dataset, and which are refused before any step."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest

from seg_pipeline.defs.partitions import DATASET_PARTITIONS, register_datasets, register_run_dataset
from seg_pipeline.defs.resources import NO_RUN_CONFIG
from seg_pipeline.workflows.layout import DataLayout
from seg_pipeline_tests.defs.cli_helpers import dagster_cli, for_dataset, new_dagster_home, write_demo_data


def _tags(dataset: str) -> dict[str, str]:
    return {"dagster/partition": dataset}


def test_a_run_for_a_dataset_with_a_raw_folder_registers_it(tmp_path: Path) -> None:
    (tmp_path / "raw" / "fields").mkdir(parents=True)
    instance = dg.DagsterInstance.ephemeral()
    layout = DataLayout.at(tmp_path)
    assert register_run_dataset(instance, _tags("fields"), {}, layout) == "fields"
    assert instance.get_dynamic_partitions(DATASET_PARTITIONS) == ["fields"]
    assert register_run_dataset(instance, _tags("fields"), {}, layout) is None  # once is enough


def test_a_raw_dir_in_the_run_config_stands_for_the_raw_folder(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    config = {"ops": {"tile_headers": {"config": {"raw_dir": str(tmp_path / "elsewhere")}}}}
    assert register_run_dataset(instance, _tags("kampala"), config, DataLayout.at(tmp_path)) == "kampala"


def test_a_dataset_without_tiles_is_refused_naming_the_folder_it_looked_for(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASET_PARTITIONS, ["demo"])
    with pytest.raises(dg.Failure) as refused:
        register_run_dataset(instance, _tags("demo_typo"), {}, DataLayout.at(tmp_path))
    message = refused.value.description or ""
    assert str(tmp_path / "raw" / "demo_typo") in message and "registered dataset (demo)" in message
    assert instance.get_dynamic_partitions(DATASET_PARTITIONS) == ["demo"]  # no partition left behind


def test_an_id_that_is_no_plain_folder_name_is_refused_before_any_folder_is_made(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    escape = "../../escaped_id"
    (tmp_path / "root").mkdir()
    with pytest.raises(dg.Failure, match=r"dataset partition '\.\./\.\./escaped_id'.*no '/', '\.\.'"):
        register_run_dataset(instance, _tags(escape), {}, DataLayout.at(tmp_path / "root"))
    assert instance.get_dynamic_partitions(DATASET_PARTITIONS) == []
    made = [p for p in (tmp_path / "escaped_id", tmp_path.parent / "escaped_id") if p.exists()]
    assert made == [] and list((tmp_path / "root").iterdir()) == []


def test_a_run_of_a_partitioned_job_must_name_its_dataset(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    layout = DataLayout.at(tmp_path)
    with pytest.raises(dg.Failure, match=r"names none.*--partition <dataset>.*dagster/partition"):
        register_run_dataset(instance, {}, {}, layout, partitioned=True)
    assert register_run_dataset(instance, {}, {}, layout, partitioned=False) is None  # raw_tiles observation


def test_registering_twice_adds_each_dataset_once() -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert register_datasets(instance, ["a", "b", "a"]) == ["a", "b"]
    assert register_datasets(instance, ["b", "c"]) == ["c"]
    assert instance.get_dynamic_partitions(DATASET_PARTITIONS) == ["a", "b", "c"]


@pytest.mark.slow
def test_the_cli_says_how_to_name_a_dataset_and_which_folder_is_missing(tmp_path: Path) -> None:
    home = new_dagster_home(tmp_path / "home")
    data_root = tmp_path / "data"
    write_demo_data(data_root, rows=1, cols=2)
    env = {**os.environ, "DAGSTER_HOME": str(home), "SEG_PIPELINE_DATA_ROOT": str(data_root)}
    command = ("job", "execute", "-m", "seg_pipeline.definitions", "-j", "ingest_job")
    unnamed = dagster_cli(*command, env=env, timeout=300)
    assert unnamed.returncode != 0
    assert '--tags \'{"dagster/partition": "<dataset>"}\'' in unnamed.stdout + unnamed.stderr
    typo = dagster_cli(*command, *for_dataset("dmeo"), env=env, timeout=300)
    assert (
        typo.returncode != 0 and f"{data_root / 'raw' / 'dmeo'} does not exist" in typo.stdout + typo.stderr
    )
    assert not (data_root / "processed").exists()  # neither run did any work
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        assert instance.get_dynamic_partitions(DATASET_PARTITIONS) == []
    finally:
        instance.dispose()
    # Dagster gives a partitioned job's preset to the launchpad, schedule and sensor, not to
    # `dagster job execute` without -c: the run says so instead of silently training GPU-sized
    # (the library's split fractions then refuse these two tiles, which is beside the point here)
    bare = dagster_cli(*command, *for_dataset("demo"), env=env, timeout=300)
    assert NO_RUN_CONFIG in bare.stdout + bare.stderr
