"""Test-time augmentation (TTA) for segmentation: scales x dihedral transforms, over several models.

Every augmentation is invertible: the image is resized, transformed and padded to a multiple of
``pad_multiple`` (UNet-style encoders need sizes divisible by 32); the model's logits are cropped,
transformed back and resized (bilinear) to the original height and width before they are merged.
So for a model whose output does not depend on position (a 1x1 convolution) the flips, rotations
and padding change nothing, which is what the tests check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg_pipeline.settings.inference import TTASettings

__all__ = [
    "DIHEDRAL_TRANSFORMS",
    "TTAConfig",
    "apply_transform",
    "invert_transform",
    "member_term",
    "merge_terms",
    "tta_predict",
    "view_probabilities",
]

#: The 8 elements of the dihedral group D4, as names accepted in ``TTAConfig.flips``.
DIHEDRAL_TRANSFORMS: tuple[str, ...] = (
    "none",
    "h",
    "v",
    "rot90",
    "rot180",
    "rot270",
    "transpose",
    "antitranspose",
)
# Names that expand to several transforms (or are spelled differently) in TTAConfig.flips.
_FLIP_ALIASES: dict[str, tuple[str, ...]] = {"d4": DIHEDRAL_TRANSFORMS, "hv": ("rot180",)}

MergeMode = Literal["mean_prob", "mean_logit"]
#: The schema's defaults (scales, flips, merge are written once, in ``settings.inference``).
_DEFAULTS = TTASettings()


@dataclass(frozen=True)
class TTAConfig:
    """What test-time augmentation runs and how its outputs are merged.

    Attributes:
        scales: Resize factors applied to the input (bilinear); outputs are resized back.
        flips: Dihedral transforms, any of ``DIHEDRAL_TRANSFORMS`` plus ``"d4"`` (all 8) and ``"hv"``
            (same as ``"rot180"``). Duplicates after expansion are dropped so no view counts twice.
        merge: ``"mean_prob"`` averages softmax probabilities; ``"mean_logit"`` averages logits and
            returns the softmax of the mean. The output is probabilities either way.
        batch_augmentations: Run all transforms of one scale that give the same shape as one batch
            (fewer, bigger forward passes). Off by default: on the 2-core CPU box (bench/bench_tta.py,
            1 thread, CPU time) it was 17% slower at batch 4 and 2% faster at batch 1. On a GPU,
            where one small batch does not fill the device, it usually pays off: measure there.
        amp_dtype: Autocast dtype for the forward passes (e.g. ``torch.bfloat16`` on CUDA);
            ``None`` runs in full precision. Merging is always done in float32. Which one is faster
            depends on the CPU (``inference_dtype`` picks bf16 only with AMX: bench/RESULTS.md).
        channels_last: Feed inputs in channels-last memory format (pair with a channels-last model,
            which ``EnsemblePredictor`` does for you). ``PredictSettings.channels_last: null`` turns
            it on for CPU and CUDA.
        pad_multiple: Inputs are padded (reflect) to a multiple of this before the forward pass and
            outputs cropped back; 1 disables padding.
    """

    scales: tuple[float, ...] = tuple(_DEFAULTS.scales)
    flips: tuple[str, ...] = tuple(_DEFAULTS.flips)
    merge: MergeMode = _DEFAULTS.merge
    batch_augmentations: bool = False
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    pad_multiple: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "flips", tuple(self.flips))
        if not self.scales:
            raise ValueError("TTAConfig.scales is empty: give at least one scale, e.g. (1.0,).")
        for scale in self.scales:
            if not scale > 0 or scale == float("inf"):
                raise ValueError(f"TTAConfig.scales must be finite and > 0, got {scale!r} in {self.scales}.")
        if not self.flips:
            raise ValueError('TTAConfig.flips is empty: give at least one transform, e.g. ("none",).')
        known = set(DIHEDRAL_TRANSFORMS) | set(_FLIP_ALIASES)
        for name in self.flips:
            if name not in known:
                raise ValueError(
                    f"TTAConfig.flips has unknown transform {name!r}; use any of {sorted(known)}."
                )
        if self.merge not in ("mean_prob", "mean_logit"):
            raise ValueError(f"TTAConfig.merge must be 'mean_prob' or 'mean_logit', got {self.merge!r}.")
        if self.amp_dtype is not None and not isinstance(self.amp_dtype, torch.dtype):
            raise ValueError(f"TTAConfig.amp_dtype must be a torch.dtype or None, got {self.amp_dtype!r}.")
        if not isinstance(self.pad_multiple, int) or self.pad_multiple < 1:
            raise ValueError(f"TTAConfig.pad_multiple must be an int >= 1, got {self.pad_multiple!r}.")

    @classmethod
    def from_settings(
        cls, settings: TTASettings, *, amp_dtype: torch.dtype | None = None, channels_last: bool = False
    ) -> TTAConfig:
        """The runtime TTA of ``settings`` with the precision chosen for the device."""
        return cls(
            scales=tuple(settings.scales),
            flips=tuple(settings.flips),
            merge=settings.merge,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
        )

    @property
    def transforms(self) -> tuple[str, ...]:
        """The flips expanded to distinct dihedral transform names, in the order given."""
        expanded: list[str] = []
        for name in self.flips:
            for transform in _FLIP_ALIASES.get(name, (name,)):
                if transform not in expanded:
                    expanded.append(transform)
        return tuple(expanded)

    @property
    def views_per_model(self) -> int:
        """How many augmented views each model sees (= forward passes per model when unbatched)."""
        return len(self.scales) * len(self.transforms)


def apply_transform(x: Tensor, name: str) -> Tensor:
    """Apply the dihedral transform ``name`` to the last two (H, W) dims of ``x``."""
    if name == "none":
        return x
    if name == "h":
        return x.flip(-1)
    if name == "v":
        return x.flip(-2)
    if name == "rot90":
        return torch.rot90(x, 1, (-2, -1))
    if name == "rot180":
        return x.flip(-2, -1)
    if name == "rot270":
        return torch.rot90(x, 3, (-2, -1))
    if name == "transpose":
        return x.transpose(-2, -1)
    if name == "antitranspose":
        return x.transpose(-2, -1).flip(-2, -1)
    raise ValueError(f"Unknown transform {name!r}; use one of {DIHEDRAL_TRANSFORMS}.")


_INVERSE = {"rot90": "rot270", "rot270": "rot90"}  # every other element of D4 is its own inverse


def invert_transform(y: Tensor, name: str) -> Tensor:
    """Undo ``apply_transform(., name)`` on a model output."""
    return apply_transform(y, _INVERSE.get(name, name))


def _scaled_size(size: int, scale: float) -> int:
    return max(1, round(size * scale))


def _pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, int, int]:
    """Pad bottom/right to a multiple; reflect where the input is big enough, else replicate."""
    height, width = x.shape[-2:]
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, height, width
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), height, width


def _autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def _forward(model: nn.Module, x: Tensor, config: TTAConfig) -> Tensor:
    """One padded forward pass; returns float32 logits cropped to x's size."""
    padded, height, width = _pad_to_multiple(x, config.pad_multiple)
    if config.channels_last:
        padded = padded.contiguous(memory_format=torch.channels_last)
    with _autocast(x.device.type, config.amp_dtype):
        logits = model(padded)
    if not isinstance(logits, Tensor) or logits.ndim != 4 or logits.shape[0] != x.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"model must map (B,C,H,W) to logits (B,K,H,W); "
            f"for input {tuple(padded.shape)} it returned {got}."
        )
    if logits.shape[-2:] != padded.shape[-2:]:
        raise ValueError(
            f"model output size {tuple(logits.shape[-2:])} != input size {tuple(padded.shape[-2:])}; "
            "TTA needs full-resolution logits (upsample inside the model)."
        )
    return logits[..., :height, :width].float()


