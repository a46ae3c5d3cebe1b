"""Settings of prediction: test-time augmentation, sliding windows, devices and what gets written."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from seg_pipeline.settings.base import DEVICE_PATTERN, Settings, override
from seg_pipeline.settings.evaluation import ScoringSettings

#: Names ``flips`` accepts: dihedral transforms plus ``d4`` (all 8) and ``hv`` (= rot180).
FLIP_NAMES = ("none", "h", "v", "rot90", "rot180", "rot270", "transpose", "antitranspose", "d4", "hv")


class TTASettings(Settings):
    """Test-time augmentation: every model sees every scale x flip; outputs are merged."""

    scales: list[float] = Field(default=[0.75, 1.0, 1.25], min_length=1, description="Resize factors.")
    flips: list[str] = Field(
        default=["none", "h", "v"],
        min_length=1,
        description="Dihedral views: none, h, v, rot90, rot180, rot270, transpose, antitranspose, d4.",
    )
    merge: Literal["mean_prob", "mean_logit"] = Field(
        default="mean_prob", description="Average softmax probabilities, or average logits then softmax."
    )

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, value: list[float]) -> list[float]:
        if any(not 0 < scale < float("inf") for scale in value):
            raise ValueError("scales must be finite and > 0")
        return value

    @field_validator("flips")
    @classmethod
    def _known_flips(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in FLIP_NAMES]
        if unknown:
            raise ValueError(f"unknown transform(s) {unknown}; use any of {list(FLIP_NAMES)}")
        return value


class WindowSettings(Settings):
    """Sliding windows over rasters of any size; memory depends on the window, not the raster."""

    window: int = Field(
        default=1024,
        ge=16,
        description="Largest window side in pixels (windows shrink to fit the raster). A CPU runs "
        "Unet-resnet18 at about the same Mpx/s from 512 to 1280 px, and larger windows share fewer pixels.",
    )
    overlap: int = Field(
        default=32,
        ge=0,
        description="Least pixels shared by neighbouring windows (must be < window); blended with a cosine "
        "ramp. Every overlapping pixel is predicted twice: 32 of 1024 costs about 6 %, 64 of 512 about 30 %.",
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Windows per forward pass; null = 4 on CUDA, 1 elsewhere (on a 2-core CPU batches of "
        "4 were no faster and took 450 MB more for a 10000 px scene).",
    )

    def for_device(self, device_type: str) -> Self:
        """These settings with ``batch_size`` resolved for a device type (``"cuda"``, ``"cpu"``...)."""
        if self.batch_size is not None:
            return self
        return self.model_copy(update={"batch_size": 4 if device_type == "cuda" else 1})

    @property
    def windows_per_pass(self) -> int:
        """``batch_size``, or the CPU default (1) when it was not resolved for a device."""
        return self.batch_size or 1

    @model_validator(mode="after")
    def _overlap_below_window(self) -> Self:
        if self.overlap >= self.window:
            raise ValueError(f"overlap={self.overlap} must be smaller than window={self.window}")
        return self


class ValidationTTASettings(TTASettings):
    """Validation runs one view by default: the number that picks best.pt is the plain model's."""

    scales: list[float] = override(TTASettings, "scales", [1.0])
    flips: list[str] = override(TTASettings, "flips", ["none"])


class ValidationSettings(Settings):
    """Each epoch's validation: whole validation tiles through the same sliding windows as inference."""

    windows: WindowSettings = Field(default_factory=WindowSettings, description="Sliding windows.")
    tta: ValidationTTASettings = Field(
        default_factory=ValidationTTASettings, description="Views (none extra)."
    )
    scoring: ScoringSettings = Field(
        default_factory=ScoringSettings, description="Scoring rules (shared with the evaluation report)."
    )


