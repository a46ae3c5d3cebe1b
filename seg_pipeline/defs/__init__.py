"""Dagster layer: assets, checks, resources, jobs, schedules, sensors. Thin wiring only."""
