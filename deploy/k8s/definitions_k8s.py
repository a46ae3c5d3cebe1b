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

from seg_pipeline.defs import definitions as package_definitions


def with_executor(package: dg.Definitions, executor: dg.ExecutorDefinition) -> dg.Definitions:
    """Copy of ``package`` that runs its jobs with ``executor``.

    A function, not a module-level alias of the package's Definitions: Dagster refuses a code
    location file that holds two Definitions objects at module scope.
    """
    return dg.Definitions(
        assets=package.assets,
        asset_checks=package.asset_checks,
        jobs=package.jobs,
        schedules=package.schedules,
        sensors=package.sensors,
        resources=package.resources,
        loggers=package.loggers,
        metadata=package.metadata,
        executor=executor,
    )


defs = with_executor(package_definitions.defs, k8s_job_executor)
