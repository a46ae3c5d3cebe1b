"""Code versions derived from the source the asset runs, so Dagster sees a code change by itself."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from typing import Any


def code_version(*entry_points: Callable[..., Any]) -> str:
    """A short hash of the source files that define ``entry_points`` (the library calls of an asset)."""
    digest = hashlib.sha256()
    for module in sorted({inspect.getmodule(fn).__name__ for fn in entry_points}):  # type: ignore[union-attr]
        digest.update(module.encode())
        digest.update(inspect.getsource(__import__(module, fromlist=["_"])).encode())
    return digest.hexdigest()[:12]
