"""The one place that talks to MLflow: runs, params, metrics, artefacts, models and the registry (DESIGN F29).

Everything else in the package calls this module, so MLflow's sharp edges are handled once:

* the default store is SQLite under ``<data_root>/mlflow`` with artefacts beside it (never ``./mlruns``);
* telemetry is off before ``mlflow`` is first imported (the import itself would start it);
* an unreachable tracking URI fails in seconds with a message that says what to do, instead of
  MLflow's HTTP client retrying for minutes after training has already started;
* metrics and params go out as one ``log_batch`` per call (one ``log_metric`` costs ~10 ms on SQLite);
* models are logged with ``serialization_format="pickle"`` and explicit ``pip_requirements``
  (MLflow 3's default ``pt2`` format needs an input example, and inferring requirements takes 7-10 s).

MLflow's fluent API keeps the tracking URI in process-global state; the functions here set it only for
the duration of one call or one ``with`` block and restore the previous value afterwards. This module
never imports dagster, and imports torch only inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

# Set before ``import mlflow``: MLflow starts its telemetry client (and writes ~/.config/mlflow) at import.
_OFFLINE_ENV_DEFAULTS: dict[str, str] = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # MLflow imports GitPython to tag the source commit; without a git binary it warns loudly on import.
    "GIT_PYTHON_REFRESH": "quiet",
}


def configure_environment() -> None:
    """Set offline-friendly MLflow environment defaults without overriding what the user exported.

    Runs once when this module is imported (before ``mlflow`` is imported). If ``mlflow`` was already
    imported elsewhere, its telemetry client is re-initialised so the switch still takes effect.
    """
    for name, value in _OFFLINE_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if "mlflow.telemetry" in sys.modules:
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()


configure_environment()

import mlflow  # noqa: E402  (must follow configure_environment, see above)
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.utils.validation import (  # noqa: E402
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

_logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT_NAME = "seg_pipeline"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
REGISTRY_URI_ENV = "MLFLOW_REGISTRY_URI"
TRUNCATION_MARKER = "..."

# Tag keys. ``mlflow.source.git.commit`` is MLflow's own key, so the UI shows the commit natively.
TAG_PIPELINE_RUN_ID = "dagster.run_id"
TAG_ASSET_KEY = "dagster.asset_key"
TAG_STAGE = "seg_pipeline.stage"
TAG_CODE_VERSION = "seg_pipeline.code_version"
TAG_DATA_VERSION = "seg_pipeline.data_version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "seg_pipeline.git_dirty"

# Distribution names whose versions describe a run's environment (importlib.metadata names).
ENVIRONMENT_PACKAGES: tuple[str, ...] = (
    "torch",
    "torchvision",
    "segmentation-models-pytorch",
    "timm",
    "dagster",
    "mlflow",
    "rasterio",
    "numpy",
)
# What a pickled model needs at load time; written into the logged model's requirements.txt.
MODEL_REQUIREMENT_PACKAGES: tuple[str, ...] = ("torch", "segmentation-models-pytorch", "timm")

_HTTP_SCHEMES = ("http", "https")
_DEFAULT_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be reached or written; raised before any training starts."""


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class TrackingSettings:
    """Where runs, artefacts and registered models go.

    Attributes:
        tracking_uri: MLflow tracking URI (``sqlite:///...``, ``http://host:5000``, ``file:///...``).
        experiment_name: MLflow experiment that runs are filed under.
        artifact_root: Local folder for the experiment's artefacts when this module creates the
            experiment. None lets the tracking server decide (right for http servers that proxy
            artefacts, wrong for local stores, which would then write to ``./mlruns``).
        registry_uri: Model-registry URI; None means the tracking URI.
    """

    tracking_uri: str
    experiment_name: str = DEFAULT_EXPERIMENT_NAME
    artifact_root: Path | None = None
    registry_uri: str | None = None

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
        cls, data_root: Path, experiment_name: str = DEFAULT_EXPERIMENT_NAME
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
        )

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
        mlflow.set_tracking_uri(previous_tracking)  # None clears both the global and the env var
        mlflow.set_registry_uri(previous_registry)  # type: ignore[arg-type]
        if previous_registry is None:
            os.environ.pop(REGISTRY_URI_ENV, None)


