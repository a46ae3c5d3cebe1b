"""Segmentation losses by name, class weights and the distillation loss (F11 in docs/architecture.md, F18).

Choices, and why:

* ``ce`` is ``F.cross_entropy`` (class weights, ``ignore_index`` and label smoothing built in).
* ``dice``, ``jaccard`` and ``lovasz`` are SMP's losses in ``"multiclass"`` mode with
  ``ignore_index``: they zero (Dice/Jaccard) or drop (Lovasz) the ignored pixels.
* ``focal`` is written here on top of ``F.cross_entropy``: SMP's multiclass ``FocalLoss`` is a
  one-vs-rest *sigmoid* focal loss (it does not see the softmax the rest of the pipeline uses)
  and returns NaN when every pixel of a batch is ignored. Ours is the softmax focal loss of
  Lin et al., ``(1 - p_t)^gamma * CE``, with the same class-weight normalisation as weighted CE,
  so ``gamma=0`` is exactly weighted CE.
* ``bce`` is one-hot BCE over the class channels via ``F.binary_cross_entropy_with_logits``: SMP's
  ``SoftBCEWithLogitsLoss`` expects targets already one-hot and averages over ignored pixels too.

Every term returns a zero that is still attached to the graph when a batch has no valid pixel,
so a fully ignored tile never produces NaN gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, JaccardLoss, LovaszLoss
from torch import nn

LOSS_TERMS: tuple[str, ...] = ("ce", "dice", "focal", "jaccard", "lovasz", "bce")


def _zero_like_graph(logits: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to ``logits`` so ``backward()`` works (with zero gradients)."""
    return logits.sum() * 0.0


def _as_weight_tensor(
    class_weights: Sequence[float] | torch.Tensor | None, num_classes: int
) -> torch.Tensor | None:
    if class_weights is None:
        return None
    weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten().clone()
    if weights.numel() != num_classes:
        raise ValueError(
            f"class_weights has {weights.numel()} entries but num_classes={num_classes}; "
            "pass one weight per class."
        )
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"class_weights={weights.tolist()} must be finite and >= 0.")
    return weights


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Validate shapes and return the target as ``(B, H, W)`` int64."""
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be (B, {num_classes}, H, W), got {tuple(logits.shape)}.")
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target must be (B, H, W) = {tuple(logits.shape[:1] + logits.shape[2:])}, "
            f"got {tuple(target.shape)}."
        )
    return target.long()


class CrossEntropyTerm(nn.Module):
    """``F.cross_entropy`` with class weights, ignore_index and label smoothing; 0 if all ignored."""

    class_weights: torch.Tensor | None  # a buffer (register_buffer), typed for the checker

    def __init__(
        self, ignore_index: int, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the valid pixels (zero, still in the graph, when none is valid)."""
        if not (target != self.ignore_index).any():
            return _zero_like_graph(logits)
        return F.cross_entropy(
            logits,
            target,
            weight=self.class_weights,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )


