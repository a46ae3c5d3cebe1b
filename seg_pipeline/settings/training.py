"""Settings of a training stage, one group per component.

Model, loss, optimizer, scheduler, data, augmentation and the loop; stage 1 and stage 2 (KD) add
their own fields.

Values a user sets at ingest (class names, ``ignore_index``, band count, normalisation) are not here:
they reach training through the typed contracts (``seg_pipeline.contracts``), never re-typed.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from seg_pipeline.settings.base import Settings, override

Architecture = Literal[
    "unet",
    "unetplusplus",
    "deeplabv3",
    "deeplabv3plus",
    "fpn",
    "pspnet",
    "linknet",
    "manet",
    "pan",
    "upernet",
    "segformer",
]
#: Architecture name -> SMP class name, restricted to the architectures that work with the usual CNN
#: encoders (resnet*, efficientnet-*, mobilenet_v2, ...). SMP 0.6 also ships DPT, which only accepts
#: timm ViT encoders ("tu-vit_*") with a fixed image size, so it is left out on purpose.
SMP_CLASS_NAMES: dict[str, str] = {
    "unet": "Unet",
    "unetplusplus": "UnetPlusPlus",
    "deeplabv3": "DeepLabV3",
    "deeplabv3plus": "DeepLabV3Plus",
    "fpn": "FPN",
    "pspnet": "PSPNet",
    "linknet": "Linknet",
    "manet": "MAnet",
    "pan": "PAN",
    "upernet": "UPerNet",
    "segformer": "Segformer",
}
#: Loss terms that ``loss.name`` may join with ``+`` (``ce+dice``, ``dice+focal``...).
LOSS_TERMS = ("ce", "dice", "focal", "jaccard", "lovasz", "bce")
#: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``mps``, ``cuda`` or ``cuda:<index>``.
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"


class ModelSettings(Settings):
    """An SMP model: architecture x encoder. Bands and classes come from the data, not from here."""

    architecture: Architecture = Field(default="unet", description="SMP architecture.")
    encoder: str = Field(
        default="resnet34",
        description="SMP encoder: resnet18/34/50, efficientnet-b0..b7, mobilenet_v2, ... or tu-<timm name>.",
    )
    encoder_weights: str | None = Field(
        default=None,
        description="null trains from scratch (works offline); 'imagenet' downloads pretrained weights.",
    )
    positive_classes: list[int] | None = Field(
        default=None,
        description="Classes that count as positive for patch-level detection; null = every class > 0.",
    )

    @field_validator("architecture", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        import segmentation_models_pytorch as smp  # heavy (torch): only when an encoder is validated

        if value in smp.encoders.get_encoder_names():
            return value
        if value.startswith("tu-"):
            import timm

            if timm.is_model(value.removeprefix("tu-")):
                return value
        raise ValueError(
            f"unknown to segmentation_models_pytorch {smp.__version__}; use one of "
            f"{sorted(smp.encoders.get_encoder_names())} or 'tu-<timm model name>'"
        )


def check_arch_kwargs(spec: ModelSpec) -> None:
    """Reject keys the SMP class would silently swallow (its ``**kwargs`` go to the encoder)."""
    import inspect

    import segmentation_models_pytorch as smp  # heavy (torch): only when a spec has arch_kwargs

    owned = {"encoder_name", "encoder_weights", "in_channels", "classes"}
    # aux_params adds a classification head (forward would return a tuple); activation would
    # turn logits into probabilities. Both break the wrapper's contract.
    forbidden = owned | {"aux_params", "activation"}
    bad = sorted(set(spec.arch_kwargs) & forbidden)
    if bad:
        raise ValueError(
            f"arch_kwargs sets {bad}; set encoder/in_channels/num_classes/encoder_weights through the "
            "spec's own fields, and leave aux_params/activation unset (logits only)"
        )
    if not spec.arch_kwargs or spec.encoder.startswith("tu-"):  # timm judges its own kwargs
        return
    signature = inspect.signature(getattr(smp, SMP_CLASS_NAMES[spec.architecture]).__init__)
    variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    accepted = {n for n, p in signature.parameters.items() if p.kind not in variadic} - {"self"} - forbidden
    unknown = sorted(set(spec.arch_kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"arch_kwargs has keys {unknown} that {spec.architecture} does not accept; "
            f"valid keys are {sorted(accepted)}"
        )


class ModelSpec(ModelSettings):
    """A model as it is built and saved in checkpoints: the user's choice plus what the data decides."""

    in_channels: int = Field(
        default=3, ge=1, description="Input bands (3 for RGB, 7 for Sentinel-2 patches)."
    )
    num_classes: int = Field(default=2, ge=2, description="Output classes including background (softmax).")
    arch_kwargs: dict[str, Any] = Field(
        default={}, description="Extra keyword arguments for the SMP class (decoder_channels, ...)."
    )

    @model_validator(mode="after")
    def _positives_in_range(self) -> Self:
        if self.positive_classes is not None:
            bad = [c for c in self.positive_classes if not 0 <= c < self.num_classes]
            if not self.positive_classes or bad:
                raise ValueError(
                    f"positive_classes={self.positive_classes} must be a non-empty list of class ids in "
                    f"[0, {self.num_classes - 1}]; out of range: {bad}"
                )
        return self

    @model_validator(mode="after")
    def _arch_kwargs_accepted(self) -> Self:
        check_arch_kwargs(self)
        return self

    @property
    def resolved_positive_classes(self) -> tuple[int, ...]:
        """The positive classes, with the default (every class > 0) filled in."""
        if self.positive_classes is not None:
            return tuple(self.positive_classes)
        return tuple(range(1, self.num_classes))

    @classmethod
    def from_settings(cls, settings: ModelSettings, in_channels: int, num_classes: int) -> ModelSpec:
        """The spec of ``settings`` for data with ``in_channels`` bands and ``num_classes`` classes."""
        return cls(**settings.model_dump(), in_channels=in_channels, num_classes=num_classes)