# --------------------------------------------------------------------------------------------------
# Reachability check
# --------------------------------------------------------------------------------------------------


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
            return client.create_experiment(settings.experiment_name, artifact_location=artifact_location)
        except MlflowException:
            experiment = client.get_experiment_by_name(settings.experiment_name)  # created concurrently
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        _logger.warning("Restoring deleted MLflow experiment %r", settings.experiment_name)
        client.restore_experiment(experiment.experiment_id)
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


# --------------------------------------------------------------------------------------------------
# Tags
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GitInfo:
    """The commit a run's code came from and whether tracked files had uncommitted changes."""

    commit: str
    dirty: bool


def git_info(repo_dir: Path) -> GitInfo | None:
    """Return the HEAD commit and dirty flag of the repository holding ``repo_dir``; None outside one."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo_dir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo_dir), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return GitInfo(commit=commit, dirty=bool(status.strip())) if commit else None


def git_commit(repo_dir: Path) -> str | None:
    """Return ``git rev-parse HEAD`` for ``repo_dir``, or None outside a repository or without git."""
    info = git_info(repo_dir)
    return info.commit if info else None


@dataclasses.dataclass(frozen=True)
class RunTags:
    """The standard tags every seg_pipeline MLflow run carries, so runs can be traced back.

    Attributes:
        stage: Pipeline stage, e.g. ``"pretrain"``, ``"kd"``, ``"evaluation"``.
        pipeline_run_id: Orchestrator (Dagster) run id, passed in as a plain string.
        asset_key: Asset key as a ``/``-joined string or a sequence of path parts.
        code_version: Code version of the asset that produced the run.
        data_version: Version of the input data.
        git_commit: Commit hash; see :meth:`with_git`.
        git_dirty: Whether tracked files had uncommitted changes.
    """

    stage: str
    pipeline_run_id: str | None = None
    asset_key: str | Sequence[str] | None = None
    code_version: str | None = None
    data_version: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.stage, str) or not self.stage.strip():
            raise ValueError(f"stage={self.stage!r} must be a non-empty string such as 'pretrain' or 'kd'")

    def with_git(self, repo_dir: Path) -> RunTags:
        """Return a copy with the git commit and dirty flag of ``repo_dir`` filled in (None outside git)."""
        info = git_info(repo_dir)
        if info is None:
            return self
        return dataclasses.replace(self, git_commit=info.commit, git_dirty=info.dirty)

    def to_dict(self) -> dict[str, str]:
        """Return the tags as MLflow tag keys and string values, leaving out the unknown ones."""
        asset_key = self.asset_key
        if asset_key is not None and not isinstance(asset_key, str):
            asset_key = "/".join(str(part) for part in asset_key)
        pairs = {
            TAG_STAGE: self.stage,
            TAG_PIPELINE_RUN_ID: self.pipeline_run_id,
            TAG_ASSET_KEY: asset_key,
            TAG_CODE_VERSION: self.code_version,
            TAG_DATA_VERSION: self.data_version,
            TAG_GIT_COMMIT: self.git_commit,
            TAG_GIT_DIRTY: None if self.git_dirty is None else str(self.git_dirty).lower(),
        }
        return {key: str(value) for key, value in pairs.items() if value is not None}


def build_run_tags(
    stage: str,
    *,
    pipeline_run_id: str | None = None,
    asset_key: str | Sequence[str] | None = None,
    code_version: str | None = None,
    data_version: str | None = None,
    repo_dir: Path | None = None,
) -> dict[str, str]:
    """Return the standard tag dict for a run; git commit and dirty flag come from ``repo_dir``."""
    tags = RunTags(
        stage=stage,
        pipeline_run_id=pipeline_run_id,
        asset_key=asset_key,
        code_version=code_version,
        data_version=data_version,
    )
    if repo_dir is not None:
        tags = tags.with_git(repo_dir)
    return tags.to_dict()


# --------------------------------------------------------------------------------------------------
# Params and metrics preparation
# --------------------------------------------------------------------------------------------------


def truncate_value(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters, ending in ``...`` so the cut is visible in the UI."""
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else list(value)
        return json.dumps(items, default=str)
    return str(value)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings (and dataclasses) into dot-joined keys with string values.

    ``{"optim": {"lr": 3e-4}}`` becomes ``{"optim.lr": "0.0003"}``; lists become JSON; values longer
    than MLflow's param limit (6000 characters) are truncated with a trailing ``...``.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        full_key = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            if value:
                flat.update(flatten_params(value, prefix=f"{full_key}."))
            else:
                flat[full_key] = "{}"
            continue
        flat[full_key] = truncate_value(_stringify(value), MAX_PARAM_VAL_LENGTH)
    return flat


