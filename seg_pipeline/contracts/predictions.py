"""What inference and evaluation hand on: prediction sets, the evaluation report, the champion decision."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from seg_pipeline.contracts.base import Contract
from seg_pipeline.settings.inference import PredictSettings

#: Name of the ensemble's prediction set and of its row in the report (never a member's name).
ENSEMBLE = "ensemble"


class PredictionItem(Contract):
    """One predicted tile: its id, the image that was predicted and its ground truth (if any)."""

    item_id: str
    input: str
    target: str | None = None


class EnsembleMember(Contract):
    """One model of the ensemble, and its registry entry when it has one."""

    name: str
    checkpoint: str
    registered_model: str | None = None
    registered_version: str | None = None


class EnsembleTuning(Contract):
    """What was tuned on which split, and the tuning-split scores that decided it."""

    split: str
    pixels: int = Field(description="Labelled pixels sampled from the tuning split.")
    weights: dict[str, float] = Field(description="Member name -> ensemble weight (0 = dropped).")
    class_bias: list[float] = Field(
        description="Per-class offsets added to the ensemble's log-probabilities."
    )
    scores: dict[str, float] = Field(description="Tuning-split mIoU of every candidate that was scored.")
    notes: list[str] = Field(default_factory=list, description="Each decision and why, in words.")
    scales: list[float] | None = Field(
        default=None, description="TTA scales chosen on the tuning split (null: as configured)."
    )
    flips: list[str] | None = Field(
        default=None, description="TTA transforms chosen on the tuning split (null: as configured)."
    )


class PredictionSet(Contract):
    """Class maps of one split by each single model (``sets[name]``) and by the ensemble."""

    split: str
    out_root: str
    sets: dict[str, str] = Field(description="Prediction set name -> folder of <item_id>.tif class maps.")
    items: list[PredictionItem]
    members: list[EnsembleMember]
    candidate: str = Field(description="The member the champion gate may promote.")
    class_names: list[str]
    class_colors: list[list[int]] = Field(
        default_factory=list, description="Display colour [r, g, b] of each class ([] = by class name)."
    )
    ignore_index: int
    positive_classes: list[int] = Field(
        default_factory=list,
        description="Foreground class ids pooled in the report ([] = all after the first).",
    )
    views_per_input: int
    settings: PredictSettings
    seconds: dict[str, float] = Field(default_factory=dict)
    precision: str = Field(
        default="", description="Device, autocast dtype and memory format of the forward passes, and why."
    )
    tuning: EnsembleTuning | None = Field(default=None, description="Choices tuned before predicting.")

    def member(self, name: str) -> EnsembleMember:
        """The member called ``name``."""
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(f"no ensemble member {name!r}; members are {[m.name for m in self.members]}")

    def folder(self, name: str) -> Path:
        """The folder of prediction set ``name``."""
        return Path(self.sets[name])


class ModelScores(Contract):
    """The scores of one prediction set against the ground truth (macro means skip NaN classes)."""

    name: str
    miou: float
    mdice: float
    mprecision: float
    mrecall: float
    pixel_accuracy: float
    fwiou: float
    kappa: float
    iou: dict[str, float] = Field(description="Per-class IoU by class name (NaN: class absent from both).")
    pooled: dict[str, float] = Field(
        default_factory=dict, description="IoU, Dice, precision, recall of the positive classes pooled."
    )
    detection: dict[str, float] = Field(
        default_factory=dict,
        description="Tile-level 'holds a positive class' accuracy, precision, recall, F1.",
    )


class ClassDelta(Contract):
    """Per-class IoU of the ensemble against the best single model."""

    class_name: str
    best_single: float
    ensemble: float
    delta: float


class EvaluationReport(Contract):
    """Every prediction set scored on one split, and where the report files are."""

    split: str
    report_dir: str
    markdown: str
    scores: list[ModelScores]
    deltas: list[ClassDelta]
    best_single: str
    confusion_png: str
    overlays: list[str]
    figures: dict[str, str] = Field(
        default_factory=dict, description="Figure name (per_class_iou, gallery, ...) -> PNG in the report."
    )
    figure_urls: dict[str, str] = Field(
        default_factory=dict,
        description="Figure name -> its copy in the MLflow run as the MLflow UI serves it (inline pictures).",
    )
    run_id: str | None = None
    run_url: str | None = None
    miou_floor: float
    ensemble_tolerance: float

    def score(self, name: str) -> ModelScores:
        """The scores of prediction set ``name``."""
        for scores in self.scores:
            if scores.name == name:
                return scores
        raise KeyError(f"no scores for {name!r}; scored sets are {[s.name for s in self.scores]}")


class DeployedMember(Contract):
    """One model of a deployable segmenter and its weight in the merge."""

    name: str
    checkpoint: str = Field(description="Stage checkpoint (weights, spec, classes, band statistics).")
    weight: float = Field(default=1.0, gt=0.0)


class DeployableModel(Contract):
    """What the champion gate registers: a single model or an ensemble, with the inference settings
    (TTA views, merge, windows, class offsets) it was scored with, so the deployed model predicts
    exactly what the report measured.
    """

    kind: Literal["single", "ensemble"]
    members: list[DeployedMember] = Field(min_length=1)
    class_bias: list[float] | None = Field(
        default=None, description="Per-class offsets added to the merged log-probabilities (tuned)."
    )
    predict: PredictSettings = Field(description="TTA, windows and merge of the scored predictions.")
    score: float = Field(description="Its mIoU on the evaluation split.")
    split: str = Field(description="The split ``score`` was measured on.")
    reason: str = Field(description="Why this one was chosen, in words.")


class ChampionDecision(Contract):
    """What the champion gate decided, and why."""

    promoted: bool
    reason: str
    model_name: str
    alias: str
    candidate_version: str
    previous_version: str | None
    candidate_score: float
    champion_score: float | None
    margin: float
    candidate_url: str | None = Field(default=None, description="MLflow UI page of the candidate version.")
    champion_url: str | None = Field(
        default=None, description="MLflow UI page of the version the alias points at after the gate."
    )
    deployed: DeployableModel | None = Field(
        default=None, description="The candidate version: one model or the ensemble, and why."
    )
