"""The KD objective: warmup, teacher ensembles, transfer set, multi-scale normalisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seg_pipeline.training.distill import DistillationObjective, ScaleNormalizer
from seg_pipeline.training.losses import KnowledgeDistillationLoss


class CountingConv(nn.Module):
    """A 1x1 conv that counts its calls and the input sizes it saw."""

    def __init__(self, seed: int, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, classes, 1)
        self.calls: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape[-2:]))
        return self.conv(x)


def _batch(labeled: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    mask = torch.randint(0, 3, (2, 8, 8)) if labeled else torch.full((2, 8, 8), 255)
    return {"image": torch.randn(2, 3, 8, 8), "mask": mask}


def test_warmup_epochs_are_ce_only_and_skip_the_teacher() -> None:
    teacher, student = CountingConv(1), CountingConv(2)
    objective = DistillationObjective([teacher], KnowledgeDistillationLoss(), warmup_epochs=2)
    for epoch in (1, 2):
        _, logs = objective(student, _batch(), epoch)
        assert logs["kd"] == 0.0 and logs["kd_active"] == 0.0
    assert teacher.calls == []
    _, logs = objective(student, _batch(), 3)
    assert logs["kd"] > 0 and logs["kd_active"] == 1.0 and len(teacher.calls) == 1


def test_single_teacher_matches_the_plain_kd_loss() -> None:
    teacher, student = CountingConv(1), CountingConv(2)
    kd = KnowledgeDistillationLoss(alpha=0.7, temperature=3.0, confidence_threshold=0.0)
    objective = DistillationObjective([teacher], kd, warmup_epochs=0)
    batch = _batch()
    loss, _ = objective(student, batch, 1)
    reference = KnowledgeDistillationLoss(alpha=0.7, temperature=3.0, confidence_threshold=0.0)
    expected = reference(student.conv(batch["image"]), teacher.conv(batch["image"]), batch["mask"])
    assert torch.allclose(loss, expected, atol=1e-5)


def test_teacher_ensemble_averages_probabilities() -> None:
    a, b = CountingConv(1), CountingConv(5)
    objective = DistillationObjective([a, b], KnowledgeDistillationLoss(), warmup_epochs=0)
    x = torch.randn(1, 3, 4, 4)
    probs = (torch.softmax(a.conv(x), 1) + torch.softmax(b.conv(x), 1)) / 2
    assert torch.allclose(torch.softmax(objective.teacher_logits(x), 1), probs, atol=1e-5)


def test_transfer_set_samples_get_the_kd_term_only() -> None:
    teacher, student = CountingConv(1), CountingConv(2)
    kd = KnowledgeDistillationLoss(alpha=0.7, confidence_threshold=0.0)
    objective = DistillationObjective([teacher], kd, warmup_epochs=0)
    batch = _batch(labeled=False)
    loss, logs = objective(student, batch, 1)
    assert logs["ce"] == 0.0 and logs["kd"] > 0
    pure = KnowledgeDistillationLoss(alpha=0.7, confidence_threshold=0.0)
    assert torch.allclose(
        loss, pure(student.conv(batch["image"]), teacher.conv(batch["image"]), None), atol=1e-5
    )


def test_multi_scale_modes_resize_the_batch_and_normalise_per_scale() -> None:
    teacher, student = CountingConv(1), CountingConv(2)
    objective = DistillationObjective(
        [teacher],
        KnowledgeDistillationLoss(),
        warmup_epochs=0,
        patch_sizes=(8, 16),
        multi_scale_mode="per_step_all_scales",
    )
    loss, logs = objective(student, _batch(), 1)
    assert student.calls == [(8, 8), (16, 16)]
    assert set(objective.normalizer.ema) == {8, 16}
    # First step: each scale's loss divided by itself -> exactly 1 per scale.
    assert loss.item() == pytest.approx(2.0, rel=1e-5)
    assert "loss_8" in logs and "loss_16" in logs

    sampled = DistillationObjective(
        [CountingConv(1)], KnowledgeDistillationLoss(), patch_sizes=(8, 16), seed=0, warmup_epochs=0
    )
    one = CountingConv(2)
    for _ in range(6):
        sampled(one, _batch(), 1)
    assert len(one.calls) == 6 and set(one.calls) == {(8, 8), (16, 16)}


def test_scale_normalizer_ema_math() -> None:
    norm = ScaleNormalizer(decay=0.5)
    assert norm.normalize(8, torch.tensor(2.0)).item() == pytest.approx(1.0)
    assert norm.normalize(8, torch.tensor(4.0)).item() == pytest.approx(4.0 / 3.0)  # ema = 0.5*2 + 0.5*4
    norm.normalize(16, torch.tensor(12.0))
    assert norm.combined_metric() == pytest.approx(math.sqrt(3.0 * 12.0))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="multi_scale_mode"):
        DistillationObjective([CountingConv(1)], KnowledgeDistillationLoss(), multi_scale_mode="all")
    with pytest.raises(ValueError, match="at least one teacher"):
        DistillationObjective([], KnowledgeDistillationLoss())
