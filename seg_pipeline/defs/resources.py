"""Dagster resources: where the pipeline's data lives and where its MLflow runs go.

Small ``ConfigurableResource`` classes so a deployment can point the whole pipeline at another disk
(or a mounted bucket) or another MLflow server without touching asset code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from seg_pipeline.workflows.layout import DATA_ROOT_ENV, DataLayout

if TYPE_CHECKING:
    from seg_pipeline.tracking import TrackingSettings

#: The checkout the code runs from: its git commit goes into every MLflow run's tags.
REPO_DIR = Path(__file__).resolve().parents[2]


def run_family(context: dg.AssetExecutionContext) -> str:
    """The folder key of a run and its retries: the root run id, so a re-execution writes in place."""
    return context.run.root_run_id or context.run.run_id


#: Dagster applies a partitioned job's default run config (the preset) in the launchpad, the schedule
#: and the sensor, but `dagster job execute` without -c starts from the library defaults.
NO_RUN_CONFIG = (
    "this run has no run config, so every setting is the library default (sized for a GPU machine), "
    "not the job's preset: pass -c configs/demo.yaml (or your own run config) to `dagster job execute`"
)


def _partitioned(run: dg.DagsterRun) -> bool:
    """Whether ``run`` materializes dataset-partitioned assets (an observation of raw_tiles does not)."""
    from seg_pipeline.defs.definitions import defs  # the resource is built before this module is

    if run.job_name in {job.name for job in defs.jobs or []}:
        return defs.resolve_job_def(run.job_name).partitions_def is not None
    # Ad-hoc selections (`dagster asset materialize`, the UI's buttons) run in Dagster's implicit job.
    return any(key != dg.AssetKey("raw_tiles") for key in run.asset_selection or ())


class StorageResource(dg.ConfigurableResource):
    """Folders of the pipeline, all under one data root."""

    data_root: str = Field(
        default="",
        description=f"Data root; empty = ${DATA_ROOT_ENV}, else ./data (relative to the working directory).",
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Refuse a run whose config any asset would refuse, and register the dataset partition it names,
        before the first step works.
        """
        from seg_pipeline.defs.partitions import register_run_dataset
        from seg_pipeline.defs.preflight import check_run_config

        if context.run is not None:
            check_run_config(context.run.run_config)
            if context.instance is not None:
                run = context.run
                partitioned = _partitioned(run)
                register_run_dataset(context.instance, run.tags, run.run_config, self.layout, partitioned)
                if partitioned and not run.run_config.get("ops") and context.log is not None:
                    context.log.warning(NO_RUN_CONFIG)

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
    mlflow_ui_url: str = Field(
        default="http://127.0.0.1:5000",
        description="Where the MLflow UI serves a local store (make mlflow-ui), for the links on asset "
        "pages; an http tracking_uri is its own UI. Empty = no links.",
    )

    dagster_ui_url: str = Field(
        default="http://127.0.0.1:3000",
        description="The Dagster UI (make ui), for the dagster.run_url tag of each MLflow run; empty = none.",
    )

    def run_tags(
        self, context: dg.AssetExecutionContext, stage: str, data_version: str | None = None
    ) -> dict[str, str]:
        """The standard MLflow tags of a run made by this asset step (Dagster run, asset, code, git)."""
        from seg_pipeline.tracking import build_run_tags  # MLflow loads only in the steps that track

        run_id = context.run.run_id
        key = context.asset_key.to_user_string()
        return build_run_tags(
            stage=stage,
            pipeline_run_id=run_id,
            pipeline_run_url=f"{self.dagster_ui_url.rstrip('/')}/runs/{run_id}"
            if self.dagster_ui_url
            else None,
            asset_key=key,
            code_version=context.assets_def.code_versions_by_key.get(context.asset_key) or "",
            data_version=data_version,
            repo_dir=REPO_DIR,
        )

    def settings(self, layout: DataLayout) -> TrackingSettings:
        """Tracking settings for runs of this pipeline."""
        from seg_pipeline.tracking import TrackingSettings

        ui_url = self.mlflow_ui_url or None
        if not self.tracking_uri:
            return TrackingSettings.from_data_root(
                layout.root, experiment_name=self.experiment_name, ui_url=ui_url
            )
        local = not self.tracking_uri.startswith(("http://", "https://"))
        return TrackingSettings(
            tracking_uri=self.tracking_uri,
            experiment_name=self.experiment_name,
            artifact_root=layout.mlflow_dir / "artifacts" if local else None,
            ui_url=ui_url,
        )
