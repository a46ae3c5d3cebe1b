"""Tests for the named segmentation losses, class weights and the KD loss (F11, F18)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss

from seg_pipeline.training.losses import (
    LOSS_TERMS,
    KnowledgeDistillationLoss,
    build_loss,
    inverse_frequency_weights,
)

IGNORE = 255
ALL_NAMES = [*LOSS_TERMS, "ce+dice", "dice+focal", "bce+dice", "ce+dice+focal+jaccard+lovasz+bce"]


def _batch(num_classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (2, C, 6, 5) and a target with a few ignored pixels."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, num_classes, 6, 5, generator=generator)
    target = torch.randint(0, num_classes, (2, 6, 5), generator=generator)
    target[0, 0, :3] = IGNORE
    target[1, 4:, 2] = IGNORE
    return logits, target


# ----------------------------------------------------------------------------- build_loss


def test_ce_plus_dice_matches_torch_and_smp_references() -> None:
    logits, target = _batch()
    loss = build_loss("ce+dice", num_classes=3, ignore_index=IGNORE)
    reference_ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    reference_dice = DiceLoss(mode="multiclass", ignore_index=IGNORE)(logits, target)
    total = loss(logits, target)
    assert torch.allclose(total, 0.5 * reference_ce + 0.5 * reference_dice, atol=1e-6)
    assert set(loss.last_parts) == {"ce", "dice"}
    assert loss.last_parts["ce"] == pytest.approx(float(reference_ce), abs=1e-6)
    assert loss.last_parts["dice"] == pytest.approx(float(reference_dice), abs=1e-6)


def test_custom_term_weights_are_applied() -> None:
    logits, target = _batch()
    loss = build_loss("ce+dice", num_classes=3, weights={"ce": 0.2, "dice": 0.8})
    total = float(loss(logits, target))
    assert total == pytest.approx(0.2 * loss.last_parts["ce"] + 0.8 * loss.last_parts["dice"], abs=1e-6)


@pytest.mark.parametrize("name", LOSS_TERMS)
def test_ignored_pixels_do_not_change_any_term(name: str) -> None:
    logits, target = _batch()
    loss = build_loss(name, num_classes=3, ignore_index=IGNORE, class_weights=[1.0, 2.0, 0.5])
    ignored = (target == IGNORE).unsqueeze(1).expand_as(logits)
    changed_logits = torch.where(ignored, logits * 10.0 + 7.0, logits)
    assert float(loss(changed_logits, target)) == pytest.approx(float(loss(logits, target)), abs=1e-6)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_name_builds_and_backprops(name: str) -> None:
    logits, target = _batch()
    logits.requires_grad_(True)
    loss = build_loss(name, num_classes=3, class_weights=[1.0, 2.0, 1.0], label_smoothing=0.1)
    value = loss(logits, target)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert set(loss.last_parts) == set(name.split("+"))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_fully_ignored_batch_gives_zero_and_finite_gradients(name: str) -> None:
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGNORE)
    value = build_loss(name, num_classes=3)(logits, target)
    value.backward()
    assert float(value.detach()) == 0.0
    assert torch.isfinite(logits.grad).all()


def test_class_weights_change_ce_as_computed_by_hand() -> None:
    logits, target = _batch()
    weights = torch.tensor([0.2, 1.0, 3.0])
    unweighted = float(build_loss("ce", num_classes=3)(logits, target))
    weighted = float(build_loss("ce", num_classes=3, class_weights=weights)(logits, target))
    valid = target != IGNORE
    log_probs = torch.log_softmax(logits, dim=1)
    safe = torch.where(valid, target, 0)
    nll = -log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
    pixel_weight = weights[safe] * valid
    expected = float((nll * pixel_weight).sum() / pixel_weight.sum())
    assert weighted == pytest.approx(expected, abs=1e-6)
    assert abs(weighted - unweighted) > 1e-3


def test_label_smoothing_reaches_cross_entropy() -> None:
    logits, target = _batch()
    smoothed = build_loss("ce", num_classes=3, label_smoothing=0.2)(logits, target)
    reference = F.cross_entropy(logits, target, ignore_index=IGNORE, label_smoothing=0.2)
    assert torch.allclose(smoothed, reference, atol=1e-6)


def test_focal_on_one_pixel_by_hand() -> None:
    logits = torch.tensor([2.0, 0.5, -1.0]).view(1, 3, 1, 1)
    target = torch.tensor([[[1]]])
    exps = [math.exp(2.0), math.exp(0.5), math.exp(-1.0)]
    p_true = exps[1] / sum(exps)
    expected = (1.0 - p_true) ** 2 * -math.log(p_true)
    value = build_loss("focal", num_classes=3, focal_gamma=2.0)(logits, target)
    assert float(value) == pytest.approx(expected, abs=1e-6)


def test_focal_with_gamma_zero_is_weighted_cross_entropy() -> None:
    logits, target = _batch()
    weights = torch.tensor([0.5, 2.0, 1.0])
    focal = build_loss("focal", num_classes=3, class_weights=weights, focal_gamma=0.0)(logits, target)
    reference = F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE)
    assert torch.allclose(focal, reference, atol=1e-6)


def test_bce_matches_torch_one_hot_bce_without_ignored_pixels() -> None:
    logits, target = _batch()
    target = torch.where(target == IGNORE, 0, target)
    one_hot = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    reference = F.binary_cross_entropy_with_logits(logits, one_hot)
    assert torch.allclose(build_loss("bce", num_classes=3)(logits, target), reference, atol=1e-6)


def test_unknown_term_is_named_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="tversky") as error:
        build_loss("ce+tversky", num_classes=2)
    assert "lovasz" in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "ce+", "num_classes": 2}, "malformed"),
        ({"name": "ce+ce", "num_classes": 2}, "repeats"),
        ({"name": "ce+dice", "num_classes": 2, "weights": {"ce": 1.0}}, "missing"),
        ({"name": "ce", "num_classes": 3, "class_weights": [1.0, 2.0]}, "class_weights"),
        ({"name": "ce", "num_classes": 1}, "num_classes"),
    ],
)
def test_bad_build_arguments_raise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_loss(**kwargs)  # type: ignore[arg-type]


def test_wrong_logit_channels_raise() -> None:
    logits, target = _batch(num_classes=3)
    with pytest.raises(ValueError, match="logits"):
        build_loss("ce", num_classes=4)(logits, target)


# ----------------------------------------------------------------------------- class weights


def test_inverse_frequency_weights_by_hand() -> None:
    # frequencies 0.6, 0.3, 0.1 -> 1/f = 5/3, 10/3, 10 -> mean 5 -> 1/3, 2/3, 2
    weights = inverse_frequency_weights([600, 300, 100])
    assert weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx([1 / 3, 2 / 3, 2.0], abs=1e-6)


def test_inverse_frequency_weights_zero_count_sum_and_power() -> None:
    with_absent = inverse_frequency_weights([600, 0, 300, 100])
    assert with_absent.tolist() == pytest.approx([1 / 3, 0.0, 2 / 3, 2.0], abs=1e-6)
    summed = inverse_frequency_weights([600, 300, 100], normalize="sum")
    assert summed.tolist() == pytest.approx([1 / 9, 2 / 9, 6 / 9], abs=1e-6)  # 1/f sums to 15
    root = [1 / math.sqrt(0.6), 1 / math.sqrt(0.3), 1 / math.sqrt(0.1)]
    root_mean = sum(root) / 3
    sqrt_weights = inverse_frequency_weights([600, 300, 100], power=0.5)
    assert sqrt_weights.tolist() == pytest.approx([value / root_mean for value in root], abs=1e-6)
    raw = inverse_frequency_weights([600, 300, 100], normalize="none")
    assert raw.tolist() == pytest.approx([5 / 3, 10 / 3, 10.0], abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_counts": [5, 0], "ignore_zero_count": False}, "ignore_zero_count"),
        ({"class_counts": [0, 0]}, "all zero"),
        ({"class_counts": [5, -1]}, "class_counts"),
        ({"class_counts": [5, 1], "normalize": "max"}, "normalize"),
    ],
)
def test_inverse_frequency_weights_bad_input(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        inverse_frequency_weights(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- KD loss


def _softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(value / temperature) for value in values]
    return [value / sum(exps) for value in exps]


def _kl(teacher: list[float], student: list[float], temperature: float) -> float:
    """KL(softmax(t/T) || softmax(s/T)) written out with math only."""
    p_teacher = _softmax(teacher, temperature)
    p_student = _softmax(student, temperature)
    return sum(p * (math.log(p) - math.log(q)) for p, q in zip(p_teacher, p_student, strict=True))


def _two_pixel_logits(pixels: list[list[float]]) -> torch.Tensor:
    """(1, 2, 1, 2) logits from per-pixel class logits [[c0, c1], [c0, c1]]."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, 2, 1, 2)


