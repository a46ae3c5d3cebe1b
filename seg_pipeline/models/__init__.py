"""Models: the SMP factory and wrapper (``factory``) and checkpoint files (``checkpoint``).

Below both training and inference: training builds and saves models, inference loads them.
"""

from seg_pipeline.models.factory import (
    ARCHITECTURES,
    ModelSpec,
    SegmentationModel,
    build_model,
    count_parameters,
)

__all__ = ["ARCHITECTURES", "ModelSpec", "SegmentationModel", "build_model", "count_parameters"]
