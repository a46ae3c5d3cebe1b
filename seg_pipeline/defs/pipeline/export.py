"""The export asset (seed 000's runtime export): the KD student as TorchScript/ONNX with its model card.

No ``from __future__ import annotations``: Dagster reads Config annotations at runtime.
"""

from typing import TYPE_CHECKING

import dagster as dg

from seg_pipeline.contracts import ChampionDecision, ExportedModel, TrainedModel
from seg_pipeline.defs.config import dagster_config, to_settings
from seg_pipeline.defs.failures import no_retry_for_bad_input
from seg_pipeline.defs.metadata import without_none
from seg_pipeline.defs.ownership import owners, stage_tags
from seg_pipeline.defs.partitions import DATASETS
from seg_pipeline.defs.resources import StorageResource, run_family
from seg_pipeline.defs.versions import code_version
from seg_pipeline.settings import ExportSettings

EXPORT_GROUP = "export"

if TYPE_CHECKING:
    ExportConfig = dg.Config
else:
    ExportConfig = dagster_config(ExportSettings, name="ExportConfig")


@dg.asset(
    group_name=EXPORT_GROUP,
    owners=owners(),
    tags=stage_tags(EXPORT_GROUP),
    partitions_def=DATASETS,
    code_version=code_version("seg_pipeline.workflows.export"),
    kinds={"pytorch", "onnx"},
    description="The KD student exported for runtimes without this package (TorchScript, ONNX), each "
    "format checked against the eager model, with a model card naming its MLflow run and the gate's "
    "decision.",
)
def exported_model(
    context: dg.AssetExecutionContext,
    config: ExportConfig,
    kd_student_model: TrainedModel,
    champion_model: ChampionDecision,
    storage: StorageResource,
) -> dg.Output[ExportedModel]:
    """Export the student the champion gate judged, beside its checkpoints."""
    from seg_pipeline.workflows import export

    with no_retry_for_bad_input():
        value = export.export_trained(
            to_settings(config, ExportSettings, "exported_model"),
            kd_student_model,
            storage.layout.exports_dir(run_family(context)),
            champion_model,
            lineage={"dagster_run_id": context.run.run_id},
        )
    metadata = without_none(
        {
            "export_dir": dg.MetadataValue.path(value.out_dir),
            "formats": ", ".join(name for name in value.files if name != "card"),
            "champion": value.champion,
            "registered_version": value.registered_version,
            **{f"max_abs_diff/{name}": diff for name, diff in value.max_abs_diff.items() if diff is not None},
        }
    )
    return dg.Output(value, metadata=metadata)
