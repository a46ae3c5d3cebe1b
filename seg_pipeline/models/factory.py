"""SMP model factory and the segmentation wrapper used everywhere else (DESIGN F10).

The factory turns a small, JSON-friendly :class:`ModelSpec` (what gets stored in checkpoints
and MLflow params) into a :class:`SegmentationModel`: an ``nn.Module`` that wraps a
segmentation-models-pytorch network, accepts any input height/width, and adds the inference
helpers the pipeline needs (probabilities, class map, and patch-level detection derived from
the segmentation, as in seed 003: "detection comes from segmentation for free").
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

# Name -> SMP class, restricted to the architectures that work with the usual CNN encoders
# (resnet*, efficientnet-*, mobilenet_v2, ...). SMP 0.6 also ships DPT, which only accepts timm
# ViT encoders ("tu-vit_*") with a fixed image size, so it is left out on purpose.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    name: cls
    for name, cls in {
        "unet": getattr(smp, "Unet", None),
        "unetplusplus": getattr(smp, "UnetPlusPlus", None),
        "deeplabv3": getattr(smp, "DeepLabV3", None),
        "deeplabv3plus": getattr(smp, "DeepLabV3Plus", None),
        "fpn": getattr(smp, "FPN", None),
        "pspnet": getattr(smp, "PSPNet", None),
        "linknet": getattr(smp, "Linknet", None),
        "manet": getattr(smp, "MAnet", None),
        "pan": getattr(smp, "PAN", None),
        "upernet": getattr(smp, "UPerNet", None),
        "segformer": getattr(smp, "Segformer", None),
    }.items()
    if cls is not None  # older SMP versions lack some (UPerNet/Segformer arrived in 0.4/0.5)
}

# Some decoders pool the deepest feature map several more times and break on small inputs.
# PAN's feature-pyramid attention halves the stride-16/32 map three times, so it needs at least
# 8 cells there: the minimum input side is this factor times the encoder output stride.
_MIN_SIDE_IN_STRIDES: dict[str, int] = {"pan": 8}


def _valid_encoder_names() -> list[str]:
    return sorted(smp.encoders.get_encoder_names())


def _is_known_encoder(name: str) -> bool:
    if name in smp.encoders.get_encoder_names():
        return True
    if name.startswith("tu-"):  # any timm backbone through SMP's TimmUniversalEncoder
        import timm

        return bool(timm.is_model(name.removeprefix("tu-")))
    return False


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; saved next to the weights in every checkpoint.

    Attributes:
        architecture: Key of :data:`ARCHITECTURES` (``unet``, ``deeplabv3plus``, ``segformer``, ...).
        encoder: SMP encoder name (``resnet34``, ``efficientnet-b0``, ``mobilenet_v2``, ``tu-<timm>``).
        in_channels: Input bands, e.g. 3 for RGB or 7 for Sentinel-2 patches; SMP adapts the
            first convolution for values other than 3.
        num_classes: Output classes including background. At least 2: the wrapper uses softmax,
            so binary segmentation is ``num_classes=2`` (background, foreground).
        encoder_weights: ``None`` (random init, works offline; the default) or a pretrained
            weight name such as ``"imagenet"``, which SMP downloads on first use.
        positive_classes: Classes that count as "positive" for patch-level detection (e.g.
            fire grades 1..4). ``None`` means every class > 0.
        arch_kwargs: Extra keyword arguments passed verbatim to the SMP class
            (``decoder_channels``, ``encoder_depth``, ``encoder_output_stride``, ...). Keep values
            JSON-friendly (numbers, strings, lists) so the spec round-trips through checkpoints.
    """

    architecture: str = "unet"
    encoder: str = "resnet34"
    in_channels: int = 3
    num_classes: int = 2
    encoder_weights: str | None = None
    positive_classes: tuple[int, ...] | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        architecture = str(self.architecture).strip().lower()
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"ModelSpec.architecture={self.architecture!r} is unknown; "
                f"use one of {sorted(ARCHITECTURES)}."
            )
        object.__setattr__(self, "architecture", architecture)
        if not _is_known_encoder(self.encoder):
            raise ValueError(
                f"ModelSpec.encoder={self.encoder!r} is unknown to segmentation_models_pytorch "
                f"{smp.__version__}; use one of {_valid_encoder_names()} or 'tu-<timm model name>'."
            )
        if int(self.in_channels) < 1:
            raise ValueError(f"ModelSpec.in_channels={self.in_channels} must be >= 1 (number of bands).")
        if int(self.num_classes) < 2:
            raise ValueError(
                f"ModelSpec.num_classes={self.num_classes} must be >= 2 (background + at least one "
                "class); binary segmentation is num_classes=2."
            )
        if self.positive_classes is not None:
            positives = tuple(int(c) for c in self.positive_classes)
            bad = [c for c in positives if not 0 <= c < self.num_classes]
            if not positives or bad:
                raise ValueError(
                    f"ModelSpec.positive_classes={self.positive_classes!r} must be a non-empty list of "
                    f"class indices in [0, {self.num_classes - 1}]; out of range: {bad}."
                )
            object.__setattr__(self, "positive_classes", positives)
        if not isinstance(self.arch_kwargs, Mapping):
            raise ValueError(f"ModelSpec.arch_kwargs must be a dict, got {type(self.arch_kwargs).__name__}.")
        object.__setattr__(self, "arch_kwargs", dict(self.arch_kwargs))  # no aliasing with the caller
        self._check_arch_kwargs()

    def _check_arch_kwargs(self) -> None:
        """Reject keys the SMP class would silently swallow (its ``**kwargs`` go to the encoder)."""
        owned = {"encoder_name", "encoder_weights", "in_channels", "classes"}
        # aux_params adds a classification head (forward would return a tuple); activation would
        # turn logits into probabilities. Both break the wrapper's contract.
        forbidden = owned | {"aux_params", "activation"}
        bad = sorted(set(self.arch_kwargs) & forbidden)
        if bad:
            raise ValueError(
                f"ModelSpec.arch_kwargs sets {bad}; set encoder/in_channels/num_classes/encoder_weights "
                "through the spec's own fields, and leave aux_params/activation unset (logits only)."
            )
        if self.encoder.startswith("tu-"):  # extra kwargs are forwarded to timm: let timm judge
            return
        signature = inspect.signature(ARCHITECTURES[self.architecture].__init__)
        accepted = (
            {
                name
                for name, parameter in signature.parameters.items()
                if parameter.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
            }
            - {"self"}
            - forbidden
        )
        unknown = sorted(set(self.arch_kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"ModelSpec.arch_kwargs has keys {unknown} that {self.architecture} does not accept; "
                f"valid keys are {sorted(accepted)}."
            )

    @property
    def resolved_positive_classes(self) -> tuple[int, ...]:
        """The positive classes, with the default (all classes > 0) filled in."""
        if self.positive_classes is not None:
            return self.positive_classes
        return tuple(range(1, self.num_classes))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists) for checkpoints and MLflow params."""
        data = asdict(self)
        if data["positive_classes"] is not None:
            data["positive_classes"] = list(data["positive_classes"])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`; unknown keys raise so typos in configs are not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"ModelSpec.from_dict got unknown keys {unknown}; valid keys are {sorted(known)}."
            )
        values = dict(data)
        if values.get("positive_classes") is not None:
            values["positive_classes"] = tuple(values["positive_classes"])
        return cls(**values)


def _build_smp_network(spec: ModelSpec) -> nn.Module:
    arch_class = ARCHITECTURES[spec.architecture]
    try:
        return arch_class(
            encoder_name=spec.encoder,
            encoder_weights=spec.encoder_weights,
            in_channels=spec.in_channels,
            classes=spec.num_classes,
            **spec.arch_kwargs,
        )
    except TypeError as error:  # an arch_kwargs key the SMP class does not accept
        raise ValueError(
            f"ModelSpec.arch_kwargs={spec.arch_kwargs!r} is not accepted by {arch_class.__name__}: {error}"
        ) from error
    except KeyError as error:  # SMP looks pretrained weights up in a dict
        raise ValueError(
            f"ModelSpec.encoder_weights={spec.encoder_weights!r} is not available for encoder "
            f"{spec.encoder!r}; use None or a weight name SMP lists for it ({error})."
        ) from error


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Switch to eval for inference and restore every submodule's own flag afterwards.

    Restoring per submodule (not ``module.train(was_training)``) keeps deliberately frozen parts,
    e.g. BatchNorm layers kept in eval during finetuning, as the caller left them.
    """
    previous_modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for child, was_training in previous_modes:
            child.training = was_training