class TuningSettings(Settings):
    """Ensemble choices made on a labelled split other than the evaluated one, before predicting it."""

    split: str = Field(
        default="val", description="Labelled split the choices are scored on (never the evaluated split)."
    )
    members: bool = Field(
        default=True, description="Give weight 0 to ensemble members that lower its mIoU on the tuning split."
    )
    class_bias: bool = Field(
        default=True,
        description="Tune per-class decision offsets (log-prior bias) of the ensemble for mIoU on the "
        "tuning split; the single models stay as trained.",
    )
    views: bool = Field(
        default=False,
        description="Choose the TTA views (a subset of tta.scales x tta.flips, the same for every "
        "member) with the highest ensemble mIoU on the tuning split; of views within 1e-4 of the best, "
        "the fewest (cheaper to predict). Some views hurt a model trained without them.",
    )
    max_pixels: int = Field(
        default=1_000_000,
        ge=1000,
        description="Labelled pixels sampled from the tuning split (bounds memory).",
    )
    max_side: int = Field(
        default=2048, ge=64, description="Larger tuning tiles are scored on one seeded window of this side."
    )

    @property
    def enabled(self) -> bool:
        """Whether anything is tuned (else no tuning pass runs)."""
        return self.members or self.class_bias or self.views


class PostprocessSettings(Settings):
    """Clean-up of the written class maps (opening/closing, small regions); off by default.

    Only class maps change: probabilities beside them stay raw. Large rasters are cleaned in strips
    with enough rows of context for the result of cleaning the whole map at once (no seams).
    """

    open_radius: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Disk radius (px) of a per-class opening: removes specks, spurs and lines thinner "
        "than the disk, each pixel taking the nearest other class; 0 = no opening.",
    )
    close_radius: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Disk radius (px) of a per-class closing: fills gaps and holes thinner than the disk; "
        "0 = no closing.",
    )
    order: Literal["open_close", "close_open"] = Field(
        default="open_close", description="Which runs first when both the opening and the closing are on."
    )
    min_area: int = Field(
        default=1,
        ge=1,
        le=10_000,
        description="After the opening/closing, connected regions of fewer pixels take the majority class "
        "around them; 1 = keep every region. Strips are cleaned with 2 x min_area rows of context.",
    )
    connectivity: int = Field(
        default=8, description="Neighbours that join pixels into one region for min_area: 4 or 8 (diagonals)."
    )
    classes: list[str] = Field(
        default=[],
        description="Names of the classes cleaned (their specks removed, gaps filled, small regions "
        "relabelled); [] = every class.",
    )

    @field_validator("connectivity")
    @classmethod
    def _four_or_eight(cls, value: int) -> int:
        if value not in (4, 8):
            raise ValueError("connectivity must be 4 or 8")
        return value

    @property
    def enabled(self) -> bool:
        """Whether any class map can change (else prediction writes exactly what it did without)."""
        return self.open_radius > 0 or self.close_radius > 0 or self.min_area > 1


class PredictSettings(Settings):
    """Predicting a split (or a folder) with single models and their TTA ensemble."""

    split: str = Field(default="test", description="Split to predict; falls back to 'val' when it is empty.")
    tta: TTASettings = Field(default_factory=TTASettings, description="Test-time augmentation.")
    windows: WindowSettings = Field(default_factory=WindowSettings, description="Sliding windows.")
    device: str = Field(default="auto", pattern=DEVICE_PATTERN, description="auto, cpu, mps, cuda or cuda:N.")
    bf16: bool | None = Field(
        default=None,
        description="bf16 autocast for the forward passes; null = on for bf16 GPUs and AMX CPUs, else fp32.",
    )
    channels_last: bool | None = Field(
        default=None,
        description="Channels-last (NHWC) models and windows; null = on for CPU and CUDA, off for MPS. On a "
        "2-core AMX CPU it made a Unet-resnet18 forward pass 2-3x faster in bf16 and 1.3x in fp32.",
    )
    fold_batchnorm: bool = Field(
        default=True,
        description="Fold each BatchNorm into the convolution before it for the forward passes (the same "
        "outputs up to float rounding; the bare passes of bench/bench_predict.py ran 10-13 % faster on a "
        "2-core CPU); a model whose folded copy differs runs as loaded.",
    )
    tuning: TuningSettings = Field(
        default_factory=TuningSettings, description="Member weights and decision offsets tuned on validation."
    )
    extra_checkpoints: list[str] = Field(
        default=[], description="More ensemble members: stage checkpoints or MLflow model URIs."
    )
    write_probabilities: bool = Field(default=False, description="Also write per-class probability GeoTIFFs.")
    color_png: bool = Field(
        default=True, description="Also write a colourised PNG quick-look per prediction."
    )
    postprocess: PostprocessSettings = Field(
        default_factory=PostprocessSettings,
        description="Morphological clean-up of the class maps (the evaluation scores the cleaned maps); "
        "probabilities stay raw. Off by default.",
    )