class LossSettings(Settings):
    """The supervised loss: named terms joined with '+', equal weights unless given."""

    name: str = Field(
        default="ce+dice", description="Terms joined with '+': ce, dice, focal, jaccard, lovasz, bce."
    )
    term_weights: dict[str, float] = Field(
        default={},
        description="Weight of each term in the sum, e.g. {ce: 0.3, dice: 0.7}; empty = equal weights.",
    )
    class_weighting: bool = Field(
        default=False, description="Weigh CE/focal/BCE by inverse square-root class frequency."
    )
    focal_gamma: float = Field(default=2.0, ge=0.0, description="Focusing exponent of the focal term.")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0, description="Label smoothing of the CE term.")

    @field_validator("name")
    @classmethod
    def _known_terms(cls, value: str) -> str:
        terms = [part.strip().lower() for part in value.split("+")]
        unknown = [term for term in terms if term not in LOSS_TERMS]
        if not value.strip() or unknown or len(set(terms)) != len(terms):
            raise ValueError(f"join distinct terms of {list(LOSS_TERMS)} with '+', e.g. 'ce+dice'")
        return "+".join(terms)

    @model_validator(mode="after")
    def _weights_match_terms(self) -> Self:
        terms = self.name.split("+")
        if self.term_weights and sorted(self.term_weights) != sorted(terms):
            raise ValueError(f"term_weights {self.term_weights} must name exactly the terms {terms}")
        return self


class OptimizerSettings(Settings):
    """AdamW (no weight decay on biases and norms) or SGD, with per-part learning-rate multipliers."""

    name: Literal["adamw", "adam", "sgd"] = Field(default="adamw", description="Optimizer.")
    lr: float = Field(default=3e-4, gt=0.0, description="Base learning rate.")
    weight_decay: float = Field(default=1e-2, ge=0.0, description="Weight decay (never on biases and norms).")
    encoder_lr_mult: float = Field(default=1.0, gt=0.0, description="Encoder LR = lr x this.")
    decoder_lr_mult: float = Field(default=1.0, gt=0.0, description="Decoder and head LR = lr x this.")


class SchedulerSettings(Settings):
    """Learning-rate schedule over the whole run."""

    name: Literal["cosine", "step", "plateau", "none"] = Field(
        default="cosine", description="cosine (linear warmup, then cosine to min_lr), step, plateau or none."
    )
    warmup_epochs: float = Field(
        default=1.0, ge=0.0, description="Linear warmup length in epochs (may be fractional)."
    )
    min_lr: float = Field(default=1e-6, ge=0.0, description="Floor of the base learning rate.")
    step_size: int = Field(default=10, ge=1, description="step: epochs between LR drops.")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="step: LR factor at each drop.")
    plateau_factor: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="plateau: LR factor when the metric stalls."
    )
    plateau_patience: int = Field(
        default=5, ge=0, description="plateau: epochs without improvement before a drop."
    )


