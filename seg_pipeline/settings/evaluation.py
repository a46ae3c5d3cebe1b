"""Settings of evaluation: how predictions are scored, the report, and the gates that use the scores."""

from __future__ import annotations

from pydantic import Field

from seg_pipeline.settings.base import Settings


class ScoringSettings(Settings):
    """How a prediction is scored against its truth: the same rules in validation and in the report.

    Which classes are pooled into "the foreground" (seed 003's fire IoU, patch detection) is a
    property of the dataset (``positive_classes`` of the ingest settings), not set here.
    """

    ignore_nonpositive: bool = Field(default=False, description="Seed-000 rule: labels <= 0 are not scored.")
    detection_min_pixels: int = Field(
        default=1,
        ge=1,
        description="Patch detection (seed 003 'has fire'): a tile counts as positive when at least this "
        "many of its pixels belong to the dataset's positive classes (1 = any pixel), in prediction and "
        "truth alike.",
    )


class EvaluationSettings(Settings):
    """Scoring every prediction set against the ground truth, and the report's quality gates."""

    scoring: ScoringSettings = Field(
        default_factory=ScoringSettings, description="Scoring rules (shared with validation)."
    )
    overlays: int = Field(default=3, ge=0, description="Tiles drawn as image | truth | prediction | errors.")
    gallery: int = Field(
        default=6,
        ge=0,
        le=24,
        description="Tiles in the prediction gallery (image | truth | ensemble, one row each; 0 = none), "
        "picked evenly over the split.",
    )
    miou_floor: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Check: the ensemble mIoU must reach this."
    )
    ensemble_tolerance: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="Check: the ensemble may trail the best single model by this much.",
    )


class ChampionSettings(Settings):
    """The gate that moves the registry alias to a new model only when it beats the current holder."""

    alias: str = Field(default="champion", min_length=1, description="Registry alias the gate moves.")
    margin: float = Field(
        default=0.0, ge=0.0, description="Promote only when better than the champion by this mIoU."
    )
