"""Tests for seg_pipeline.inference.folding: BatchNorm folded into convolutions, outputs unchanged."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn

from seg_pipeline.data.normalization import BandStats
from seg_pipeline.inference.folding import fold_batchnorm
from seg_pipeline.inference.predict import LoadedModel, build_predictor
from seg_pipeline.settings import PredictSettings


def _trained_statistics(model: nn.Module) -> nn.Module:
    """Running statistics away from (0, 1), as after training: folding them must change weights."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("architecture", ["Unet", "FPN", "DeepLabV3Plus", "PAN"])
def test_every_batchnorm_of_an_smp_model_is_folded_and_the_logits_stay_the_same(architecture: str) -> None:
    # FPN, DeepLabV3+ and PAN cannot be traced whole (a Python `if` on the input shape): their
    # encoder and decoder are folded one child at a time. PAN needs a 256 px check input.
    model = _trained_statistics(getattr(smp, architecture)("resnet18", encoder_weights=None, classes=3))
    before = {name: p.clone() for name, p in model.state_dict().items()}
    result = fold_batchnorm(model)
    assert result.folded == result.batchnorms == _batchnorms(model) > 0
    assert _batchnorms(result.model) == 0
    assert result.note == f"batchnorm folded {result.folded}/{result.batchnorms}"
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        reference = model(x)  # float rounding differs: allow 1e-4 of the logits' range
        atol = 1e-4 * (1.0 + float(reference.abs().max()))
        torch.testing.assert_close(result.model(x), reference, rtol=1e-4, atol=atol)
    # The loaded model is untouched: the checkpoint's own weights still describe it.
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    assert type(result.model.encoder) is type(model.encoder)  # modules keep their class and attributes


class Untraceable(nn.Module):
    """conv -> bn behind data-dependent control flow, which fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return y if float(x.mean()) > -100 else -y


class SharedConv(nn.Module):
    """One convolution feeding a BatchNorm and also the output: folding it would change the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_a_model_fx_cannot_trace_and_whose_children_hold_no_pair_runs_as_loaded() -> None:
    model = _trained_statistics(Untraceable())
    result = fold_batchnorm(model)
    assert result.model is model and result.folded == 0
    assert result.note == "no BatchNorm of 1 could be folded"


def test_a_convolution_whose_output_is_also_used_elsewhere_is_not_folded() -> None:
    model = _trained_statistics(SharedConv())
    result = fold_batchnorm(model)
    assert result.model is model and result.folded == 0


def test_a_model_without_batchnorm_is_returned_as_it_is() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 1))
    result = fold_batchnorm(model)
    assert result.model is model and result.note == ""


def test_the_predictor_folds_by_default_says_so_and_predicts_what_the_loaded_model_predicts() -> None:
    torch.manual_seed(0)
    net = _trained_statistics(smp.Unet("resnet18", encoder_weights=None, classes=2))
    member = LoadedModel("m", net, ("background", "building"), BandStats((0.0,) * 3, (1.0,) * 3), "test")
    x = torch.randn(1, 3, 64, 64)
    fast = {"tta": {"scales": [1.0], "flips": ["none", "h"]}, "bf16": False}
    plain = build_predictor([member], PredictSettings.parse({**fast, "fold_batchnorm": False}))
    folded = build_predictor([member], PredictSettings.parse(fast))
    assert "batchnorm folded" in folded.precision and "batchnorm" not in plain.precision
    assert _batchnorms(folded.models[0]) == 0 and _batchnorms(plain.models[0]) > 0
    torch.testing.assert_close(
        folded.predict_probabilities(x), plain.predict_probabilities(x), atol=1e-4, rtol=0
    )
