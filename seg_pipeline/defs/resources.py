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
