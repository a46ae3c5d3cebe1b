"""Settings of the model: an SMP architecture x encoder, and the spec a checkpoint stores."""

from __future__ import annotations

import importlib.metadata
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from seg_pipeline.settings.base import Settings
from seg_pipeline.settings.encoders import smp_encoder_names

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

    @field_validator("architecture", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        known = smp_encoder_names()
        if value in known:
            return value
        if value.startswith("tu-"):
            import timm

            if timm.is_model(value.removeprefix("tu-")):
                return value
        version = importlib.metadata.version("segmentation-models-pytorch")
        raise ValueError(
            f"unknown to segmentation_models_pytorch {version}; use one of {sorted(known)} or "
            "'tu-<timm model name>'"
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
    positive_classes: list[int] | None = Field(
        default=None,
        description="Class ids the model's detection helpers count as positive (the dataset's "
        "positive_classes, set at training); null = every class > 0.",
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
    def from_settings(
        cls,
        settings: ModelSettings,
        in_channels: int,
        num_classes: int,
        positive_classes: list[int] | None = None,
    ) -> ModelSpec:
        """The spec of ``settings`` for data with ``in_channels`` bands and ``num_classes`` classes."""
        return cls(
            **settings.model_dump(),
            in_channels=in_channels,
            num_classes=num_classes,
            positive_classes=positive_classes,
        )
