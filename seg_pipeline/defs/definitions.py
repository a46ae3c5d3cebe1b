"""The one ``Definitions`` object: the pipeline's definitions plus resources and executor; no logic.

Every asset, check, job, schedule and sensor under :mod:`seg_pipeline.defs.pipeline` is found by
Dagster's own ``load_from_defs_folder`` (the project is described in ``[tool.dg]`` of pyproject.toml),
so nothing is listed by hand. ``workspace.yaml``, ``dagster job execute
-m seg_pipeline.definitions`` and ``dg`` (``[tool.dg]`` in pyproject.toml) all load this object.
"""

from pathlib import Path

import dagster as dg

from seg_pipeline.defs.io_manager import ContractIOManager
from seg_pipeline.defs.resources import MlflowResource, StorageResource

defs = dg.Definitions.merge(
    dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
    dg.Definitions(
        resources={
            "storage": StorageResource(),
            "mlflow": MlflowResource(),
            "io_manager": ContractIOManager(),
        },
        # One machine, 2 cores: steps in one process avoid re-importing torch per step (~4 s each).
        executor=dg.in_process_executor,
    ),
)