STUDENT = [[1.0, 0.0], [0.5, 0.2]]
TEACHER = [[2.0, -1.0], [0.0, 3.0]]
TARGET = [0, 1]


def test_kd_loss_matches_hand_computed_reference() -> None:
    temperature, alpha = 2.0, 0.7
    ce = sum(-math.log(_softmax(s)[y]) for s, y in zip(STUDENT, TARGET, strict=True)) / 2
    kd = temperature**2 * sum(_kl(t, s, temperature) for s, t in zip(STUDENT, TEACHER, strict=True)) / 2
    expected = alpha * ce + (1 - alpha) * kd

    loss = KnowledgeDistillationLoss(alpha=alpha, temperature=temperature, confidence_threshold=0.5)
    value = loss(_two_pixel_logits(STUDENT), _two_pixel_logits(TEACHER), torch.tensor([[TARGET]]))
    assert float(value) == pytest.approx(expected, abs=1e-6)
    assert loss.last_parts["ce"] == pytest.approx(ce, abs=1e-6)
    assert loss.last_parts["kd"] == pytest.approx(kd, abs=1e-6)
    assert loss.last_parts["ignored_fraction"] == 0.0


def test_kd_loss_differs_from_the_softmax_input_bug() -> None:
    # MMSeg-style bug: kl_div(input=softmax(s/T)) computes sum p_t * (log p_t - q_s) instead of
    # sum p_t * (log p_t - log q_s). The reference above must not match it.
    temperature = 2.0
    correct = sum(_kl(t, s, temperature) for s, t in zip(STUDENT, TEACHER, strict=True)) / 2
    buggy = 0.0
    for s, t in zip(STUDENT, TEACHER, strict=True):
        p_teacher, q_student = _softmax(t, temperature), _softmax(s, temperature)
        buggy += sum(p * (math.log(p) - q) for p, q in zip(p_teacher, q_student, strict=True)) / 2
    loss = KnowledgeDistillationLoss(temperature=temperature)
    loss(_two_pixel_logits(STUDENT), _two_pixel_logits(TEACHER), target=None)
    assert loss.last_parts["kd"] == pytest.approx(temperature**2 * correct, abs=1e-6)
    assert abs(loss.last_parts["kd"] - temperature**2 * buggy) > 1e-2


