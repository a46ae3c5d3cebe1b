"""Entry point for Dagster tools: ``dagster job execute -m seg_pipeline.definitions`` and ``dg``."""

from seg_pipeline.defs.definitions import defs

__all__ = ["defs"]
