"""seg_pipeline: raster tiles in, trained, evaluated and ensembled segmentation models out.

A pure library (``settings``, ``contracts``, ``data``, ``metrics``, ``models``, ``inference``,
``training``, ``evaluation``, ``tracking``, ``workflows``) under a thin Dagster layer
(``seg_pipeline.defs``; its ``Definitions`` object is ``seg_pipeline.definitions.defs``). Importing
the package imports neither Dagster nor torch; ``seg_pipeline.dagster_defs`` loads the Dagster
layer on first access, so ``dagster job execute -m seg_pipeline ...`` finds the definitions too.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    """Load the Dagster definitions lazily: only code that asks for them pays for Dagster."""
    if name == "dagster_defs":
        from seg_pipeline.definitions import defs

        return defs
    raise AttributeError(f"module 'seg_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    """Dagster's module loader lists attributes with ``dir()``; name the lazy one there."""
    return sorted([*globals(), "dagster_defs"])
