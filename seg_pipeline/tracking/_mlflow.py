"""Import MLflow the offline-friendly way: telemetry off and git quiet *before* ``import mlflow``.

Every module of this package imports ``mlflow`` from here, so the switches always take effect.
"""

from __future__ import annotations

import os
import sys

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

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
REGISTRY_URI_ENV = "MLFLOW_REGISTRY_URI"

__all__ = ["REGISTRY_URI_ENV", "TRACKING_URI_ENV", "configure_environment", "mlflow"]