class SegmentationModel(nn.Module):
    """SMP network plus padding to a valid size and patch-level inference helpers.

    Why the padding: SMP encoders downsample by their output stride (32 for most, 8/16 for the
    dilated DeepLab/PSPNet ones) and the decoders add skip features back, so SMP refuses inputs
    whose height/width are not multiples of that stride. Real tiles (raster edges, 70x45 crops,
    TTA scales of 0.75) often are not, so :meth:`forward` reflect-pads on the bottom/right to the
    next valid size and crops the logits back: the output always lines up pixel for pixel with the
    input. Reflection (rather than zeros) keeps the padded border looking like imagery, so the
    border pixels that are kept see plausible context; when the pad is larger than the image
    (tiny inputs, PAN's minimum size) it falls back to edge replication.

    Args:
        spec: The spec the network was built from (stored as ``.spec``).
        net: A ready network mapping ``(B, in_channels, H, W)`` to ``(B, num_classes, H, W)`` logits;
            built from ``spec`` with SMP when ``None``. Passing one is how tests and exotic models
            reuse the helpers.
        pad_multiple: Input sides are padded to a multiple of this; defaults to the network's
            ``encoder.output_stride`` (1, i.e. no padding, for networks without an encoder).
    """

    def __init__(
        self, spec: ModelSpec, net: nn.Module | None = None, pad_multiple: int | None = None
    ) -> None:
        super().__init__()
        self.spec = spec
        self.net = net if net is not None else _build_smp_network(spec)
        if pad_multiple is None:
            encoder = getattr(self.net, "encoder", None)
            pad_multiple = int(getattr(encoder, "output_stride", 1))
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple={pad_multiple} must be >= 1.")
        self.pad_multiple = pad_multiple
        self.min_side = _MIN_SIDE_IN_STRIDES.get(spec.architecture, 1) * pad_multiple if net is None else 1
        self.positive_classes: tuple[int, ...] = spec.resolved_positive_classes

    def _padded_side(self, side: int) -> int:
        return max(math.ceil(side / self.pad_multiple) * self.pad_multiple, self.min_side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, num_classes, H, W)`` for input ``(B, in_channels, H, W)`` of any H, W."""
        if x.ndim != 4 or x.shape[1] != self.spec.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.spec.in_channels}, H, W) for this model, got {tuple(x.shape)}."
            )
        height, width = x.shape[-2:]
        pad_bottom = self._padded_side(height) - height
        pad_right = self._padded_side(width) - width
        if pad_bottom == 0 and pad_right == 0:
            return self.net(x)
        can_reflect = pad_bottom < height and pad_right < width
        padded = F.pad(x, (0, pad_right, 0, pad_bottom), mode="reflect" if can_reflect else "replicate")
        return self.net(padded)[..., :height, :width]

    def predict_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities ``(B, C, H, W)``, computed in eval mode without autograd."""
        with torch.inference_mode(), _eval_mode(self):
            return torch.softmax(self(x), dim=1)

    def predict_segmentation(self, x: torch.Tensor) -> torch.Tensor:
        """Class index per pixel ``(B, H, W)`` as int64."""
        with torch.inference_mode(), _eval_mode(self):
            return self(x).argmax(dim=1)

    def _positive_class_mask(self, class_map: torch.Tensor) -> torch.Tensor:
        positives = torch.tensor(self.positive_classes, device=class_map.device)
        return torch.isin(class_map, positives)

    def predict_detection(self, x: torch.Tensor, min_pixels: int = 1) -> torch.Tensor:
        """Patch-level "contains a positive class": at least ``min_pixels`` pixels predicted positive.

        A pixel is predicted positive when its argmax class is in ``positive_classes`` (the same
        rule as :meth:`predict_segmentation`), so detection never contradicts the class map.
        Returns a bool tensor ``(B,)``.
        """
        if min_pixels < 1:
            raise ValueError(f"min_pixels={min_pixels} must be >= 1.")
        class_map = self.predict_segmentation(x)
        positive_counts = self._positive_class_mask(class_map).flatten(1).sum(dim=1)
        return positive_counts >= min_pixels

    def predict_confidence(self, x: torch.Tensor) -> torch.Tensor:
        """Max over pixels of the positive probability, ``(B,)`` in [0, 1].

        The positive probability of a pixel is the summed probability of all positive classes
        (``1 - p(background)`` by default), so a pixel split between two damage grades still
        reads as confidently positive.
        """
        probabilities = self.predict_probabilities(x)
        positive_probability = probabilities[:, list(self.positive_classes)].sum(dim=1)
        return positive_probability.flatten(1).amax(dim=1)

    def predict_fraction(self, x: torch.Tensor) -> torch.Tensor:
        """Fraction of pixels whose argmax class is positive, ``(B,)`` float in [0, 1]."""
        class_map = self.predict_segmentation(x)
        return self._positive_class_mask(class_map).flatten(1).float().mean(dim=1)


def build_model(spec: ModelSpec) -> SegmentationModel:
    """Build the SMP network described by ``spec`` and wrap it (weights random unless requested)."""
    return SegmentationModel(spec)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``), for logs and model cards."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
