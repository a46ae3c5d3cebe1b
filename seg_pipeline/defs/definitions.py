"""The Definitions object: assembly only, no logic."""

from __future__ import annotations

import dagster as dg

from seg_pipeline.defs.assets.ingest import auxiliary_sources, dataset_splits, tile_headers, tile_shards
from seg_pipeline.defs.checks import INGEST_CHECKS
from seg_pipeline.defs.jobs import JOBS
from seg_pipeline.defs.resources import StorageResource

defs = dg.Definitions(
    assets=[tile_headers, dataset_splits, tile_shards, auxiliary_sources],
    asset_checks=INGEST_CHECKS,
    jobs=JOBS,
    resources={"storage": StorageResource()},
    # One machine, 2 cores: steps in one process avoid re-importing torch per step (~4 s each).
    executor=dg.in_process_executor,
)
