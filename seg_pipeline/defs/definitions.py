"""The Definitions object: assembly only, no logic."""

from __future__ import annotations

import dagster as dg

from seg_pipeline.defs.assets.evaluate import (
    EVALUATION_CHECKS,
    champion_model,
    ensemble_predictions,
    evaluation_report,
)
from seg_pipeline.defs.assets.ingest import auxiliary_sources, dataset_splits, tile_headers, tile_shards
from seg_pipeline.defs.assets.train import kd_student_model, pretrained_model
from seg_pipeline.defs.checks import INGEST_CHECKS
from seg_pipeline.defs.jobs import JOBS
from seg_pipeline.defs.resources import MlflowResource, StorageResource
from seg_pipeline.defs.schedules import SCHEDULES
from seg_pipeline.defs.sensors import SENSORS

defs = dg.Definitions(
    assets=[
        tile_headers,
        dataset_splits,
        tile_shards,
        auxiliary_sources,
        pretrained_model,
        kd_student_model,
        ensemble_predictions,
        evaluation_report,
        champion_model,
    ],
    asset_checks=[*INGEST_CHECKS, *EVALUATION_CHECKS],
    jobs=JOBS,
    schedules=SCHEDULES,
    sensors=SENSORS,
    resources={"storage": StorageResource(), "mlflow": MlflowResource()},
    # One machine, 2 cores: steps in one process avoid re-importing torch per step (~4 s each).
    executor=dg.in_process_executor,
)