class LoaderSettings(Settings):
    """How batches are read: size, workers and the per-worker tile cache (seed 000's data knobs)."""

    batch_size: int = Field(default=8, ge=1, description="Samples per batch (per rank under DDP).")
    num_workers: int = Field(
        default=0, ge=0, description="DataLoader worker processes; 0 loads in the main process."
    )
    prefetch_factor: int = Field(default=2, ge=1, description="Batches prefetched per worker.")
    persistent_workers: bool = Field(
        default=False, description="Keep workers (and their caches) across epochs."
    )
    pin_memory: bool = Field(default=False, description="Page-locked batches for faster GPU copies.")
    cache_mode: Literal["none", "lru"] = Field(
        default="none", description="Per-worker cache of decoded tiles."
    )
    cache_max_items: int = Field(default=0, ge=0, description="LRU capacity per worker; 0 = unbounded.")


class AugmentSettings(Settings):
    """Seeded augmentation: D4 geometry on image and mask, colour jitter and noise on the image only.

    Ranges are symmetric around 'no change'; 0 disables an op. The defaults are a light recipe.
    """

    enabled: bool = Field(default=True, description="false = tiles are only normalised.")
    hflip_p: float = Field(default=0.5, ge=0.0, le=1.0, description="Probability of a horizontal flip.")
    vflip_p: float = Field(default=0.5, ge=0.0, le=1.0, description="Probability of a vertical flip.")
    rot90: bool = Field(default=True, description="Rotate by k x 90 degrees, k uniform in 0..3.")
    scale_range: list[float] | None = Field(
        default=None, description="[low, high] zoom factors of a random scale + crop; null = off."
    )
    crop_size: int | None = Field(
        default=None, ge=1, description="Side of the random (scale +) crop; null keeps the input size."
    )
    brightness: float = Field(default=0.1, ge=0.0, lt=1.0, description="Brightness factor within 1 +/- this.")
    contrast: float = Field(default=0.1, ge=0.0, lt=1.0, description="Contrast factor within 1 +/- this.")
    saturation: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Saturation factor within 1 +/- this (RGB)."
    )
    noise_std: float = Field(
        default=0.05, ge=0.0, description="Gaussian noise sigma within [0, this], in std units."
    )
    photometric_p: float = Field(default=1.0, ge=0.0, le=1.0, description="Probability of each colour op.")
    noise_p: float = Field(default=0.5, ge=0.0, le=1.0, description="Probability of adding noise.")
    noise_bank_size: int = Field(
        default=1 << 22,
        ge=0,
        description="Standard-normal values kept per process for noise; 0 = fresh draws.",
    )

    @field_validator("scale_range")
    @classmethod
    def _ordered_range(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 2 or not 0 < value[0] <= value[1]):
            raise ValueError("give [low, high] with 0 < low <= high")
        return value

    @classmethod
    def off(cls) -> AugmentSettings:
        """The identity: tiles are only normalised."""
        return cls(enabled=False)


class LoopSettings(Settings):
    """The training loop: epochs, precision, EMA, checkpoints, early stopping, seed."""

    epochs: int = Field(default=50, ge=1, description="Total epochs (a resumed run continues up to this).")
    grad_accum_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    clip_grad_norm: float | None = Field(
        default=1.0, gt=0.0, description="Max global gradient L2 norm; null = off."
    )
    ema_decay: float | None = Field(
        default=0.999, ge=0.0, lt=1.0, description="EMA of the weights used for validation; null = off."
    )
    ema_warmup: bool = Field(default=True, description="Ramp the EMA decay up as (1 + n) / (10 + n).")
    monitor: str = Field(
        default="val/miou",
        description="Metric that picks best.pt, drives early stopping and the plateau scheduler.",
    )
    mode: Literal["max", "min"] = Field(
        default="max", description="Whether a larger monitor value is better."
    )
    early_stopping_patience: int | None = Field(
        default=10, ge=1, description="Epochs without improvement before stopping; null = off."
    )
    save_every: int = Field(default=5, ge=0, description="Period of epoch-N.pt snapshots; 0 = off.")
    log_every_n_steps: int = Field(
        default=20, ge=0, description="Progress line period in optimizer steps; 0 = off."
    )
    max_steps_per_epoch: int | None = Field(
        default=None,
        ge=1,
        description="Cap on optimizer steps per epoch (smoke runs); null = the whole epoch.",
    )
    device: str = Field(
        default="auto", pattern=DEVICE_PATTERN, description="auto (CUDA, MPS, then CPU), cpu, mps, cuda[:N]."
    )
    amp: bool | None = Field(
        default=None,
        description="Mixed precision. null = policy: on for CUDA (bf16, or fp16 with loss scaling), off for "
        "MPS and CPU; true on CPU = bf16 autocast.",
    )
    channels_last: bool | None = Field(
        default=None, description="channels_last memory format; null = policy."
    )
    seed: int = Field(
        default=42, ge=0, lt=2**32 - 1024, description="Seeds python, numpy, torch and the workers."
    )
    deterministic: bool = Field(default=False, description="Deterministic kernels (slower).")

    @property
    def monitor_key(self) -> str:
        """``monitor`` as it appears in the epoch logs (``miou`` -> ``val/miou``)."""
        return self.monitor if "/" in self.monitor else f"val/{self.monitor}"


