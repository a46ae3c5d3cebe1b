"""Datasets as Dagster partitions: each dataset gets its own asset history, data versions and staleness.

Every asset of the pipeline is partitioned by ``dataset`` (a dynamic partition per target dataset,
its key the dataset id: ``data/raw/<key>``). The ``tile_headers`` of Kampala and of the demo are then
two partitions of one asset, each with its own materializations, plots and lineage, and a new tile
in one dataset marks only that dataset's assets as unsynced.

A dataset becomes a partition when

- a run names it: ``dagster job execute ... --tags '{"dagster/partition": "kampala"}'`` or ``dagster
  asset materialize ... --partition kampala`` registers ``kampala`` as the run starts, provided
  ``data/raw/kampala`` exists or the run config names a ``raw_dir`` (:func:`register_run_dataset`);
- the ``raw_tiles_sensor`` sees tiles in a folder it watches;
- a user adds it in the UI (the launch dialog's "Add partition").

Observing ``raw_tiles`` gives each registered dataset its data version and registers nothing: the
auxiliary sources live under ``data/raw`` too and are no targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg

from seg_pipeline.settings.data import check_dataset_id
from seg_pipeline.workflows.layout import DataLayout

#: The name of the dynamic partitions definition (what the instance stores partition keys under).
DATASET_PARTITIONS = "dataset"
DATASETS = dg.DynamicPartitionsDefinition(name=DATASET_PARTITIONS)
#: The run tag Dagster reads a run's partition from (``dagster job execute --tags``).
PARTITION_TAG = "dagster/partition"
#: The event tag Dagster reads an observation's data version from (not exported by ``dagster``).
DATA_VERSION_TAG = "dagster/data_version"

NO_DATASET = (
    "the pipeline works on one dataset at a time and this run names none: pick a dataset in the "
    "launchpad, or add --partition <dataset> to `dagster asset materialize` or "
    '--tags \'{"dagster/partition": "<dataset>"}\' to `dagster job execute`'
)


def dataset_of(context: dg.AssetExecutionContext) -> str:
    """The dataset this step works on: the run's partition key, with a usable message when it has none."""
    if not context.has_partition_key:
        raise dg.Failure(description=NO_DATASET, allow_retries=False)
    return context.partition_key


def register_datasets(instance: dg.DagsterInstance, dataset_ids: Iterable[str]) -> list[str]:
    """Add the ids not yet registered as dataset partitions; returns the ids added.

    Two runs that start together may both try to add one id: the second finds it there afterwards.
    """
    wanted = [
        d for d in dict.fromkeys(dataset_ids) if not instance.has_dynamic_partition(DATASET_PARTITIONS, d)
    ]
    if wanted:
        try:
            instance.add_dynamic_partitions(DATASET_PARTITIONS, wanted)
        except Exception:  # a concurrent add of the same key (the storage's unique constraint)
            missing = [d for d in wanted if not instance.has_dynamic_partition(DATASET_PARTITIONS, d)]
            if missing:
                raise
    return wanted


def _raw_dir_in(run_config: Mapping[str, Any]) -> str | None:
    section = ((run_config.get("ops") or {}).get("tile_headers") or {}).get("config") or {}
    value = section.get("raw_dir")
    return str(value) if value else None


def register_run_dataset(
    instance: dg.DagsterInstance,
    tags: Mapping[str, str],
    run_config: Mapping[str, Any],
    layout: DataLayout,
    partitioned: bool = True,
) -> str | None:
    """Register the dataset a run names in its partition tag, before its first step asks for it.

    ``dagster job execute`` and ``dagster asset materialize`` start a run for any partition key, but
    Dagster refuses a dynamic partition key that was never added. A key is added only when it is a
    valid dataset id whose tiles can be found (``data/raw/<key>`` or the run's ``raw_dir``), so a
    typo fails here, naming the folder it looked for, instead of leaving a partition behind. A run of
    a ``partitioned`` job that names no dataset fails here too, saying how to name one.
    """
    key = tags.get(PARTITION_TAG)
    if not key:
        if partitioned:
            raise dg.Failure(description=NO_DATASET, allow_retries=False)
        return None
    if instance.has_dynamic_partition(DATASET_PARTITIONS, key):
        return None
    try:
        check_dataset_id(key)
    except ValueError as error:
        raise dg.Failure(description=f"dataset partition {key!r}: {error}", allow_retries=False) from None
    if _raw_dir_in(run_config) is None and not layout.raw_dir(key).is_dir():
        registered = ", ".join(instance.get_dynamic_partitions(DATASET_PARTITIONS)) or "none yet"
        raise dg.Failure(
            description=f"dataset {key!r} is not a registered partition and {layout.raw_dir(key)} does not "
            "exist: put its tiles there, set ops.tile_headers.config.raw_dir in the run config, or pick a "
            f"registered dataset ({registered})",
            allow_retries=False,
        )
    register_datasets(instance, [key])
    return key
