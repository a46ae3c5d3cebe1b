"""The pipeline's Dagster definitions (assets, checks, jobs, automation), loaded by ``load_defs``."""
