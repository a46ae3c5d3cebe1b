"""The KD objective: warmup, teacher ensembles, transfer set (multi-scale: test_multiscale)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seg_pipeline.training.distill import DistillationObjective
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


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one teacher"):
        DistillationObjective([], KnowledgeDistillationLoss())