def _augmented_logits(
    model: nn.Module, x: Tensor, scale: float, config: TTAConfig
) -> list[tuple[str, Tensor]]:
    """Logits of every transform at one scale, already inverted (still at the scaled size)."""
    height, width = x.shape[-2:]
    size = (_scaled_size(height, scale), _scaled_size(width, scale))
    scaled = (
        x if size == (height, width) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    )
    transforms = config.transforms
    if not config.batch_augmentations:
        return [
            (name, invert_transform(_forward(model, apply_transform(scaled, name), config), name))
            for name in transforms
        ]
    # Group transforms by output shape (rotations of a non-square image swap H and W) and batch each group.
    groups: dict[tuple[int, ...], list[str]] = {}  # output (H, W) -> transforms
    for name in transforms:
        groups.setdefault(tuple(apply_transform(scaled[:1, :1, :, :], name).shape[-2:]), []).append(name)
    outputs: dict[str, Tensor] = {}
    batch = x.shape[0]
    for names in groups.values():
        stacked = torch.cat([apply_transform(scaled, name) for name in names], dim=0)
        logits = _forward(model, stacked, config)
        for index, name in enumerate(names):
            outputs[name] = invert_transform(logits[index * batch : (index + 1) * batch], name)
    return [(name, outputs[name]) for name in transforms]


