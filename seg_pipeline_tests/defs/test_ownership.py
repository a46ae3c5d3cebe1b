"""Every asset names its owners and its stage, so the catalog can be filtered by either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from seg_pipeline.defs.ownership import DEFAULT_OWNER, GPU_TAG, STAGE_TAG, owners, stage_tags


@dataclass(frozen=True)
class CatalogEntry:
    owners: list[str]
    tags: dict[str, str]


def _asset_catalog(env: dict[str, str]) -> dict[str, CatalogEntry]:
    """Owners and tags of each asset, as a fresh code location built under ``env`` sees them."""
    script = (
        "import json\n"
        "from seg_pipeline.definitions import defs\n"
        "graph = defs.resolve_asset_graph()\n"
        "print(json.dumps({k.to_user_string(): {'owners': list(graph.get(k).owners),"
        " 'tags': dict(graph.get(k).tags)} for k in graph.get_all_asset_keys()}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    found = json.loads(done.stdout.splitlines()[-1])
    return {name: CatalogEntry(**entry) for name, entry in found.items()}


def test_every_materialized_asset_has_the_default_owner_and_a_stage_tag() -> None:
    catalog = _asset_catalog({"SEG_PIPELINE_OWNERS": ""})
    stages = {name: entry.tags[STAGE_TAG] for name, entry in catalog.items()}
    assert stages == {
        "raw_tiles": "ingest",
        "tile_headers": "ingest",
        "dataset_splits": "ingest",
        "tile_shards": "ingest",
        "auxiliary_sources": "ingest",
        "pretrained_model": "train",
        "kd_student_model": "train",
        "extra_members": "train",
        "ensemble_predictions": "inference",
        "evaluation_report": "evaluation",
        "champion_model": "evaluation",
        "exported_model": "export",
    }
    # The observable source asset cannot carry owners in this Dagster; every other asset does.
    assert {name for name, e in catalog.items() if e.owners != [DEFAULT_OWNER]} == {"raw_tiles"}
    gpu = {name for name, e in catalog.items() if GPU_TAG in e.tags}
    assert gpu == {"pretrained_model", "kd_student_model", "extra_members"}


def test_a_deployment_names_its_owners_in_the_environment() -> None:
    catalog = _asset_catalog({"SEG_PIPELINE_OWNERS": "team:mapping, ana@example.org"})
    assert catalog["kd_student_model"].owners == ["team:mapping", "ana@example.org"]


def test_owners_and_stage_tags_read_the_environment_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEG_PIPELINE_OWNERS", " ,team:gis,")
    assert owners() == ["team:gis"]
    monkeypatch.delenv("SEG_PIPELINE_OWNERS")
    assert owners() == [DEFAULT_OWNER]
    assert stage_tags("train", gpu=True) == {STAGE_TAG: "train", GPU_TAG: "true"}