class SoftmaxFocalTerm(nn.Module):
    """Softmax focal loss ``sum_i w[y_i] (1 - p_i)^gamma CE_i / sum_i w[y_i]`` over valid pixels."""

    class_weights: torch.Tensor | None  # a buffer (register_buffer), typed for the checker

    def __init__(
        self, ignore_index: int, class_weights: torch.Tensor | None = None, gamma: float = 2.0
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal_gamma={gamma} must be >= 0.")
        self.ignore_index = ignore_index
        self.gamma = gamma
        self.register_buffer("class_weights", class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Softmax focal loss over the valid pixels."""
        valid = target != self.ignore_index
        if not valid.any():
            return _zero_like_graph(logits)
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        # Unweighted per-pixel CE gives p_t; the class weight multiplies afterwards.
        pixel_ce = F.cross_entropy(logits, safe_target, reduction="none")
        true_class_probability = torch.exp(-pixel_ce)
        pixel_loss = (1.0 - true_class_probability).pow(self.gamma) * pixel_ce
        if self.class_weights is None:
            pixel_weight = valid.to(logits.dtype)
        else:
            pixel_weight = self.class_weights.to(logits.dtype)[safe_target] * valid
        return (pixel_loss * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-12)


class OneHotBceTerm(nn.Module):
    """Multi-label BCE over class channels with one-hot targets; mean over valid pixels x classes.

    Class weights multiply each channel's BCE (like ``BCEWithLogitsLoss(weight=...)``); the mean is
    still over valid elements, not over weights.
    """

    class_weights: torch.Tensor | None  # a buffer (register_buffer), typed for the checker

    def __init__(
        self, ignore_index: int, num_classes: int, class_weights: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        self.register_buffer("class_weights", class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean BCE over classes and valid pixels of one-hot targets."""
        valid = target != self.ignore_index
        if not valid.any():
            return _zero_like_graph(logits)
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        one_hot = F.one_hot(safe_target, self.num_classes).permute(0, 3, 1, 2).to(logits.dtype)
        weight = None if self.class_weights is None else self.class_weights.to(logits.dtype).view(1, -1, 1, 1)
        element_loss = F.binary_cross_entropy_with_logits(logits, one_hot, weight=weight, reduction="none")
        valid_elements = valid.unsqueeze(1).to(logits.dtype)
        return (element_loss * valid_elements).sum() / (valid_elements.sum() * self.num_classes)


class SmpTerm(nn.Module):
    """An SMP loss that returns a graph-connected 0 when every pixel is ignored.

    SMP's Lovasz returns an empty tensor in that case; Dice/Jaccard already give 0, but going
    through one guard keeps every term's contract the same.
    """

    def __init__(self, smp_loss: nn.Module, ignore_index: int) -> None:
        super().__init__()
        self.smp_loss = smp_loss
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The SMP loss, or a graph-connected zero when every pixel is ignored."""
        if not (target != self.ignore_index).any():
            return _zero_like_graph(logits)
        return self.smp_loss(logits, target)


def _build_term(
    name: str,
    num_classes: int,
    ignore_index: int,
    class_weights: torch.Tensor | None,
    focal_gamma: float,
    label_smoothing: float,
) -> nn.Module:
    if name == "ce":
        return CrossEntropyTerm(ignore_index, class_weights, label_smoothing)
    if name == "focal":
        return SoftmaxFocalTerm(ignore_index, class_weights, focal_gamma)
    if name == "bce":
        return OneHotBceTerm(ignore_index, num_classes, class_weights)
    if name == "dice":
        return SmpTerm(DiceLoss(mode="multiclass", from_logits=True, ignore_index=ignore_index), ignore_index)
    if name == "jaccard":
        return SmpTerm(
            JaccardLoss(mode="multiclass", from_logits=True, ignore_index=ignore_index), ignore_index
        )
    if name == "lovasz":
        return SmpTerm(LovaszLoss(mode="multiclass", ignore_index=ignore_index), ignore_index)
    raise ValueError(f"loss term {name!r} is unknown; valid terms are {list(LOSS_TERMS)}.")


class SegmentationLoss(nn.Module):
    """Weighted sum of named loss terms; ``last_parts`` holds each unweighted term for logging.

    Args:
        terms: Term name -> module mapping ``(logits, target) -> scalar``.
        weights: Term name -> weight in the total (same keys as ``terms``).
        num_classes: Expected channel count of the logits.
    """

    def __init__(
        self, terms: Mapping[str, nn.Module], weights: Mapping[str, float], num_classes: int
    ) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {name: float(weights[name]) for name in terms}
        self.num_classes = num_classes
        self.last_parts: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss for logits ``(B, C, H, W)`` and integer target ``(B, H, W)``."""
        target = _check_inputs(logits, target, self.num_classes)
        total = logits.new_zeros(())
        parts: dict[str, float] = {}
        for name, term in self.terms.items():
            value = term(logits, target)
            parts[name] = float(value.detach())
            total = total + self.weights[name] * value
        self.last_parts = parts
        return total


def build_loss(
    name: str,
    num_classes: int,
    ignore_index: int = 255,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    weights: Mapping[str, float] | None = None,
    focal_gamma: float = 2.0,
    label_smoothing: float = 0.0,
) -> SegmentationLoss:
    """Build a loss from a name such as ``"ce"``, ``"ce+dice"``, ``"dice+focal"`` or ``"bce+dice"``.

    Args:
        name: One term or ``+``-joined terms from :data:`LOSS_TERMS`.
        num_classes: Number of classes (channels of the logits), >= 2.
        ignore_index: Target value excluded from every term (nodata, unlabeled).
        class_weights: Per-class weights for ``ce``, ``focal`` and ``bce`` (e.g. from
            :func:`inverse_frequency_weights`). Dice/Jaccard/Lovasz already average over classes,
            which is their own answer to imbalance, so they are left unweighted.
        weights: Term -> weight in the total, covering every term. Default: equal weights summing
            to 1, so ``ce+dice`` is ``0.5*CE + 0.5*Dice`` as in seed 003.
        focal_gamma: Focusing exponent of ``focal``.
        label_smoothing: Label smoothing of ``ce`` (passed to ``F.cross_entropy``).
    """
    term_names = [part.strip().lower() for part in str(name).split("+")]
    if not term_names or any(not part for part in term_names):
        raise ValueError(f"loss name={name!r} is empty or malformed; use e.g. 'ce', 'ce+dice', 'dice+focal'.")
    unknown = [part for part in term_names if part not in LOSS_TERMS]
    if unknown:
        raise ValueError(
            f"loss name={name!r} has unknown term(s) {unknown}; valid terms are {list(LOSS_TERMS)}."
        )
    if len(set(term_names)) != len(term_names):
        raise ValueError(f"loss name={name!r} repeats a term; use each term once and set `weights` instead.")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be >= 2 (softmax over background + classes).")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1).")

    if weights is None:
        term_weights = {term: 1.0 / len(term_names) for term in term_names}
    else:
        missing = [term for term in term_names if term not in weights]
        extra = [key for key in weights if key not in term_names]
        if missing or extra:
            raise ValueError(
                f"weights={dict(weights)!r} must have exactly the terms {term_names}; "
                f"missing {missing}, unexpected {extra}."
            )
        term_weights = {term: float(weights[term]) for term in term_names}

    weight_tensor = _as_weight_tensor(class_weights, num_classes)
    terms = {
        term: _build_term(term, num_classes, ignore_index, weight_tensor, focal_gamma, label_smoothing)
        for term in term_names
    }
    return SegmentationLoss(terms, term_weights, num_classes)


def inverse_frequency_weights(
    class_counts: Sequence[int],
    ignore_zero_count: bool = True,
    normalize: str = "mean",
    power: float = 1.0,
) -> torch.Tensor:
    """Class weights proportional to ``(1 / frequency) ** power`` from per-class pixel counts.

    Args:
        class_counts: Pixels per class (index = class id), e.g. summed from the tile catalog.
        ignore_zero_count: Classes with no pixels get weight 0 and are left out of the
            normalisation (they cannot be weighted by a frequency they do not have). ``False``
            raises instead, for callers that expect every class to be present.
        normalize: ``"mean"`` (weights of present classes average 1, so the loss scale stays
            that of unweighted CE), ``"sum"`` (they sum to 1) or ``"none"``.
        power: 1.0 is plain inverse frequency; 0.5 (square-root inverse frequency) is a common
            softer choice when one class dominates by orders of magnitude.

    Returns:
        float32 tensor of shape ``(len(class_counts),)``.
    """
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(
            f"class_counts={list(class_counts)!r} must be a non-empty list of per-class pixel counts."
        )
    if (counts < 0).any() or not torch.isfinite(counts).all():
        raise ValueError(f"class_counts={counts.tolist()} must be finite and >= 0.")
    present = counts > 0
    if not present.any():
        raise ValueError("class_counts are all zero; count pixels on a non-empty training split first.")
    if not present.all() and not ignore_zero_count:
        absent = torch.nonzero(~present).flatten().tolist()
        raise ValueError(
            f"class_counts has zero pixels for classes {absent}; "
            "pass ignore_zero_count=True to give them weight 0."
        )
    if power < 0:
        raise ValueError(f"power={power} must be >= 0.")
    frequency = counts / counts.sum()
    weights = torch.zeros_like(counts)
    weights[present] = frequency[present].pow(-power)
    if normalize == "mean":
        weights = weights / weights[present].mean()
    elif normalize == "sum":
        weights = weights / weights.sum()
    elif normalize != "none":
        raise ValueError(f"normalize={normalize!r} is unknown; use 'mean', 'sum' or 'none'.")
    return weights.to(torch.float32)


class KnowledgeDistillationLoss(nn.Module):
    """``alpha*CE + (1-alpha) * T^2 * KL(teacher_T || student_T)`` with teacher-confidence masking.

    The KL divergence is computed per pixel from ``log_softmax(student/T)`` and
    ``log_softmax(teacher/T)`` with ``F.kl_div(..., log_target=True)``. (MMSeg's KLDivLoss feeds
    *softmax* probabilities as the input of ``kl_div``, which expects log-probabilities: a bug not
    copied here.) The ``T^2`` factor keeps the soft-target gradients on the same scale as CE when
    the temperature changes (Hinton et al., 2015).

    Masking (seed 002): pixels whose teacher max probability at T=1 is below
    ``confidence_threshold`` are left out of the KD term, and so are target pixels equal to
    ``ignore_index`` (nodata is not worth imitating either). The KD term is the mean over kept
    pixels, 0 when none is kept. ``last_parts["ignored_fraction"]`` is the share of valid pixels
    the confidence mask dropped (seed 002 expects about 20-30%).

    Unlabeled batches (``target=None``, the transfer set of F18) return the pure
    ``T^2 * KL`` term, without the ``(1 - alpha)`` factor: ``alpha`` balances the two signals when
    both exist, and scaling a soft-label-only batch by 0.3 would just shrink its learning rate.
    With ``kd_enabled=False`` (CE-only warmup epochs) the loss is plain CE and the teacher logits
    may be ``None``, so the teacher need not even run.

    Args:
        alpha: Weight of the supervised CE term, in [0, 1].
        temperature: Softmax temperature T > 0 for the KD term.
        confidence_threshold: Teacher max probability (T=1) needed for a pixel to be distilled.
        ignore_index: Target value excluded from CE and KD.
        ce_weight: Optional per-class weights for CE.
    """

    ce_weight: torch.Tensor | None  # a buffer (register_buffer), typed for the checker

    def __init__(
        self,
        alpha: float = 0.7,
        temperature: float = 3.0,
        confidence_threshold: float = 0.5,
        ignore_index: int = 255,
        ce_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must be in [0, 1] (weight of CE; KD gets 1 - alpha).")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0.")
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold={confidence_threshold} must be in [0, 1].")
        self.alpha = alpha
        self.temperature = temperature
        self.confidence_threshold = confidence_threshold
        self.ignore_index = ignore_index
        self.register_buffer("ce_weight", None if ce_weight is None else torch.as_tensor(ce_weight).float())
        self.last_parts: dict[str, float] = {}

    def _cross_entropy(self, student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (target != self.ignore_index).any():
            return _zero_like_graph(student_logits)
        return F.cross_entropy(student_logits, target, weight=self.ce_weight, ignore_index=self.ignore_index)

    def _distillation(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """Masked mean of ``T^2 * KL`` and the fraction of valid pixels the confidence mask dropped."""
        temperature = self.temperature
        # float32 even under AMP: log-softmax differences at T > 1 are small and fp16 loses them.
        teacher_logits = teacher_logits.detach().float()
        student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
        teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=1)
        pixel_kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(
            dim=1
        )
        teacher_confidence = torch.softmax(teacher_logits, dim=1).amax(dim=1)
        kept = valid & (teacher_confidence >= self.confidence_threshold)
        kept_count = kept.sum()
        kd = (pixel_kl * kept).sum() / kept_count.clamp_min(1) * temperature**2
        valid_count = int(valid.sum())
        ignored_fraction = 1.0 - int(kept_count) / valid_count if valid_count else 0.0
        return kd, ignored_fraction

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        target: torch.Tensor | None = None,
        kd_enabled: bool = True,
    ) -> torch.Tensor:
        """Scalar loss; see the class docstring for the labelled, unlabelled and warmup cases."""
        num_classes = student_logits.shape[1]
        if target is not None:
            target = _check_inputs(student_logits, target, num_classes)
        if not kd_enabled:
            if target is None:
                raise ValueError("target is None and kd_enabled=False: there is nothing to learn from.")
            ce = self._cross_entropy(student_logits, target)
            self.last_parts = {"ce": float(ce.detach()), "kd": 0.0, "ignored_fraction": 0.0}
            return ce
        if teacher_logits is None:
            raise ValueError("teacher_logits is None but kd_enabled=True; pass the teacher's logits.")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
                f"{tuple(student_logits.shape)} (resize the teacher output first)."
            )
        if target is None:
            valid = torch.ones_like(student_logits[:, 0], dtype=torch.bool)
            kd, ignored_fraction = self._distillation(student_logits, teacher_logits, valid)
            self.last_parts = {"ce": 0.0, "kd": float(kd.detach()), "ignored_fraction": ignored_fraction}
            return kd
        valid = target != self.ignore_index
        ce = self._cross_entropy(student_logits, target)
        kd, ignored_fraction = self._distillation(student_logits, teacher_logits, valid)
        self.last_parts = {
            "ce": float(ce.detach()),
            "kd": float(kd.detach()),
            "ignored_fraction": ignored_fraction,
        }
        return self.alpha * ce + (1.0 - self.alpha) * kd
