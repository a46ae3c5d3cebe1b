"""Settings of a training stage, one group per component.

Model, loss, optimizer, scheduler, data, augmentation and the loop; stage 1 and stage 2 (KD) add
their own fields.

Values a user sets at ingest (class names, ``ignore_index``, band count, normalisation) are not here:
they reach training through the typed contracts (``seg_pipeline.contracts``), never re-typed.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from seg_pipeline.settings.base import DEVICE_PATTERN, Settings, override
from seg_pipeline.settings.batches import AugmentSettings, LoaderSettings, PatchSettings
from seg_pipeline.settings.inference import ValidationSettings
from seg_pipeline.settings.models import ModelSettings

#: Loss terms that ``loss.name`` may join with ``+`` (``ce+dice``, ``dice+focal``...).
LOSS_TERMS = ("ce", "dice", "focal", "jaccard", "lovasz", "bce")


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
    layer_decay: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Layer-wise LR decay over the encoder's stages: the deepest keeps lr x encoder_lr_mult, "
        "each shallower one x this more (the stem lowest), e.g. 0.8; null = off (one encoder LR).",
    )
    head_lr_mult: float = Field(
        default=1.0,
        gt=0.0,
        description="Segmentation head LR = lr x decoder_lr_mult x this (boosts a fresh classifier "
        "relative to the decoder); 1 = the decoder's LR.",
    )


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
    hand_over: Literal["best", "final"] = Field(
        default="best",
        description="Checkpoint the stage hands on (KD teacher and init, ensemble member, registered "
        "model): best = best.pt, the epoch with the best monitor; final = final.pt, the last epoch "
        "(EMA weights when on), which a small, noisy validation split cannot mis-pick.",
    )
    early_stopping_patience: int | None = Field(
        default=10, ge=1, description="Epochs without improvement before stopping; null = off."
    )
    save_every: int = Field(default=5, ge=0, description="Period of epoch-N.pt snapshots; 0 = off.")
    save_top_k: int = Field(
        default=1,
        ge=1,
        description="Keep the k best epochs by monitor: best.pt always, and for k > 1 also "
        "best-epoch-NNNN.pt of each of the k best (weights + EMA), deleting those that drop out.",
    )
    train_metrics: bool = Field(
        default=False,
        description="Seed 001's train-side scores: log train/accuracy, train/f1 (mean Dice) and train/miou "
        "from each step's own predictions on its augmented patches (one argmax and bincount per step).",
    )
    log_memory: bool = Field(
        default=False,
        description="Log memory/peak_rss_mb (process peak RSS) and, on CUDA, memory/cuda_max_allocated_mb "
        "(peak of the epoch) with each epoch.",
    )
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
        "MPS, on CPU bf16 autocast where the CPU has AMX (amx_bf16) else fp32; true on CPU = bf16.",
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
    patches: PatchSettings = Field(default_factory=PatchSettings, description="Patches read for training.")
    augment: AugmentSettings = Field(default_factory=AugmentSettings, description="Training augmentation.")
    loop: LoopSettings = Field(default_factory=LoopSettings, description="Epochs, precision, checkpoints.")
    val_split: str = Field(default="val", description="Split of the target that validates each epoch.")
    score_floor: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="The model's asset check warns when its best monitored score (val mIoU by default) is "
        "below this: a stage that did not learn shows on its page before anything downstream is read.",
    )
    validation: ValidationSettings = Field(
        default_factory=ValidationSettings,
        description="Full-resolution validation with the inference windows.",
    )


class PretrainSettings(StageSettings):
    """Stage 1: supervised on the target's train split plus the auxiliary sources."""

    use_auxiliary: bool = Field(default=True, description="Train on the auxiliary sources too.")
    aux_ratio: float | None = Field(
        default=None,
        gt=0.0,
        description="Auxiliary patches per epoch as a multiple of the target's (a fresh draw each epoch, "
        "shared by the sources by size); null = every auxiliary patch every epoch.",
    )
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


#: Names the ensemble already uses for its other members and for itself.
RESERVED_MEMBER_NAMES = frozenset({"pretrained", "kd_student", "ensemble"})


class MemberVariant(Settings):
    """One extra ensemble member: the ``extra_members`` recipe with a seed and model of its own."""

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,39}$",
        description="Member name in the predictions and the report (lower case, digits, _).",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        lt=2**32 - 1024,
        description="loop.seed of this member; null = the recipe's loop.seed + the member's position + 1, "
        "so no member repeats the KD student's seed.",
    )
    student_model: ModelSettings | None = Field(
        default=None,
        description="This member's architecture/encoder (trained from its own initialisation); null = the "
        "recipe's student_model, else the teacher's architecture, warm-started from the teacher.",
    )


class ExtraMembersSettings(KDStageSettings):
    """More ensemble members, each one more KD student of the stage-1 teacher (its own MLflow run).

    Members that differ (another seed, another encoder) make errors the KD student does not, which is
    what an ensemble can average away; a teacher and its own student make similar ones. The default,
    no member, trains nothing.
    """

    members: list[MemberVariant] = Field(
        default=[],
        description="Extra members, each trained with this recipe and its own seed/model; [] = none.",
    )

    @field_validator("members")
    @classmethod
    def _distinct_names(cls, members: list[MemberVariant]) -> list[MemberVariant]:
        names = [m.name for m in members]
        taken = sorted(RESERVED_MEMBER_NAMES.intersection(names))
        if taken:
            raise ValueError(f"member names {taken} are taken by the pipeline's own models; choose others")
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be distinct, got {names}")
        if any(name.startswith("extra_") for name in names):
            raise ValueError("member names starting with 'extra_' are taken by predict.extra_checkpoints")
        return members

    def for_member(self, index: int) -> KDStageSettings:
        """The KD recipe of member ``index``: its seed and student model in place of the recipe's."""
        variant = self.members[index]
        seed = variant.seed if variant.seed is not None else self.loop.seed + index + 1
        recipe = KDStageSettings.parse(self.model_dump(exclude={"members"}))
        return recipe.replace(
            loop=self.loop.replace(seed=seed),
            student_model=variant.student_model if variant.student_model is not None else self.student_model,
        )
