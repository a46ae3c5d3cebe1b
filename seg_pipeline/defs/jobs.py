"""Jobs: named asset selections runnable with ``dagster job execute -m seg_pipeline -j NAME``."""

from __future__ import annotations

import dagster as dg

ingest_job = dg.define_asset_job(
    name="ingest_job",
    selection=dg.AssetSelection.groups("ingest"),
    description="Catalogue, split and shard the raw tiles (with their blocking checks).",
)

JOBS = [ingest_job]
