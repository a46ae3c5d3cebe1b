"""Code versions derived from the source the asset runs, so Dagster sees a code change by itself."""

from __future__ import annotations

import hashlib
import importlib
from importlib.machinery import PathFinder
from pathlib import Path


def code_version(*modules: str) -> str:
    """A short hash of the source files of ``modules`` (the library entry points of an asset).

    Read from disk without importing them: the asset modules bind their workflows lazily
    (:mod:`seg_pipeline.defs.lazy`), and a code version must not be what loads torch.
    """
    digest = hashlib.sha256()
    for module in sorted(set(modules)):
        # PathFinder, not importlib.util.find_spec: that reads ``sys.modules[module].__spec__``,
        # which would execute a lazily bound module.
        package, _, leaf = module.rpartition(".")
        spec = PathFinder.find_spec(leaf, importlib.import_module(package).__path__)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"no module named {module!r}", name=module)
        digest.update(module.encode())
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()[:12]
