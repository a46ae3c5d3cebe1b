"""The patch-size schedule on the objective side: crops at the step's size, one normaliser per size."""

from __future__ import annotations

import math
import random

import pytest
import torch

from seg_pipeline.training.multiscale import MultiScaleObjective, ScaleNormalizer, crop_batch

IGNORE = 255


class SizeRecorder:
    """An objective whose loss is 1 + the mean image value, recording the sizes it trains."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, model, batch, epoch):
        self.sizes.append(int(batch["image"].shape[-1]))
        loss = 1.0 + batch["image"].mean()
        return loss, {"ce": float(loss)}


def _batch(side: int = 32) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"image": torch.rand(2, 3, side, side), "mask": torch.randint(0, 3, (2, side, side))}


def test_a_crop_of_a_padded_small_tile_keeps_the_tile() -> None:
    batch = _batch()
    batch["mask"][:] = IGNORE
    batch["mask"][0, 20:30, 4:14] = 1  # a 10 px tile padded into a 32 px patch
    for seed in range(20):
        crop = crop_batch(batch, 16, random.Random(seed), IGNORE)
        assert crop["image"].shape == (2, 3, 16, 16) and crop["mask"].shape == (2, 16, 16)
        assert int((crop["mask"][0] == 1).sum()) == 100, seed


def test_a_crop_takes_image_and_mask_from_the_same_place() -> None:
    batch = _batch()
    batch["mask"] = (batch["image"][:, 0] * 1000).long()  # the mask encodes the pixel
    crop = crop_batch(batch, 8, random.Random(1), IGNORE)
    assert torch.equal(crop["mask"], (crop["image"][:, 0] * 1000).long())


def test_one_size_per_step_draws_from_the_schedule() -> None:
    inner = SizeRecorder()
    objective = MultiScaleObjective(inner, [16, 32], "one_per_step", ignore_index=IGNORE, seed=0)
    for _ in range(12):
        objective(None, _batch(), 1)
    assert set(inner.sizes) == {16, 32}

    cycling = SizeRecorder()
    objective = MultiScaleObjective(
        cycling, [16, 24, 32], "one_per_step", ignore_index=IGNORE, sampling="cycle"
    )
    for _ in range(4):
        objective(None, _batch(), 1)
    assert cycling.sizes == [16, 24, 32, 16]


def test_all_sizes_per_step_are_each_normalised_to_one_at_first() -> None:
    inner = SizeRecorder()
    objective = MultiScaleObjective(inner, [16, 32], "all_per_step", ignore_index=IGNORE)
    loss, logs = objective(None, _batch(), 1)
    assert inner.sizes == [16, 32]
    assert loss.item() == pytest.approx(2.0, rel=1e-5)  # each size's loss divided by itself
    assert {"loss_16", "loss_32", "scale_combined", "ce"} <= set(logs)


def test_sizes_above_the_batch_train_the_batch_as_it_is() -> None:
    inner = SizeRecorder()
    MultiScaleObjective(inner, [64], "one_per_step", ignore_index=IGNORE)(None, _batch(32), 1)
    assert inner.sizes == [32]


def test_scale_normalizer_ema_math() -> None:
    norm = ScaleNormalizer(decay=0.5)
    assert norm.normalize(8, torch.tensor(2.0)).item() == pytest.approx(1.0)
    assert norm.normalize(8, torch.tensor(4.0)).item() == pytest.approx(4.0 / 3.0)  # ema = 0.5*2 + 0.5*4
    norm.normalize(16, torch.tensor(12.0))
    assert norm.combined_metric() == pytest.approx(math.sqrt(3.0 * 12.0))


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ValueError, match=r"patches\.mode"):
        MultiScaleObjective(SizeRecorder(), [16], "all", ignore_index=IGNORE)
    with pytest.raises(ValueError, match=r"patches\.sampling"):
        MultiScaleObjective(SizeRecorder(), [16], "one_per_step", ignore_index=IGNORE, sampling="random")
    with pytest.raises(ValueError, match="patch sizes"):
        MultiScaleObjective(SizeRecorder(), [], "one_per_step", ignore_index=IGNORE)