def _view_logits(model: nn.Module, x: Tensor, config: TTAConfig) -> Iterator[Tensor]:
    """Logits of every view, scale-major, inverted and resized to ``x``'s height and width."""
    height, width = x.shape[-2:]
    for scale in config.scales:
        for _name, logits in _augmented_logits(model, x, scale, config):
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            yield logits


def member_term(model: nn.Module, x: Tensor, config: TTAConfig) -> Tensor:
    """One model's mean over its views: of softmax probabilities (``mean_prob``) or of logits.

    Terms of several models merge with :func:`merge_terms`; a single model's probabilities are
    ``merge_terms([term], config)``. Runs under ``torch.inference_mode``.
    """
    total: Tensor | None = None
    views = 0
    with torch.inference_mode():
        for logits in _view_logits(model, x, config):
            term = logits.softmax(dim=1) if config.merge == "mean_prob" else logits
            # clone: the first term may be a view of a model output; never accumulate into it
            total = term.clone() if total is None else total.add_(term)
            views += 1
    if total is None:  # unreachable: config validation guarantees >= 1 scale and transform
        raise RuntimeError("member_term ran no views.")
    return total.div_(views)


def view_probabilities(model: nn.Module, x: Tensor, config: TTAConfig) -> Tensor:
    """Softmax probabilities of every view, ``(B, V, K, H, W)``, views ordered scale-major
    (``scales[0]`` x every transform, then ``scales[1]``...), each inverted to ``x``'s size.

    What :mod:`~seg_pipeline.inference.tuning` scores view subsets on; :func:`member_term` is the
    cheaper mean over all of them.
    """
    with torch.inference_mode():
        return torch.stack([logits.softmax(dim=1) for logits in _view_logits(model, x, config)], dim=1)


def merge_terms(terms: Sequence[Tensor], config: TTAConfig, weights: Sequence[float] | None = None) -> Tensor:
    """Probabilities from members' terms: their (weighted) mean, then a softmax for ``mean_logit``."""
    if not terms:
        raise ValueError("merge_terms got no terms: pass at least one model's term.")
    if weights is None:
        weights = [1.0] * len(terms)
    if len(weights) != len(terms) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"weights={list(weights)} must be {len(terms)} non-negative numbers with a positive sum."
        )
    total = sum(w / sum(weights) * term for w, term in zip(weights, terms, strict=True))
    assert isinstance(total, Tensor)
    return total if config.merge == "mean_prob" else total.softmax(dim=1)


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"tta_predict needs a float tensor (B,C,H,W), got {got}; cast with x.float().")


def tta_predict(models: Sequence[nn.Module], x: Tensor, config: TTAConfig | None = None) -> Tensor:
    """Average class probabilities of every model over every (scale, transform) view.

    Runs under ``torch.inference_mode``. Models are used as given (put them in eval mode and on
    ``x``'s device first; ``EnsemblePredictor`` does that). All ``len(models) * config.views_per_model``
    views get equal weight. With ``merge="mean_logit"`` logits are averaged and the softmax of the
    mean is returned, so the result is always probabilities.

    Args:
        models: Modules mapping float (B, C, H, W) to logits (B, K, H, W).
        x: Float input batch (B, C, H, W).
        config: Augmentations and merge mode; defaults to ``TTAConfig()`` (3 scales x none/h/v).

    Returns:
        Float32 probabilities (B, K, H, W) on ``x``'s device; they sum to 1 over K.
    """
    config = config or TTAConfig()
    models = list(models)
    if not models:
        raise ValueError("tta_predict got no models: pass at least one nn.Module.")
    _check_input(x)
    with torch.inference_mode():
        return merge_terms([member_term(model, x, config) for model in models], config)
