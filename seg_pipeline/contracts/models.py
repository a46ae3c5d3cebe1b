"""What a training stage hands on: the trained model, where its weights are, how it was tracked."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from seg_pipeline.contracts.base import Contract
from seg_pipeline.contracts.data import BandStatistics
from seg_pipeline.settings.models import ModelSpec


class TrackingRecord(Contract):
    """The MLflow run of a step and, for training, the logged and registered model."""

    run_id: str
    run_url: str
    model_uri: str | None = None
    model_id: str | None = Field(default=None, description="MLflow 3 logged-model id (m-...).")
    model_url: str | None = Field(default=None, description="MLflow UI page of that logged model.")
    registered_model: str | None = None
    registered_version: str | None = None
    registered_version_url: str | None = Field(default=None, description="MLflow UI page of that version.")
    curves_url: str | None = Field(
        default=None,
        description="The run's training-curves PNG as the MLflow UI serves it (inline pictures).",
    )


class TrainedModel(Contract):
    """A trained stage: its best checkpoint and everything inference needs to use it correctly."""

    stage: str
    checkpoint: str = Field(
        description="The checkpoint handed on: best.pt, or final.pt with loop.hand_over: final (or "
        "when nothing was monitored)."
    )
    last_checkpoint: str | None
    checkpoint_dir: str
    spec: ModelSpec
    class_names: list[str]
    ignore_index: int
    normalization: BandStatistics
    monitor: str
    best_score: float | None = Field(description="Monitor value of the handed-on checkpoint's epoch.")
    score_floor: float = Field(default=0.0, description="The floor the model's check holds best_score to.")
    best_epoch: int | None = Field(description="Epoch of the handed-on checkpoint.")
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int
    per_class_iou: dict[str, float]
    history: list[dict[str, float]]
    wall_time_s: float
    images_per_s: float
    device: str
    precision: str
    world_size: int = 1
    curve_path: str | None = None
    tracking: TrackingRecord | None = None

    @property
    def checkpoint_path(self) -> Path:
        """The best checkpoint as a path."""
        return Path(self.checkpoint)

    @property
    def last_epoch_logs(self) -> dict[str, float]:
        """The logs of the last epoch that ran (empty when none did)."""
        return dict(self.history[-1]) if self.history else {}


class ExportedModel(Contract):
    """A model exported for runtimes without this package (seed 000): the files and their parity."""

    stage: str = Field(description="The training stage whose best checkpoint was exported.")
    checkpoint: str = Field(description="The exported checkpoint (EMA weights when it holds them).")
    out_dir: str
    files: dict[str, str] = Field(description="Format (torchscript, onnx, card) -> file.")
    max_abs_diff: dict[str, float | None] = Field(
        description="Largest logit difference to the eager model per format (None: checked structurally)."
    )
    registered_version: str | None = Field(
        default=None, description="The MLflow model version the checkpoint was registered as."
    )
    champion: bool = Field(
        default=False, description="Whether the champion gate promoted this model in the same run."
    )


class NamedModel(Contract):
    """A trained model under the name it has in the ensemble."""

    name: str
    model: TrainedModel


class MemberModels(Contract):
    """The extra ensemble members (``extra_members``), in the order the config lists them."""

    members: list[NamedModel] = Field(default_factory=list)
