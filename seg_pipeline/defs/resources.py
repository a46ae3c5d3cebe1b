"""Dagster resources: where the pipeline's data lives.

One small ``ConfigurableResource`` so a deployment can point the whole pipeline at another
disk (or a mounted bucket) without touching asset code.
"""

import os
from pathlib import Path

import dagster as dg


class StorageResource(dg.ConfigurableResource):
    """Folders of the pipeline, all under one ``data_root``.

    ``data_root`` defaults to ``$SEG_PIPELINE_DATA_ROOT`` or ``./data`` (relative paths are
    resolved against the working directory of the run: the repo root for ``make run``).
    """

    data_root: str = os.environ.get("SEG_PIPELINE_DATA_ROOT", "data")

    @property
    def root(self) -> Path:
        """Absolute data root."""
        return Path(self.data_root).expanduser().resolve()

    def raw_dir(self, dataset_id: str) -> Path:
        """Where the raw tiles of ``dataset_id`` are expected."""
        return self.root / "raw" / dataset_id

    def processed_dir(self, dataset_id: str) -> Path:
        """Catalog, split table and shards of ``dataset_id``."""
        path = self.root / "processed" / dataset_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stage_dir(self, kind: str, name: str) -> Path:
        """A folder under ``models/``, ``predictions/`` or ``reports/``."""
        path = self.root / kind / name
        path.mkdir(parents=True, exist_ok=True)
        return path


class MlflowResource(dg.ConfigurableResource):
    """Where MLflow runs go.

    ``tracking_uri`` empty: ``$MLFLOW_TRACKING_URI`` if set, else the local SQLite store
    ``<data_root>/mlflow/mlflow.db`` with artefacts in ``<data_root>/mlflow/artifacts``.
    Set it to ``http://host:5000`` for an MLflow server.
    """

    tracking_uri: str = ""
    experiment_name: str = "seg_pipeline"

    def settings(self, data_root: Path):  # -> seg_pipeline.tracking.TrackingSettings
        """Tracking settings for runs of this pipeline (imports MLflow lazily)."""
        from seg_pipeline.tracking import TrackingSettings

        settings = TrackingSettings.from_data_root(data_root, experiment_name=self.experiment_name)
        if not self.tracking_uri:
            return settings
        local = not self.tracking_uri.startswith(("http://", "https://"))
        return TrackingSettings(
            tracking_uri=self.tracking_uri,
            experiment_name=self.experiment_name,
            artifact_root=(Path(data_root).resolve() / "mlflow" / "artifacts") if local else None,
        )
