"""Fail fast, with a message that says what to do, when the tracking store cannot be used.

MLflow's own HTTP client retries for minutes; these checks answer in seconds, before training starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from pathlib import Path

from mlflow.exceptions import MlflowException

from seg_pipeline.tracking._mlflow import TRACKING_URI_ENV
from seg_pipeline.tracking.settings import _DEFAULT_DB_PORTS, _HTTP_SCHEMES, TrackingSettings, _scheme

_logger = logging.getLogger(__name__)


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be reached or written; raised before any training starts."""


def _unavailable(uri: str, problem: str, hint: str | None = None) -> TrackingUnavailableError:
    hint = hint or (
        "Start the MLflow server (e.g. `mlflow server --host 127.0.0.1 --port 5000`) or unset "
        f"{TRACKING_URI_ENV} to use the local SQLite store under <data_root>/mlflow."
    )
    return TrackingUnavailableError(f"MLflow tracking URI {uri!r} is unavailable: {problem}. {hint}")


def _http_auth_headers() -> dict[str, str]:
    """Auth headers the way MLflow's own client builds them from its environment variables."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _check_http(uri: str, timeout_s: float) -> None:
    probe_url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(probe_url, headers=_http_auth_headers(), method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read(1024)
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise _unavailable(
                uri,
                f"the server refused the request (HTTP {error.code})",
                "Set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, or unset "
                f"{TRACKING_URI_ENV} to use the local SQLite store.",
            ) from error
        if error.code == 404:
            raise _unavailable(
                uri,
                f"GET {probe_url} returned HTTP 404, so this is not an MLflow tracking server",
                f"Check the host, port and path prefix in {TRACKING_URI_ENV}, or unset it to use the "
                "local SQLite store.",
            ) from error
        raise _unavailable(uri, f"GET {probe_url} returned HTTP {error.code} ({error.reason})") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise _unavailable(uri, f"cannot connect ({type(reason).__name__}: {reason})") from error


def _check_local_folder(uri: str, folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unavailable(
            uri,
            f"cannot create the {what} folder {str(folder)!r} ({error})",
            f"Choose a writable data_root or set {TRACKING_URI_ENV} to a writable location.",
        ) from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _unavailable(
            uri,
            f"the {what} folder {str(folder)!r} is not writable",
            f"Fix its permissions, choose another data_root or set {TRACKING_URI_ENV}.",
        )


def _sqlite_path(uri: str) -> Path | None:
    """Return the database file of a ``sqlite:///`` URI, or None for an in-memory database."""
    path_part = uri.split("://", 1)[1] if "://" in uri else ""
    path_part = path_part.split("?", 1)[0]
    if path_part in ("", "/", "/:memory:"):
        return None
    return Path(path_part[1:] if path_part.startswith("/") else path_part)


def _check_sqlite(uri: str, timeout_s: float) -> None:
    db_path = _sqlite_path(uri)
    if db_path is None:
        return
    _check_local_folder(uri, db_path.parent, "database")
    if not db_path.exists():
        return  # MLflow creates the tables on first use
    try:
        connection = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=rw", uri=True, timeout=timeout_s)
        try:
            connection.execute("PRAGMA schema_version").fetchone()
        finally:
            connection.close()
    except sqlite3.Error as error:
        raise _unavailable(
            uri,
            f"{str(db_path)!r} cannot be opened as a writable SQLite database ({error})",
            "Move the file aside (MLflow will create a fresh store) or point "
            f"{TRACKING_URI_ENV} at another database.",
        ) from error


def _check_tcp(uri: str, timeout_s: float) -> None:
    parsed = urllib.parse.urlparse(uri)
    port = parsed.port or _DEFAULT_DB_PORTS.get(_scheme(uri))
    if not parsed.hostname or port is None:
        return
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            pass
    except OSError as error:
        raise _unavailable(
            uri,
            f"cannot open a connection to {parsed.hostname}:{port} ({error})",
            f"Start the database or unset {TRACKING_URI_ENV} to use the local SQLite store.",
        ) from error


def check_tracking_uri(settings: TrackingSettings, timeout_s: float = 5.0) -> None:
    """Fail fast with :class:`TrackingUnavailableError` when the tracking store cannot be used.

    Call this before training starts: http(s) servers get one GET on the experiments-search endpoint
    (MLflow's own client would retry for minutes), SQLite and file stores get their folders created
    and checked for write access, database servers get a TCP connect. Other schemes pass unchecked.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be positive (seconds to wait for the server)")
    uri = settings.tracking_uri
    scheme = _scheme(uri)
    if scheme in _HTTP_SCHEMES:
        _check_http(uri, timeout_s)
    elif scheme == "sqlite":
        _check_sqlite(uri, timeout_s)
    elif scheme in ("file", ""):
        local = Path(urllib.parse.urlparse(uri).path) if scheme == "file" else Path(uri)
        _check_local_folder(uri, local, "file store")
    elif scheme in _DEFAULT_DB_PORTS:
        _check_tcp(uri, timeout_s)
    if settings.artifact_root is not None:
        _check_local_folder(uri, settings.artifact_root, "artifact")
    if settings.registry_uri and settings.registry_uri != uri:
        check_tracking_uri(
            dataclasses.replace(settings, tracking_uri=settings.registry_uri, registry_uri=None)
        )


#: MLflow 3's UI opens an experiment by its kind: without it, it may guess GenAI and show "Traces".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: "custom_model_development"}


def ensure_experiment(settings: TrackingSettings) -> str:
    """Return the experiment id for ``settings.experiment_name``, creating it with the artefact root.

    A deleted experiment of that name is restored (MLflow refuses to create a new one with the name);
    an existing experiment keeps the artefact location it was created with.
    """
    client = settings.client()
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        artifact_location = settings.artifact_root.resolve().as_uri() if settings.artifact_root else None
        try:
            return client.create_experiment(
                settings.experiment_name, artifact_location=artifact_location, tags=EXPERIMENT_TAGS
            )
        except MlflowException:
            experiment = client.get_experiment_by_name(settings.experiment_name)  # created concurrently
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        _logger.warning("Restoring deleted MLflow experiment %r", settings.experiment_name)
        client.restore_experiment(experiment.experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before the tag existed: the UI guessed
        client.set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_TAGS[EXPERIMENT_KIND_TAG]
        )
    if settings.artifact_root is not None:
        wanted = settings.artifact_root.resolve().as_uri()
        if experiment.artifact_location.rstrip("/") != wanted.rstrip("/"):
            _logger.warning(
                "MLflow experiment %r keeps its artifact location %s (settings ask for %s)",
                settings.experiment_name,
                experiment.artifact_location,
                wanted,
            )
    return experiment.experiment_id
