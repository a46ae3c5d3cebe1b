"""Scheduled retraining: the full pipeline on a cron, stopped by default (turn it on in the UI)."""

from __future__ import annotations

import os

import dagster as dg

from seg_pipeline.defs.jobs import full_pipeline_job

retrain_schedule = dg.ScheduleDefinition(
    name="weekly_retrain",
    job=full_pipeline_job,
    cron_schedule=os.environ.get("SEG_PIPELINE_RETRAIN_CRON", "0 3 * * 1"),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrain and re-evaluate; the champion alias moves only when the gate passes.",
)

SCHEDULES = [retrain_schedule]
