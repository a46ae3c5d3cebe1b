"""Training-side scores (``loop.train_metrics``): the epoch's own predictions, counted like validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from seg_pipeline.metrics.confusion import ConfusionMatrix
from seg_pipeline.settings import LoopSettings
from seg_pipeline.training.objectives import SupervisedObjective
from seg_pipeline.training.train_scores import TrainScores
from seg_pipeline.training.trainer import fit
from seg_pipeline_tests.training.test_loop import TinyNet, _batches, _config


def _with_unlabelled_corner(batches: list[dict]) -> list[dict]:
    for batch in batches:
        batch["mask"] = batch["mask"].clone()
        batch["mask"][:, :2, :2] = 255
    return batches


def test_train_scores_match_a_confusion_matrix_of_the_same_predictions(tmp_path: Path) -> None:
    """With a frozen model (lr 0) the logged train/accuracy and train/f1 are those of its predictions."""
    torch.manual_seed(0)
    model = TinyNet()
    batches = _with_unlabelled_corner(_batches(6, 2))
    expected = ConfusionMatrix(3, ignore_index=255)
    with torch.no_grad():
        for batch in batches:
            expected.update(model(batch["image"]).argmax(1).numpy(), batch["mask"].numpy())
    scores = expected.compute()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    objective = SupervisedObjective(lambda logits, mask: F.cross_entropy(logits, mask, ignore_index=255))
    result = fit(
        model, objective, batches, None, None, optimizer, None, _config(train_metrics=True), tmp_path,
        resume=False,
    )  # fmt: skip
    logs = result.history[-1]
    assert np.isclose(logs["train/accuracy"], scores.pixel_accuracy)
    assert np.isclose(logs["train/f1"], scores.mdice)
    assert np.isclose(logs["train/miou"], scores.miou)
    assert 0.0 < logs["train/accuracy"] < 1.0  # an untrained net: the scores are not trivially 0 or 1


def test_train_scores_are_off_by_default(tmp_path: Path) -> None:
    torch.manual_seed(0)
    optimizer_model = TinyNet()
    result = fit(
        optimizer_model, SupervisedObjective(F.cross_entropy), _batches(4, 2), None, None,
        torch.optim.SGD(optimizer_model.parameters(), lr=0.1), None, _config(), tmp_path, resume=False,
    )  # fmt: skip
    assert not {"train/accuracy", "train/f1"} & set(result.history[-1])
    assert LoopSettings().train_metrics is False


def test_labels_outside_the_classes_are_not_counted() -> None:
    scores = TrainScores(torch.device("cpu"))
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = 1.0  # predicts class 1 everywhere
    scores.add(logits, torch.tensor([[[1, 255], [0, 255]]]))
    logs = scores.reduce()
    assert logs["train/accuracy"] == 0.5  # two scored pixels, one right