def _metric_value(key: str, value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)  # numbers, numpy scalars and one-element tensors
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"metric {key!r} has value {value!r} of type {type(value).__name__}: pass a number "
            "(float, int, numpy scalar or one-element tensor)"
        ) from error


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoggedModelInfo:
    """What :meth:`TrackedRun.log_model` produced.

    Attributes:
        model_uri: URI that loads the model (MLflow 3: ``models:/m-<id>``).
        model_id: MLflow 3 logged-model id.
        registered_model_name: Registry name, if the model was registered.
        registered_version: Registry version, if the model was registered.
    """

    model_uri: str
    model_id: str | None
    registered_model_name: str | None = None
    registered_version: str | None = None


def default_pip_requirements() -> list[str]:
    """Return ``name==version`` for the installed model packages (local ``+cu130`` suffixes dropped).

    Passing these explicitly skips MLflow's 7-10 s requirement inference and keeps the list installable
    from PyPI.
    """
    requirements = []
    for package in MODEL_REQUIREMENT_PACKAGES:
        version = _package_version(package)
        if version is not None:
            requirements.append(f"{package}=={version.split('+', 1)[0]}")
    return requirements


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Return the MLflow UI link of a run for http servers, else ``<tracking_uri> run <run_id>``.

    Local stores have no UI address of their own (``mlflow ui --backend-store-uri <uri>`` serves them).
    """
    if _is_http(tracking_uri):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{tracking_uri} run {run_id}"


class TrackedRun:
    """One MLflow run, used as a context manager; see :func:`start_run`.

    Inside the ``with`` block MLflow's fluent API points at this run's store. Leaving the block ends
    the run as FINISHED, or as FAILED when an exception escapes (the exception propagates), and
    restores the previous tracking URI.
    """

    def __init__(
        self,
        settings: TrackingSettings,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        nested: bool = False,
    ) -> None:
        self.settings = settings
        self.run_name = run_name
        self.tags = {key: str(value) for key, value in (tags or {}).items()}
        self.nested = nested
        self._client = settings.client()
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._uri_scope: Any = None
        self._active_run: Any = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> TrackedRun:
        check_tracking_uri(self.settings)
        self._uri_scope = _using_uris(self.settings)
        self._uri_scope.__enter__()
        try:
            self._experiment_id = ensure_experiment(self.settings)
            self._active_run = mlflow.start_run(
                experiment_id=self._experiment_id,
                run_name=self.run_name,
                nested=self.nested,
                tags={key: truncate_value(value, MAX_TAG_VAL_LENGTH) for key, value in self.tags.items()},
            )
        except BaseException:
            self._uri_scope.__exit__(*sys.exc_info())
            raise
        self._run_id = self._active_run.info.run_id
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            # MLflow's ActiveRun ends the run FINISHED, or FAILED when exc_type is set.
            self._active_run.__exit__(exc_type, exc_value, traceback)
        finally:
            self._uri_scope.__exit__(exc_type, exc_value, traceback)

    @property
    def run_id(self) -> str:
        """The MLflow run id (available inside the ``with`` block and after it)."""
        if self._run_id is None:
            raise RuntimeError("the run has not started: use `with start_run(...) as run:`")
        return self._run_id

    @property
    def experiment_id(self) -> str:
        """The MLflow experiment id the run belongs to."""
        if self._experiment_id is None:
            raise RuntimeError("the run has not started: use `with start_run(...) as run:`")
        return self._experiment_id

    @property
    def url(self) -> str:
        """A browser link for http tracking servers, else a readable ``<uri> run <id>`` reference."""
        return run_url(self.settings.tracking_uri, self.experiment_id, self.run_id)

    @property
    def artifact_uri(self) -> str:
        """Root URI of this run's artefacts."""
        return self._client.get_run(self.run_id).info.artifact_uri

    # -- params, metrics, tags -----------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Log (nested) params flattened with dots, as few ``log_batch`` calls as MLflow allows.

        Returns the flattened params that were logged. MLflow rejects changing an already-logged param.
        """
        flat = flatten_params(params)
        entries = [Param(key, value) for key, value in flat.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk, synchronous=True)
        return flat

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log all ``metrics`` at ``step`` in one ``log_batch`` call (one row per metric per step)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be a non-negative int (epoch or global step)")
        timestamp_ms = int(time.time() * 1000)
        entries = [
            Metric(key, _metric_value(key, value), timestamp_ms, step) for key, value in metrics.items()
        ]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) run tags in one ``log_batch`` call."""
        entries = [RunTag(key, truncate_value(str(value), MAX_TAG_VAL_LENGTH)) for key, value in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=chunk, synchronous=True)

    # -- artefacts ---------------------------------------------------------------------------------

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder's contents, into the run's artefacts (under ``artifact_path``)."""
        local = Path(path)
        if not local.exists():
            raise ValueError(f"path={str(local)!r} does not exist: pass an existing file or folder to log")
        if local.is_dir():
            self._client.log_artifacts(self.run_id, str(local), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(local), artifact_path)

    def log_dict(self, obj: Mapping[str, Any] | list[Any], name: str) -> None:
        """Write ``obj`` as JSON or YAML (chosen by ``name``'s suffix) into the run's artefacts."""
        self._client.log_dict(self.run_id, obj, name)

    def log_text(self, text: str, name: str) -> None:
        """Write ``text`` to the artefact file ``name``."""
        self._client.log_text(self.run_id, text, name)

    def log_figure(self, figure: Any, name: str) -> None:
        """Save a matplotlib (or plotly) figure as the artefact file ``name`` (e.g. ``plots/loss.png``)."""
        self._client.log_figure(self.run_id, figure, name)

    # -- models ------------------------------------------------------------------------------------

    def log_model(
        self,
        model: Any,
        artifact_path: str = "model",
        registered_model_name: str | None = None,
        pip_requirements: Sequence[str] | None = None,
        step: int = 0,
    ) -> LoggedModelInfo:
        """Log a torch module with ``mlflow.pytorch.log_model`` (pickle format), optionally registering it.

        Pickle is used because MLflow 3's default ``pt2`` export needs an input example; the model's
        classes must be importable where it is loaded. ``pip_requirements`` defaults to the installed
        torch/SMP/timm versions, which also skips MLflow's slow requirement inference.
        """
        import mlflow.pytorch  # imports torch

        requirements = list(pip_requirements) if pip_requirements is not None else default_pip_requirements()
        with _using_uris(self.settings):
            info = mlflow.pytorch.log_model(
                model,
                name=artifact_path,
                serialization_format="pickle",
                pip_requirements=requirements,
                registered_model_name=registered_model_name,
                step=step,
                run_id=self.run_id,
            )
        version = info.registered_model_version
        return LoggedModelInfo(
            model_uri=info.model_uri,
            model_id=getattr(info, "model_id", None),
            registered_model_name=registered_model_name if version is not None else None,
            registered_version=None if version is None else str(version),
        )


def start_run(
    settings: TrackingSettings,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    nested: bool = False,
) -> TrackedRun:
    """Return a :class:`TrackedRun`; entering it checks the store, ensures the experiment and starts the run.

    Example:
        >>> with start_run(settings, "pretrain", build_run_tags("pretrain")) as run:  # doctest: +SKIP
        ...     run.log_metrics({"train/loss": 0.4}, step=0)
    """
    return TrackedRun(settings, run_name=run_name, tags=tags, nested=nested)


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


def _package_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment_info(repo_dir: Path | None = None) -> dict[str, Any]:
    """Describe the software environment: Python, platform, package versions, git and (if loaded) CUDA.

    Reads versions with ``importlib.metadata`` so nothing heavy (dagster, torch) gets imported here.
    """
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _package_version(name) for name in ENVIRONMENT_PACKAGES},
    }
    git = git_info(repo_dir if repo_dir is not None else Path.cwd())
    info["git_commit"] = git.commit if git else None
    info["git_dirty"] = git.dirty if git else None
    torch_module = sys.modules.get("torch")
    if torch_module is not None:  # only describe CUDA when the caller already paid for the torch import
        cuda_available = bool(torch_module.cuda.is_available())
        info["cuda"] = {
            "available": cuda_available,
            "version": torch_module.version.cuda,
            "device": torch_module.cuda.get_device_name(0) if cuda_available else None,
        }
    return info


def log_environment(run: TrackedRun, repo_dir: Path | None = None) -> dict[str, Any]:
    """Log the environment as ``env.*`` params, the git commit as tags, and an ``environment.json`` artefact.

    Returns the environment description that was logged.
    """
    info = environment_info(repo_dir)
    params: dict[str, Any] = {"env.python": info["python"], "env.platform": info["platform"]}
    params.update(
        {f"env.{name}": version for name, version in info["packages"].items() if version is not None}
    )
    run.log_params(params)
    if info["git_commit"] is not None:
        run.set_tags({TAG_GIT_COMMIT: info["git_commit"], TAG_GIT_DIRTY: str(info["git_dirty"]).lower()})
    run.log_dict(info, "environment.json")
    return info


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelVersionInfo:
    """A registered model version, reduced to what the pipeline needs.

    Attributes:
        name: Registered model name.
        version: Version number as a string.
        run_id: Run that produced the model, if known.
        source: Where the model's files live (``models:/m-...`` in MLflow 3).
        aliases: Aliases pointing at this version.
    """

    name: str
    version: str
    run_id: str | None
    source: str
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


__all__ = [
    "DEFAULT_EXPERIMENT_NAME",
    "TAG_ASSET_KEY",
    "TAG_CODE_VERSION",
    "TAG_DATA_VERSION",
    "TAG_GIT_COMMIT",
    "TAG_GIT_DIRTY",
    "TAG_PIPELINE_RUN_ID",
    "TAG_STAGE",
    "GitInfo",
    "LoggedModelInfo",
    "ModelVersionInfo",
    "RunTags",
    "TrackedRun",
    "TrackingSettings",
    "TrackingUnavailableError",
    "build_run_tags",
    "check_tracking_uri",
    "configure_environment",
    "default_pip_requirements",
    "default_tracking_uri",
    "ensure_experiment",
    "environment_info",
    "flatten_params",
    "get_alias_version",
    "git_commit",
    "git_info",
    "load_model",
    "log_environment",
    "register_model",
    "run_url",
    "set_alias",
    "start_run",
    "truncate_value",
]
