"""A registered segmenter as an MLflow ``pyfunc`` model: one call loads it, whatever its members.

``mlflow.pyfunc.load_model("models:/kampala_segmenter@champion").predict(images)`` gives class maps
for a batch of raw images ``(N, bands, H, W)`` (the pixel values as read from the rasters: the
members carry their own band statistics), by the same sliding-window TTA ensemble that the report
scored. The model's artefact is a bundle folder (:mod:`seg_pipeline.inference.bundle`); the class
must be importable where the model is loaded, i.e. this package installed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.pyfunc import PythonModel

#: The artefact key of the bundle folder inside the MLflow model.
BUNDLE_ARTIFACT = "bundle"


class SegmenterModel(PythonModel):
    """Class maps ``(N, H, W)`` of raw images ``(N, bands, H, W)`` from a bundle's members."""

    def load_context(self, context: Any) -> None:
        """Read the bundle and load its members once."""
        from seg_pipeline.inference.bundle import load_members, read_bundle

        self.bundle = read_bundle(Path(context.artifacts[BUNDLE_ARTIFACT]))
        self.members = load_members(self.bundle)

    # model_input is left unannotated: MLflow reads predict()'s type hints as a schema and warns at
    # every load that ``Any`` (or an array) is none; the logged signature describes the input instead.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> np.ndarray:  # type: ignore[no-untyped-def]
        """Predict each image of the batch as a raster (windows, TTA, weights, offsets as scored)."""
        import rasterio

        from seg_pipeline.data.raster_io import write_geotiff
        from seg_pipeline.inference.bundle import predict_bundle

        if isinstance(model_input, dict) and len(model_input) == 1:  # a named tensor of another signature
            model_input = next(iter(model_input.values()))
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[np.newaxis]
        if images.ndim != 4:
            raise ValueError(f"give images as (N, bands, H, W) or (bands, H, W), not shape {images.shape}")
        settings = self.bundle.predict.replace(color_png=False, write_probabilities=False)
        with tempfile.TemporaryDirectory(prefix="seg-pipeline-pyfunc-") as folder:
            names = [f"input_{index:05d}" for index in range(len(images))]
            inputs = [
                (name, write_geotiff(Path(folder) / f"{name}.tif", image, compress=None))
                for name, image in zip(names, images, strict=True)
            ]
            out = Path(folder) / "out"
            predict_bundle(self.bundle, inputs, out, settings, members=self.members)
            maps = []
            for item_id, _ in inputs:
                with rasterio.open(out / f"{item_id}.tif") as src:
                    maps.append(src.read(1))
        return np.stack(maps)
