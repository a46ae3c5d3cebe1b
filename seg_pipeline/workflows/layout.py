"""Where the pipeline's files live under one data root, and ids checked before any folder is made.

``data/raw/<dataset>`` holds inputs; ``processed/<dataset>`` catalogs, split tables and shards;
``models/<stage>/<run family>`` checkpoints; ``predictions/<run>`` and ``reports/<run>`` outputs;
``mlflow/`` the local tracking store. A dataset id or run id that is not a plain folder name is
refused *before* anything is created, so a rejected id never leaves folders behind.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from seg_pipeline.settings.data import check_dataset_id

#: Environment variable that moves the whole tree (the CLI and the Dagster resource both read it).
DATA_ROOT_ENV = "SEG_PIPELINE_DATA_ROOT"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def default_data_root() -> Path:
    """``$SEG_PIPELINE_DATA_ROOT``, or ``./data``, made absolute."""
    return Path(os.environ.get(DATA_ROOT_ENV) or "data").expanduser().resolve()


def _checked_id(dataset_id: str) -> str:
    try:
        return check_dataset_id(dataset_id)
    except ValueError as error:
        raise ValueError(f"dataset_id={dataset_id!r}: {error}") from error


def _plain_name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{kind}={value!r}: must be a plain folder name (letters, digits, '_', '-', '.')")
    return value


@dataclass(frozen=True)
class DataLayout:
    """The folders of one data root; methods return paths and create nothing unless asked."""

    root: Path

    @classmethod
    def at(cls, root: Path | str | None = None) -> DataLayout:
        """The layout at ``root`` (default: :func:`default_data_root`), made absolute."""
        return cls(Path(root).expanduser().resolve() if root is not None else default_data_root())

    @property
    def raw_root(self) -> Path:
        """``raw/``: one folder of tiles per dataset."""
        return self.root / "raw"

    def raw_dir(self, dataset_id: str, override: str | None = None) -> Path:
        """The raw tiles of ``dataset_id``: ``override`` when given, else ``raw/<dataset_id>``."""
        _checked_id(dataset_id)
        return Path(override).expanduser().resolve() if override else self.raw_root / dataset_id

    def processed_dir(self, dataset_id: str) -> Path:
        """Catalog, split table and shards of ``dataset_id`` (not created here)."""
        return self.root / "processed" / _checked_id(dataset_id)

    def models_dir(self, stage: str, family: str) -> Path:
        """Checkpoints of ``stage`` for one run family (stable across retries of one run)."""
        return self.root / "models" / _plain_name("stage", stage) / _plain_name("run family", family)

    def predictions_dir(self, run: str) -> Path:
        """Prediction sets of one run."""
        return self.root / "predictions" / _plain_name("run", run)

    def exports_dir(self, run: str) -> Path:
        """The exported model (TorchScript, ONNX, card) of one run family."""
        return self.root / "exports" / _plain_name("run", run)

    def reports_dir(self, run: str) -> Path:
        """Evaluation reports of one run."""
        return self.root / "reports" / _plain_name("run", run)

    @property
    def mlflow_dir(self) -> Path:
        """The local MLflow store (``mlflow.db`` and ``artifacts/``)."""
        return self.root / "mlflow"
