"""Where runs, artefacts and registered models go (:class:`TrackingSettings`), and the default store."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from seg_pipeline.tracking._mlflow import REGISTRY_URI_ENV, TRACKING_URI_ENV, mlflow

DEFAULT_EXPERIMENT_NAME = "seg_pipeline"
_HTTP_SCHEMES = ("http", "https")
_DEFAULT_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def default_tracking_uri(data_root: Path) -> str:
    """Return ``$MLFLOW_TRACKING_URI`` if set, else the SQLite store ``<data_root>/mlflow/mlflow.db``.

    The path is made absolute so the store does not move with the working directory.
    """
    from_env = os.environ.get(TRACKING_URI_ENV, "").strip()
    if from_env:
        return from_env
    db_path = (Path(data_root).expanduser().resolve() / "mlflow" / "mlflow.db").as_posix()
    return f"sqlite:///{db_path}"


def _scheme(uri: str) -> str:
    """Return the URI's scheme without a driver suffix (``postgresql+psycopg2`` -> ``postgresql``)."""
    return urllib.parse.urlparse(uri).scheme.split("+", 1)[0].lower()


def _is_http(uri: str) -> bool:
    return _scheme(uri) in _HTTP_SCHEMES


@dataclass(frozen=True)
class TrackingSettings:
    """Where runs, artefacts and registered models go.

    Attributes:
        tracking_uri: MLflow tracking URI (``sqlite:///...``, ``http://host:5000``, ``file:///...``).
        experiment_name: MLflow experiment that runs are filed under.
        artifact_root: Local folder for the experiment's artefacts when this module creates the
            experiment. None lets the tracking server decide (right for http servers that proxy
            artefacts, wrong for local stores, which would then write to ``./mlruns``).
        registry_uri: Model-registry URI; None means the tracking URI.
        ui_url: Where an MLflow UI serves this store, for links (``make mlflow-ui`` serves the
            local store at ``http://127.0.0.1:5000``); an http tracking URI is its own UI and
            wins. None: no links for a local store.
    """

    tracking_uri: str
    experiment_name: str = DEFAULT_EXPERIMENT_NAME
    artifact_root: Path | None = None
    registry_uri: str | None = None
    ui_url: str | None = None

    def __post_init__(self) -> None:
        if not self.tracking_uri or not self.tracking_uri.strip():
            raise ValueError(
                f"tracking_uri={self.tracking_uri!r} is empty: pass an MLflow URI such as "
                "'sqlite:////abs/path/mlflow.db' or 'http://127.0.0.1:5000'"
            )
        if not self.experiment_name or not self.experiment_name.strip():
            raise ValueError(
                f"experiment_name={self.experiment_name!r} is empty: pass a name such as "
                f"{DEFAULT_EXPERIMENT_NAME!r}"
            )

    @classmethod
    def from_data_root(
        cls, data_root: Path, experiment_name: str = DEFAULT_EXPERIMENT_NAME, ui_url: str | None = None
    ) -> TrackingSettings:
        """Build the project default: SQLite and artefacts under ``<data_root>/mlflow``, env vars win.

        ``MLFLOW_TRACKING_URI`` replaces the SQLite store and ``MLFLOW_REGISTRY_URI`` sets the
        registry. For http tracking URIs the server chooses the artefact location.
        """
        tracking_uri = default_tracking_uri(data_root)
        artifact_root = None
        if not _is_http(tracking_uri):
            artifact_root = Path(data_root).expanduser().resolve() / "mlflow" / "artifacts"
        return cls(
            tracking_uri=tracking_uri,
            experiment_name=experiment_name,
            artifact_root=artifact_root,
            registry_uri=os.environ.get(REGISTRY_URI_ENV) or None,
            ui_url=ui_url,
        )

    @property
    def ui_base(self) -> str | None:
        """The MLflow UI address links start with: the http tracking server, else ``ui_url``."""
        if _is_http(self.tracking_uri):
            return self.tracking_uri.rstrip("/")
        return self.ui_url.rstrip("/") if self.ui_url else None

    def run_link(self, experiment_id: str, run_id: str) -> str:
        """The UI page of a run, or ``<tracking_uri> run <id>`` when no UI address is known."""
        base = self.ui_base
        if base is None:
            return f"{self.tracking_uri} run {run_id}"
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"

    def model_version_link(self, name: str, version: str) -> str | None:
        """The UI page of a registered model version (None when no UI address is known)."""
        base = self.ui_base
        if base is None:
            return None
        return f"{base}/#/models/{urllib.parse.quote(name, safe='')}/versions/{version}"

    def logged_model_link(self, experiment_id: str, model_id: str) -> str | None:
        """The UI page of an MLflow 3 logged model (``m-...``: its metrics, params and artefacts)."""
        base = self.ui_base
        if base is None:
            return None
        return f"{base}/#/experiments/{experiment_id}/models/{model_id}"

    def artifact_link(self, run_id: str, artifact_path: str) -> str | None:
        """Where the MLflow UI serves one artefact file of a run (an ``<img>`` can show it); None when
        no UI address is known.
        """
        base = self.ui_base
        if base is None:
            return None
        query = urllib.parse.urlencode({"path": artifact_path, "run_uuid": run_id})
        return f"{base}/get-artifact?{query}"

    @property
    def effective_registry_uri(self) -> str:
        """The registry URI actually used (the tracking URI unless one was given)."""
        return self.registry_uri or self.tracking_uri

    def client(self) -> mlflow.MlflowClient:
        """Return an ``MlflowClient`` bound to these URIs (no global state involved)."""
        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.effective_registry_uri)


@contextmanager
def _using_uris(settings: TrackingSettings) -> Iterator[None]:
    """Point MLflow's fluent API at ``settings`` for the block, then restore what was there.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` (and the registry variant), so the
    previous environment values are what gets restored.
    """
    previous_tracking = os.environ.get(TRACKING_URI_ENV)
    previous_registry = os.environ.get(REGISTRY_URI_ENV)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.effective_registry_uri)
    try:
        yield
    finally:
        # None clears both the global and the env var (MLflow's annotation leaves None out)
        mlflow.set_tracking_uri(previous_tracking)  # type: ignore[arg-type]
        mlflow.set_registry_uri(previous_registry)  # type: ignore[arg-type]
        if previous_registry is None:
            os.environ.pop(REGISTRY_URI_ENV, None)
