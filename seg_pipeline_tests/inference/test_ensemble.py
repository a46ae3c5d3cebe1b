"""Tests for seg_pipeline.inference.ensemble.EnsemblePredictor."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn

from seg_pipeline.inference.ensemble import EnsemblePredictor, resolve_device
from seg_pipeline.inference.tta import TTAConfig


class ConstantLogits(nn.Module):
    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1, *x.shape[-2:]).clone()


class CountingModel(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.model(x)


def test_seed_ensemble_runs_18_views_and_averages_probabilities() -> None:
    # Model A gives class 0 p = 1/(1+e^-4) everywhere, model B the same for class 1: the mean is 0.5.
    first, second = CountingModel(ConstantLogits([4.0, 0.0])), CountingModel(ConstantLogits([0.0, 4.0]))
    predictor = EnsemblePredictor([first, second], TTAConfig())
    probabilities = predictor.predict_probabilities(torch.zeros(1, 3, 32, 32))
    assert predictor.forward_views == 18
    assert first.calls == 9 and second.calls == 9
    assert torch.allclose(probabilities, torch.full_like(probabilities, 0.5), atol=1e-6)


def test_predict_returns_argmax_classes() -> None:
    predictor = EnsemblePredictor([ConstantLogits([0.0, 1.0, 3.0]), ConstantLogits([0.0, 2.5, 1.0])])
    classes = predictor.predict(torch.zeros(2, 3, 8, 8))
    # softmax: A = (0.042, 0.114, 0.844), B = (0.063, 0.766, 0.171); means 0.052, 0.440, 0.507 -> class 2
    assert classes.shape == (2, 8, 8) and classes.dtype == torch.int64
    assert torch.all(classes == 2)


def test_models_are_put_in_eval_mode_and_channels_last() -> None:
    model = smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=2)
    model.train()
    predictor = EnsemblePredictor([model], TTAConfig(scales=(1.0,), flips=("none",), channels_last=True))
    assert not model.training
    assert model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    probabilities = predictor(torch.rand(1, 3, 40, 40, dtype=torch.float64))  # cast to float32 inside
    assert probabilities.shape == (1, 2, 40, 40) and probabilities.dtype == torch.float32


def test_resolve_device_and_bad_arguments() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu:7")
    with pytest.raises(ValueError, match="at least one model"):
        EnsemblePredictor([])
    with pytest.raises(ValueError, match=r"models\[1\]"):
        EnsemblePredictor([ConstantLogits([0.0]), "model.ckpt"])  # type: ignore[list-item]


def test_inference_precision_follows_the_cpu_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from seg_pipeline.inference import ensemble

    cpu = torch.device("cpu")
    monkeypatch.setattr(ensemble, "cpu_bf16_is_fast", lambda: True)
    assert ensemble.inference_dtype(cpu, None) == (torch.bfloat16, "bf16 chosen: CPU has amx_bf16")
    assert ensemble.inference_dtype(cpu, False)[0] is None
    monkeypatch.setattr(ensemble, "cpu_bf16_is_fast", lambda: False)
    assert ensemble.inference_dtype(cpu, None) == (None, "fp32 chosen: no amx_bf16 on this CPU")
    assert ensemble.inference_dtype(cpu, True)[0] is torch.bfloat16


def test_inference_is_channels_last_on_cpu_and_cuda_unless_set() -> None:
    from seg_pipeline.inference.ensemble import inference_channels_last

    assert inference_channels_last(torch.device("cpu"), None) is True
    assert inference_channels_last(torch.device("cuda"), None) is True
    assert inference_channels_last(torch.device("mps"), None) is False
    assert inference_channels_last(torch.device("cpu"), False) is False


def test_channels_last_predictions_equal_contiguous_ones() -> None:
    import segmentation_models_pytorch as smp

    from seg_pipeline.inference.tta import TTAConfig

    torch.manual_seed(0)
    net = smp.Unet("resnet18", encoder_weights=None, classes=3)
    x = torch.rand(1, 3, 64, 96)
    plain = EnsemblePredictor([net], TTAConfig(channels_last=False)).predict_probabilities(x)
    nhwc = EnsemblePredictor([net], TTAConfig(channels_last=True)).predict_probabilities(x)
    torch.testing.assert_close(nhwc, plain, atol=1e-4, rtol=1e-4)


def test_a_predictor_describes_its_precision_and_why() -> None:
    from seg_pipeline.inference.tta import TTAConfig

    model = ConstantLogits([0.0, 1.0])
    fp32 = EnsemblePredictor([model], TTAConfig(channels_last=False), precision_reason="bf16=False set")
    assert fp32.precision == "cpu fp32 contiguous (bf16=False set)"
    bf16 = EnsemblePredictor([model], TTAConfig(amp_dtype=torch.bfloat16, channels_last=True))
    assert bf16.precision == "cpu bf16-autocast channels_last"
