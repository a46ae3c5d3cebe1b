"""SMP model factory and the segmentation wrapper used everywhere else (F10 in docs/architecture.md).

The factory turns a small, JSON-friendly :class:`~seg_pipeline.settings.training.ModelSpec` (what
checkpoints and MLflow params store) into a :class:`SegmentationModel`: an ``nn.Module`` that wraps
a segmentation-models-pytorch network, accepts any input height/width, and adds the inference
helpers the pipeline needs (probabilities, class map, and patch-level detection derived from
the segmentation, as in seed 003: "detection comes from segmentation for free").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from seg_pipeline.settings.models import SMP_CLASS_NAMES, ModelSpec, check_arch_kwargs

#: Name -> SMP class of every architecture the schema allows (``settings.training.SMP_CLASS_NAMES``).
ARCHITECTURES: dict[str, type[nn.Module]] = {
    name: getattr(smp, cls_name) for name, cls_name in SMP_CLASS_NAMES.items() if hasattr(smp, cls_name)
}

# Some decoders pool the deepest feature map several more times and break on small inputs.
# PAN's feature-pyramid attention halves the stride-16/32 map three times, so it needs at least
# 8 cells there: the minimum input side is this factor times the encoder output stride.
_MIN_SIDE_IN_STRIDES: dict[str, int] = {"pan": 8}


def _build_smp_network(spec: ModelSpec) -> nn.Module:
    check_arch_kwargs(spec)
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
