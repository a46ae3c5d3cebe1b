"""seg_pipeline: raster tiles in, trained, evaluated and ensembled segmentation models out.

A pure library (``settings``, ``contracts``, ``data``, ``metrics``, ``models``, ``inference``,
``training``, ``evaluation``, ``tracking``, ``workflows``) under a thin Dagster layer
(``seg_pipeline.defs``; its ``Definitions`` object is ``seg_pipeline.definitions.defs``). Importing
the package imports neither Dagster nor torch.
"""

__version__ = "0.2.0"
