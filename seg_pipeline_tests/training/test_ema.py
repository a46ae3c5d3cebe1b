"""Tests for the EMA of weights (hand-computed averages on a one-parameter model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seg_pipeline.training.ema import ModelEMA


class _OneParam(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value]))

    def set(self, value: float) -> None:
        with torch.no_grad():
            self.w.fill_(value)


def test_ema_math_without_warmup() -> None:
    model = _OneParam(1.0)
    ema = ModelEMA(model, decay=0.5, warmup=False)
    model.set(3.0)
    ema.update(model)
    assert ema.module.w.item() == pytest.approx(2.0)  # 0.5 * 1 + 0.5 * 3
    model.set(5.0)
    ema.update(model)
    assert ema.module.w.item() == pytest.approx(3.5)  # 0.5 * 2 + 0.5 * 5
    assert ema.num_updates == 2


def test_ema_warmup_decay_ramps_up() -> None:
    model = _OneParam(1.0)
    ema = ModelEMA(model, decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    model.set(3.0)
    ema.update(model)
    assert ema.module.w.item() == pytest.approx(2.8)  # 0.1 * 1 + 0.9 * 3
    model.set(5.0)
    ema.update(model)
    assert ema.module.w.item() == pytest.approx(4.6)  # (2/11) * 2.8 + (9/11) * 5
    ema.num_updates = 10_000
    assert ema.current_decay() == pytest.approx(0.999)


def test_buffers_are_copied_not_averaged() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    ema = ModelEMA(model, decay=0.9, warmup=False)
    model.train()
    model(torch.randn(4, 1, 3, 3) * 5 + 2)
    ema.update(model)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert torch.equal(ema.module[1].running_var, model[1].running_var)
    assert ema.module[1].num_batches_tracked.item() == 1
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_apply_to_swaps_in_ema_weights_and_restores_raw_ones() -> None:
    model = _OneParam(1.0)
    ema = ModelEMA(model, decay=0.5, warmup=False)
    model.set(3.0)
    ema.update(model)  # ema = 2
    with ema.apply_to(model) as swapped:
        assert swapped is model
        assert model.w.item() == pytest.approx(2.0)
    assert model.w.item() == pytest.approx(3.0)
    with pytest.raises(RuntimeError, match="boom"), ema.apply_to(model):
        raise RuntimeError("boom")
    assert model.w.item() == pytest.approx(3.0)


def test_state_dict_round_trip_and_validation() -> None:
    model = _OneParam(1.0)
    ema = ModelEMA(model, decay=0.5, warmup=False)
    model.set(3.0)
    ema.update(model)
    restored = ModelEMA(_OneParam(0.0), decay=0.5, warmup=False)
    restored.load_state_dict(ema.state_dict())
    assert restored.module.w.item() == pytest.approx(2.0)
    assert restored.num_updates == 1
    with pytest.raises(ValueError, match=r"decay=1\.0"):
        ModelEMA(model, decay=1.0)