class StageSettings(Settings):
    """Everything one training stage needs besides its data and tracking."""

    model: ModelSettings = Field(default_factory=ModelSettings, description="Architecture and encoder.")
    loss: LossSettings = Field(default_factory=LossSettings, description="Supervised loss.")
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings, description="Optimizer.")
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings, description="LR schedule.")
    loader: LoaderSettings = Field(default_factory=LoaderSettings, description="Batches and workers.")
    augment: AugmentSettings = Field(default_factory=AugmentSettings, description="Training augmentation.")
    loop: LoopSettings = Field(default_factory=LoopSettings, description="Epochs, precision, checkpoints.")
    val_split: str = Field(default="val", description="Split of the target that validates each epoch.")


class PretrainSettings(StageSettings):
    """Stage 1: supervised on the target's train split plus the auxiliary sources."""

    use_auxiliary: bool = Field(default=True, description="Train on the auxiliary sources too.")
    aux_class_remaps: dict[str, dict[str, str]] = Field(
        default={},
        description="Per auxiliary dataset: source class -> target class ('' = ignore). Classes with the "
        "same name map by themselves.",
    )


class DistillSettings(Settings):
    """The KD objective: alpha*CE + (1-alpha)*T^2*KL(teacher_T || student_T) (seed 002 defaults)."""

    alpha: float = Field(default=0.7, ge=0.0, le=1.0, description="Weight of CE; KD gets 1 - alpha.")
    temperature: float = Field(default=3.0, gt=0.0, description="Softmax temperature T of both sides.")
    confidence_threshold: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Teacher max probability below this: the pixel gets no KD term.",
    )
    warmup_epochs: int = Field(default=5, ge=0, description="CE-only epochs before KD starts.")
    transfer_split: str | None = Field(
        default=None,
        description="Split of unlabeled target tiles (e.g. 'unlabeled') trained on teacher soft labels only.",
    )
    extra_teachers: list[str] = Field(
        default=[], description="More teachers: stage checkpoints or MLflow model URIs (models:/name@alias)."
    )
    patch_sizes: list[int] = Field(
        default=[], description="Multi-scale schedule, e.g. [96, 128, 160]; empty = off."
    )
    multi_scale_mode: Literal["sample_one_scale_per_step", "per_step_all_scales"] = Field(
        default="sample_one_scale_per_step", description="One patch size per step, or every size each step."
    )

    @field_validator("patch_sizes")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        if any(size < 8 for size in value):
            raise ValueError("patch sizes must be >= 8")
        return value


class DistillOptimizerSettings(OptimizerSettings):
    """The KD stage finetunes: a lower starting LR (seed 002: 1e-4 -> 3e-5)."""

    lr: float = override(OptimizerSettings, "lr", 1e-4)


class DistillSchedulerSettings(SchedulerSettings):
    """Cosine from the KD LR to 3e-5, no warmup (the student starts from stage 1's weights)."""

    warmup_epochs: float = override(SchedulerSettings, "warmup_epochs", 0.0)
    min_lr: float = override(SchedulerSettings, "min_lr", 3e-5)


class DistillLoopSettings(LoopSettings):
    """The KD stage runs shorter than pretraining by default."""

    epochs: int = override(LoopSettings, "epochs", 25)


class KDStageSettings(StageSettings):
    """Stage 2: KD finetuning of a student on the target, from the stage-1 teacher."""

    optimizer: DistillOptimizerSettings = Field(
        default_factory=DistillOptimizerSettings, description="Optimizer."
    )
    scheduler: DistillSchedulerSettings = Field(
        default_factory=DistillSchedulerSettings, description="LR schedule."
    )
    loop: DistillLoopSettings = Field(
        default_factory=DistillLoopSettings, description="Epochs, precision, checkpoints."
    )
    kd: DistillSettings = Field(default_factory=DistillSettings, description="Distillation objective.")
    student_model: ModelSettings | None = Field(
        default=None, description="A different (e.g. smaller) student; null = the teacher's architecture."
    )