def test_identical_student_and_teacher_give_zero_kd() -> None:
    logits = torch.randn(2, 4, 5, 5) * 4
    loss = KnowledgeDistillationLoss(confidence_threshold=0.0)
    value = loss(logits, logits.clone(), target=None)
    assert float(value) == pytest.approx(0.0, abs=1e-6)


def test_unlabeled_batch_is_pure_scaled_kl_without_alpha() -> None:
    temperature = 3.0
    expected = temperature**2 * sum(_kl(t, s, temperature) for s, t in zip(STUDENT, TEACHER, strict=True)) / 2
    loss = KnowledgeDistillationLoss(alpha=0.7, temperature=temperature)
    value = loss(_two_pixel_logits(STUDENT), _two_pixel_logits(TEACHER), target=None)
    assert float(value) == pytest.approx(expected, abs=1e-6)
    assert loss.last_parts["ce"] == 0.0


def test_unconfident_teacher_pixel_is_masked() -> None:
    # Teacher pixel 0 is confident (p = 0.95), pixel 1 is not (p = softmax(0.1, 0)[0] = 0.525 < 0.6).
    teacher = [[3.0, 0.0], [0.1, 0.0]]
    temperature = 2.0
    loss = KnowledgeDistillationLoss(alpha=0.5, temperature=temperature, confidence_threshold=0.6)
    loss(_two_pixel_logits(STUDENT), _two_pixel_logits(teacher), torch.tensor([[TARGET]]))
    assert loss.last_parts["ignored_fraction"] == pytest.approx(0.5)
    assert loss.last_parts["kd"] == pytest.approx(
        temperature**2 * _kl(teacher[0], STUDENT[0], temperature), abs=1e-6
    )


