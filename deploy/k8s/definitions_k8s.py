"""Code location for Kubernetes: the seg_pipeline Definitions with each step in its own pod.

``seg_pipeline.defs.definitions`` pins the in-process executor, which is right for one machine (torch
is imported once per run, not once per step). On a cluster each step should be its own k8s Job so
that only the training steps request a GPU (``deploy/k8s/run_config_gpu.yaml``). Loading this file
instead of the package swaps the executor without touching ``seg_pipeline/``:

    dagster api grpc --python-file deploy/k8s/definitions_k8s.py --host 0.0.0.0 --port 3030

Everything else (assets, checks, jobs, schedules, sensors, resources) is the package's own.
"""

from __future__ import annotations

import dagster as dg
from dagster_k8s import k8s_job_executor

# Imported as a module, not ``from ... import defs``: Dagster refuses a file holding two Definitions.
from seg_pipeline.defs import definitions as package_definitions

_package = package_definitions.defs

defs = dg.Definitions(
    assets=_package.assets,
    asset_checks=_package.asset_checks,
    jobs=_package.jobs,
    schedules=_package.schedules,
    sensors=_package.sensors,
    resources=_package.resources,
    loggers=_package.loggers,
    metadata=_package.metadata,
    executor=k8s_job_executor,
)
