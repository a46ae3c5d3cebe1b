"""Sensors: new or changed raw tiles launch ingest (and a retrain past a threshold); a failure hook.

Both are stopped by default; turn them on in the UI (Automation tab).
"""

import json
import os

import dagster as dg

from seg_pipeline.data.watch import snapshot
from seg_pipeline.defs.jobs import full_pipeline_job, ingest_job
from seg_pipeline.defs.resources import StorageResource

WATCHED = tuple(d for d in os.environ.get("SEG_PIPELINE_WATCH", "demo").split(",") if d)
DATASET_TAG = "seg_pipeline/dataset"
RETRAIN_AFTER_NEW_MASKS = int(os.environ.get("SEG_PIPELINE_RETRAIN_AFTER_NEW_MASKS", "20"))


@dg.sensor(
    jobs=[ingest_job, full_pipeline_job],
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Watches data/raw/<dataset> (SEG_PIPELINE_WATCH); runs ingest on any change and the full "
    "pipeline once SEG_PIPELINE_RETRAIN_AFTER_NEW_MASKS new masks arrived since the last retrain.",
)
def raw_tiles_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
    """Compare folder snapshots with the cursor and request runs for what changed."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    requests = []
    for dataset in WATCHED:
        # The run ingests the dataset that changed, and carries its name as a tag: dagster.yaml lets
        # one run per dataset tag value run at a time, so two ingests never rewrite the same shards.
        request = {
            "run_config": {"ops": {"tile_headers": {"config": {"dataset_id": dataset}}}},
            "tags": {DATASET_TAG: dataset},
        }
        snap = snapshot(storage.raw_dir(dataset))
        seen = cursor.get(dataset, {})
        if snap.n_files == 0 or snap.fingerprint == seen.get("fingerprint"):
            continue
        masks_at_retrain = seen.get("masks_at_retrain", snap.n_masks if not seen else 0)
        if snap.n_masks - masks_at_retrain >= RETRAIN_AFTER_NEW_MASKS:
            requests.append(
                dg.RunRequest(
                    run_key=f"retrain-{dataset}-{snap.fingerprint[:16]}",
                    job_name=full_pipeline_job.name,
                    **request,
                )
            )
            masks_at_retrain = snap.n_masks
        else:
            requests.append(
                dg.RunRequest(
                    run_key=f"ingest-{dataset}-{snap.fingerprint[:16]}", job_name=ingest_job.name, **request
                )
            )
        cursor[dataset] = {"fingerprint": snap.fingerprint, "masks_at_retrain": masks_at_retrain}
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor, sort_keys=True))


@dg.run_failure_sensor(default_status=dg.DefaultSensorStatus.STOPPED, description="Hook point for alerts.")
def pipeline_failure_sensor(context: dg.RunFailureSensorContext) -> None:
    """Log failed runs; replace the body with Slack/e-mail/PagerDuty as a deployment needs."""
    context.log.error(
        f"run {context.dagster_run.run_id} of {context.dagster_run.job_name} failed: "
        f"{context.failure_event.message}"
    )


SENSORS = [raw_tiles_sensor, pipeline_failure_sensor]
