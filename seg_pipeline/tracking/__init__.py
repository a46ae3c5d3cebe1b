"""The one package that talks to MLflow: runs, params, metrics, artefacts, models, registry.

Everything else in the package calls this package, so MLflow's sharp edges are handled once:

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

from seg_pipeline.provenance import GitInfo, git_commit, git_info
from seg_pipeline.tracking._mlflow import configure_environment
from seg_pipeline.tracking.environment import environment_info, log_environment
from seg_pipeline.tracking.params import flatten_params, truncate_value
from seg_pipeline.tracking.probes import TrackingUnavailableError, check_tracking_uri, ensure_experiment
from seg_pipeline.tracking.registry import (
    ModelVersionInfo,
    get_alias_version,
    load_model,
    load_pyfunc,
    register_model,
    run_tag,
    set_alias,
)
from seg_pipeline.tracking.runs import (
    LoggedModelInfo,
    TrackedRun,
    default_pip_requirements,
    run_url,
    start_run,
)
from seg_pipeline.tracking.settings import DEFAULT_EXPERIMENT_NAME, TrackingSettings, default_tracking_uri
from seg_pipeline.tracking.tags import (
    TAG_ASSET_KEY,
    TAG_CODE_VERSION,
    TAG_DATA_VERSION,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_KIND,
    TAG_MEMBER,
    TAG_PIPELINE_RUN_ID,
    TAG_STAGE,
    RunTags,
    build_run_tags,
)

__all__ = [
    "DEFAULT_EXPERIMENT_NAME",
    "TAG_ASSET_KEY",
    "TAG_CODE_VERSION",
    "TAG_DATA_VERSION",
    "TAG_GIT_COMMIT",
    "TAG_GIT_DIRTY",
    "TAG_KIND",
    "TAG_MEMBER",
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
    "load_pyfunc",
    "log_environment",
    "register_model",
    "run_tag",
    "run_url",
    "set_alias",
    "start_run",
    "truncate_value",
]
