"""Each epoch's validation logs what the seeds monitor: mIoU, per-pixel F1 and accuracy, seed 003's pooled
fire IoU and tile detection, seed 000's "labels <= 0 not scored", and a validation loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from seg_pipeline.settings import ScoringSettings, ValidationSettings
from seg_pipeline.training.losses import build_loss
from seg_pipeline.training.validation import make_evaluate_fn, validation_keys

CLASSES = ["background", "smoulder", "fire"]


class Threshold(nn.Module):
    """Predicts 'fire' (class 2) where band 0 is > 0, else background: a model with known outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fire = x[:, :1] * self.scale
        return torch.cat([-fire, torch.full_like(fire, -30.0), fire], dim=1)


def tile(image_fire: np.ndarray, mask: np.ndarray) -> dict[str, torch.Tensor]:
    image = np.stack([np.where(image_fire, 1.0, -1.0)] * 3).astype(np.float32)
    return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask.astype(np.int64))}


@pytest.fixture
def batches() -> list[list[dict[str, torch.Tensor]]]:
    side = 16
    burning = np.zeros((side, side), dtype=bool)
    burning[:8] = True  # predicted fire: the top half
    truth = np.zeros((side, side), dtype=np.int64)
    truth[:4], truth[4:8] = 1, 2  # truth: smoulder, then fire, in the top half
    quiet = np.zeros((side, side), dtype=bool)
    missed = np.zeros((side, side), dtype=np.int64)
    missed[-2:, -2:] = 2  # a small fire the model misses
    return [[tile(burning, truth), tile(quiet, np.zeros_like(truth))], [tile(quiet, missed)]]


def test_validation_logs_pooled_fire_iou_detection_f1_and_loss(
    batches: list[list[dict[str, torch.Tensor]]],
) -> None:
    loss = build_loss("ce", len(CLASSES), ignore_index=255)
    evaluate = make_evaluate_fn(3, 255, CLASSES, positive_classes=[1, 2], loss_fn=loss)
    logs = evaluate(Threshold(), batches)

    # Pooled, smoulder and fire are one class: tile 1 is a perfect hit (128 px), tile 3 misses 4 px.
    assert logs["val/pooled/iou"] == pytest.approx(128 / 132)
    assert logs["val/pooled/recall"] == pytest.approx(128 / 132)
    assert logs["val/pooled/precision"] == pytest.approx(1.0)
    # Per class, half of the predicted fire is smoulder: fire IoU = 64 / (128 + 4).
    assert logs["val/iou/fire"] == pytest.approx(64 / 132)
    # Tiles: 1 has fire and is detected, 2 has none and none is predicted, 3 has fire and is missed.
    assert logs["val/detection/precision"] == 1.0
    assert logs["val/detection/recall"] == 0.5
    assert logs["val/detection/f1"] == pytest.approx(2 / 3)
    assert logs["val/f1"] == logs["val/mdice"] and logs["val/accuracy"] == logs["val/pixel_accuracy"]
    # The loss is the stage's loss of the merged probabilities: CE of smoulder pixels called fire is large.
    assert logs["val/loss"] > 1.0 and math.isfinite(logs["val/loss"])
    assert set(logs) <= validation_keys(CLASSES, [1, 2], with_loss=True)


def test_seed_000_rule_leaves_background_labels_out_of_every_score(
    batches: list[list[dict[str, torch.Tensor]]],
) -> None:
    plain = make_evaluate_fn(3, 255, CLASSES, positive_classes=[1, 2])(Threshold(), batches)
    rule = ValidationSettings(scoring=ScoringSettings(ignore_nonpositive=True))
    nonpositive = make_evaluate_fn(3, 255, CLASSES, rule, positive_classes=[1, 2])(Threshold(), batches)
    assert "val/iou/background" in plain and "val/iou/background" not in nonpositive
    # Background pixels no longer count: only the 132 fire-or-smoulder pixels are scored.
    assert nonpositive["val/support/smoulder"] + nonpositive["val/support/fire"] == 132
    assert nonpositive["val/pixel_accuracy"] == pytest.approx(64 / 132)
    assert plain["val/pixel_accuracy"] > nonpositive["val/pixel_accuracy"]


def test_detection_needs_min_pixels_when_asked(batches: list[list[dict[str, torch.Tensor]]]) -> None:
    strict = ValidationSettings(scoring=ScoringSettings(detection_min_pixels=5))
    logs = make_evaluate_fn(3, 255, CLASSES, strict, positive_classes=[2])(Threshold(), batches)
    # Tile 3's 4 fire pixels are below 5: it is a negative tile now, correctly predicted negative.
    assert logs["val/detection/recall"] == 1.0 and logs["val/detection/accuracy"] == 1.0


def test_without_loss_fn_there_is_no_val_loss(batches: list[list[dict[str, torch.Tensor]]]) -> None:
    logs = make_evaluate_fn(3, 255, CLASSES, positive_classes=[2])(Threshold(), batches)
    assert "val/loss" not in logs and "val/loss" not in validation_keys(CLASSES, [2], with_loss=False)
