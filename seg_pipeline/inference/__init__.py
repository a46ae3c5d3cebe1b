"""Inference: ensemble test-time augmentation, sliding-window prediction over rasters, writers.

Modules (one job each):

- ``tta``: invertible augmentations (scales x flips/rotations) and ``tta_predict`` that averages
  class probabilities over models and augmentations.
- ``ensemble``: ``EnsemblePredictor``, the models + TTA config bundled into a ``predict_fn``.
- ``tiling``: ``window_grid``, ``blend_weights`` and ``predict_raster`` (bounded-memory
  sliding-window inference from one raster to a GeoTIFF class map).
- ``writers``: GeoTIFF class-map/probability writers, palettes and colourised PNGs, all atomic.
- ``postprocess``: morphological opening/closing and minimum-region-area clean-up of class maps.
"""
