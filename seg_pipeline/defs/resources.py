"""Dagster resources: where the pipeline's data lives and where its MLflow runs go.

Small ``ConfigurableResource`` classes so a deployment can point the whole pipeline at another disk
(or a mounted bucket) or another MLflow server without touching asset code.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from seg_pipeline.tracking import TrackingSettings
from seg_pipeline.workflows.layout import DATA_ROOT_ENV, DataLayout


class StorageResource(dg.ConfigurableResource):
    """Folders of the pipeline, all under one data root."""

    data_root: str = Field(
        default="",
        description=f"Data root; empty = ${DATA_ROOT_ENV}, else ./data (relative to the working directory).",
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Refuse a run whose config any asset would refuse, before the first step works."""
        from seg_pipeline.defs.preflight import check_run_config

        if context.run is not None:
            check_run_config(context.run.run_config)

    @property
    def layout(self) -> DataLayout:
        """The folders under the data root."""
        return DataLayout.at(self.data_root or None)


class MlflowResource(dg.ConfigurableResource):
    """Where MLflow runs go: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite under data_root."""

    tracking_uri: str = Field(
        default="", description="MLflow tracking URI, e.g. http://host:5000; empty = local store."
    )
    experiment_name: str = Field(default="seg_pipeline", description="MLflow experiment of every run.")

    def settings(self, layout: DataLayout) -> TrackingSettings:
        """Tracking settings for runs of this pipeline."""
        if not self.tracking_uri:
            return TrackingSettings.from_data_root(layout.root, experiment_name=self.experiment_name)
        local = not self.tracking_uri.startswith(("http://", "https://"))
        return TrackingSettings(
            tracking_uri=self.tracking_uri,
            experiment_name=self.experiment_name,
            artifact_root=layout.mlflow_dir / "artifacts" if local else None,
        )
