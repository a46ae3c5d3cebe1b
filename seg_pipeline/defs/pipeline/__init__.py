"""The pipeline's Dagster definitions (assets, checks, jobs, automation), loaded by ``load_defs``.

Dagster imports these modules in the webserver, the daemon, each sensor tick and every step
subprocess, so they import only Dagster, the settings and the contracts at module level. Each asset
body imports the workflow it calls (``from seg_pipeline.workflows import train``): torch,
segmentation-models-pytorch and MLflow then load in the steps that use them, and an ingest step or
an asset check starts in about 3 s instead of 11 s on 2 CPU cores. Code versions hash the workflow
modules' source files without importing them (:func:`seg_pipeline.defs.versions.code_version`).
"""
