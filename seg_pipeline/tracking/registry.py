"""The model registry: register versions, move aliases, find the version behind an alias."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mlflow.exceptions import MlflowException

from seg_pipeline.tracking._mlflow import TRACKING_URI_ENV, mlflow
from seg_pipeline.tracking.settings import TrackingSettings, _using_uris


@dataclass(frozen=True)
class ModelVersionInfo:
    """A registered model version, reduced to what the pipeline needs.

    Attributes:
        name: Registered model name.
        version: Version number as a string.
        run_id: Run that produced the model, if known.
        source: Where the model's files live (``models:/m-...`` in MLflow 3), if known.
        aliases: Aliases pointing at this version.
    """

    name: str
    version: str
    run_id: str | None
    source: str | None
    aliases: tuple[str, ...] = ()

    @property
    def model_uri(self) -> str:
        """``models:/<name>/<version>``: loads exactly this version."""
        return f"models:/{self.name}/{self.version}"


def _settings_or_global(settings: TrackingSettings | None) -> TrackingSettings:
    """Return ``settings``, else the URIs set via ``MLFLOW_TRACKING_URI``/``mlflow.set_tracking_uri``.

    Refuses to fall back to MLflow's built-in default, which would quietly create ``./mlflow.db``.
    """
    if settings is not None:
        return settings
    if not os.environ.get(TRACKING_URI_ENV):
        raise ValueError(
            f"settings=None and {TRACKING_URI_ENV} is not set: pass settings=TrackingSettings.from_data_root("
            "data_root) so the registry is not created as ./mlflow.db in the working directory"
        )
    return TrackingSettings(tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_registry_uri())


def register_model(model_uri: str, name: str, *, settings: TrackingSettings | None = None) -> str:
    """Register ``model_uri`` under ``name`` (created if missing) and return the new version string.

    Without ``settings`` the URIs from ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` are used.
    """
    if not name or not name.strip():
        raise ValueError(f"name={name!r} must be a non-empty registered-model name")
    resolved = _settings_or_global(settings)
    with _using_uris(resolved):
        version = mlflow.register_model(model_uri, name)
    return str(version.version)


def set_alias(name: str, alias: str, version: str | int, *, settings: TrackingSettings | None = None) -> None:
    """Point ``alias`` (e.g. ``"champion"``) of registered model ``name`` at ``version``."""
    _settings_or_global(settings).client().set_registered_model_alias(name, alias, str(version))


def get_alias_version(
    name: str, alias: str, *, settings: TrackingSettings | None = None
) -> ModelVersionInfo | None:
    """Return the version ``name@alias`` points at, or None when the model or the alias does not exist."""
    client = _settings_or_global(settings).client()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return ModelVersionInfo(
        name=version.name,
        version=str(version.version),
        run_id=version.run_id,
        source=version.source,
        aliases=tuple(version.aliases or ()),
    )


def run_tag(run_id: str, key: str, *, settings: TrackingSettings | None = None) -> str | None:
    """One tag of a run (e.g. the checkpoint path a training stage recorded), or None."""
    return _settings_or_global(settings).client().get_run(run_id).data.tags.get(key)


def load_model(model_uri: str, map_location: str = "cpu", *, settings: TrackingSettings | None = None) -> Any:
    """Load a logged torch model: ``models:/name@alias``, ``models:/name/3``, ``models:/m-...``, runs:/."""
    import mlflow.pytorch  # imports torch

    with _using_uris(_settings_or_global(settings)):
        return mlflow.pytorch.load_model(model_uri, map_location=map_location)


def load_pyfunc(model_uri: str, *, settings: TrackingSettings | None = None) -> Any:
    """Load a logged ``pyfunc`` model (a registered segmenter bundle): ``models:/name@alias`` and co."""
    import mlflow.pyfunc

    with _using_uris(_settings_or_global(settings)):
        return mlflow.pyfunc.load_model(model_uri)
