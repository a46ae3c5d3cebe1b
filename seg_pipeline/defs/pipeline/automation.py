"""Automation: a weekly retrain, a sensor on the raw tiles, and a run-failure hook.

All stopped by default; turn them on in the UI (Automation tab).
"""

import json
import os

import dagster as dg

from seg_pipeline.data.watch import snapshot
from seg_pipeline.defs.partitions import DATASET_PARTITIONS, DATASETS
from seg_pipeline.defs.pipeline.jobs import full_pipeline_job, ingest_job
from seg_pipeline.defs.resources import StorageResource

WATCHED = tuple(d for d in os.environ.get("SEG_PIPELINE_WATCH", "demo").split(",") if d)
DATASET_TAG = "seg_pipeline/dataset"
RETRAIN_AFTER_NEW_MASKS = int(os.environ.get("SEG_PIPELINE_RETRAIN_AFTER_NEW_MASKS", "20"))


@dg.schedule(
    job=full_pipeline_job,
    cron_schedule=os.environ.get("SEG_PIPELINE_RETRAIN_CRON", "0 3 * * 1"),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrain and re-evaluate every registered dataset (one run per dataset partition); each "
    "dataset's champion alias moves only when its gate passes.",
)
def weekly_retrain(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
    """One run of the preset per dataset partition, keyed by the tick so a retried tick adds none."""
    datasets = context.instance.get_dynamic_partitions(DATASET_PARTITIONS)
    if not datasets:
        return dg.SkipReason("no dataset partitions yet: run a job for a dataset or observe raw_tiles")
    tick = context.scheduled_execution_time.isoformat()
    return [
        dg.RunRequest(run_key=f"retrain-{dataset}-{tick}", partition_key=dataset, tags={DATASET_TAG: dataset})
        for dataset in datasets
    ]


def _request(dataset: str, fingerprint: str, retrain: bool) -> dg.RunRequest:
    # The run ingests the dataset that changed (its partition), and carries its name as a tag:
    # dagster.yaml lets one run per dataset tag value run at a time, so two ingests never rewrite
    # the same shards. The preset is the job's default run config, so the request needs none.
    job = full_pipeline_job if retrain else ingest_job
    return dg.RunRequest(
        run_key=f"{'retrain' if retrain else 'ingest'}-{dataset}-{fingerprint[:16]}",
        job_name=job.name,
        partition_key=dataset,
        tags={DATASET_TAG: dataset},
    )


@dg.sensor(
    jobs=[ingest_job, full_pipeline_job],
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Watches data/raw/DATASET (SEG_PIPELINE_WATCH), registers each watched dataset as a "
    "partition, runs ingest for it on any change and the full pipeline once "
    "SEG_PIPELINE_RETRAIN_AFTER_NEW_MASKS new masks arrived since its last retrain.",
)
def raw_tiles_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
    """Compare folder snapshots with the cursor and request runs for what changed."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    requests = []
    for dataset in WATCHED:
        snap = snapshot(storage.layout.raw_dir(dataset))
        seen = cursor.get(dataset, {})
        if snap.n_files == 0 or snap.fingerprint == seen.get("fingerprint"):
            continue
        masks_at_retrain = seen.get("masks_at_retrain", snap.n_masks if not seen else 0)
        retrain = snap.n_masks - masks_at_retrain >= RETRAIN_AFTER_NEW_MASKS
        requests.append(_request(dataset, snap.fingerprint, retrain))
        if retrain:
            masks_at_retrain = snap.n_masks
        cursor[dataset] = {"fingerprint": snap.fingerprint, "masks_at_retrain": masks_at_retrain}
    new = [
        r.partition_key
        for r in requests
        if r.partition_key and not context.instance.has_dynamic_partition(DATASET_PARTITIONS, r.partition_key)
    ]
    return dg.SensorResult(
        run_requests=requests,
        cursor=json.dumps(cursor, sort_keys=True),
        dynamic_partitions_requests=[DATASETS.build_add_request(new)] if new else None,
    )


@dg.run_failure_sensor(default_status=dg.DefaultSensorStatus.STOPPED, description="Hook point for alerts.")
def pipeline_failure_sensor(context: dg.RunFailureSensorContext) -> None:
    """Log failed runs; replace the body with Slack/e-mail/PagerDuty as a deployment needs."""
    run = context.dagster_run
    context.log.error(f"run {run.run_id} of {run.job_name} failed: {context.failure_event.message}")