def test_confidence_is_measured_at_temperature_one() -> None:
    # Teacher (1, 0): max probability 0.731 at T=1 (kept at threshold 0.65) but 0.583 at T=3.
    teacher = [[1.0, 0.0], [3.0, 0.0]]
    assert _softmax(teacher[0])[0] > 0.65 > _softmax(teacher[0], temperature=3.0)[0]
    loss = KnowledgeDistillationLoss(temperature=3.0, confidence_threshold=0.65)
    loss(_two_pixel_logits(STUDENT), _two_pixel_logits(teacher), target=None)
    assert loss.last_parts["ignored_fraction"] == 0.0


def test_ignore_index_pixels_leave_ce_and_kd() -> None:
    temperature = 2.0
    loss = KnowledgeDistillationLoss(alpha=0.7, temperature=temperature, ignore_index=IGNORE)
    loss(_two_pixel_logits(STUDENT), _two_pixel_logits(TEACHER), torch.tensor([[[0, IGNORE]]]))
    assert loss.last_parts["ce"] == pytest.approx(-math.log(_softmax(STUDENT[0])[0]), abs=1e-6)
    assert loss.last_parts["kd"] == pytest.approx(
        temperature**2 * _kl(TEACHER[0], STUDENT[0], temperature), abs=1e-6
    )
    assert loss.last_parts["ignored_fraction"] == 0.0


def test_no_kept_pixel_gives_zero_kd() -> None:
    loss = KnowledgeDistillationLoss(confidence_threshold=0.99)
    value = loss(_two_pixel_logits(STUDENT), _two_pixel_logits(TEACHER), target=None)
    assert float(value) == 0.0
    assert loss.last_parts["ignored_fraction"] == 1.0


def test_gradient_flows_to_the_student_only() -> None:
    student = _two_pixel_logits(STUDENT).requires_grad_(True)
    teacher = _two_pixel_logits(TEACHER).requires_grad_(True)
    KnowledgeDistillationLoss()(student, teacher, torch.tensor([[TARGET]])).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_warmup_is_plain_cross_entropy_without_a_teacher() -> None:
    ce = sum(-math.log(_softmax(s)[y]) for s, y in zip(STUDENT, TARGET, strict=True)) / 2
    loss = KnowledgeDistillationLoss(alpha=0.7)
    value = loss(_two_pixel_logits(STUDENT), None, torch.tensor([[TARGET]]), kd_enabled=False)
    assert float(value) == pytest.approx(ce, abs=1e-6)
    assert loss.last_parts == {"ce": pytest.approx(ce, abs=1e-6), "kd": 0.0, "ignored_fraction": 0.0}


@pytest.mark.parametrize(
    ("teacher", "target", "kd_enabled", "message"),
    [
        (None, [[TARGET]], True, "teacher_logits"),
        ("student", None, False, "target"),
        ("wrong_shape", [[TARGET]], True, "shape"),
    ],
)
def test_kd_bad_calls_raise(teacher: str | None, target: list | None, kd_enabled: bool, message: str) -> None:
    student = _two_pixel_logits(STUDENT)
    teacher_logits = {None: None, "student": student, "wrong_shape": torch.zeros(1, 2, 2, 1)}[teacher]
    target_tensor = None if target is None else torch.tensor(target)
    with pytest.raises(ValueError, match=message):
        KnowledgeDistillationLoss()(student, teacher_logits, target_tensor, kd_enabled=kd_enabled)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"confidence_threshold": 2.0}, "threshold"),
    ],
)
def test_kd_bad_settings_raise(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KnowledgeDistillationLoss(**kwargs)
