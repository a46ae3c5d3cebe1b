"""Tests for seg_pipeline.inference.tta: config validation, invertibility, merge modes, pass counts."""

from __future__ import annotations

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn

from seg_pipeline.inference.tta import (
    DIHEDRAL_TRANSFORMS,
    TTAConfig,
    apply_transform,
    invert_transform,
    tta_predict,
)


def pointwise_conv(in_channels: int = 3, classes: int = 4, seed: int = 0) -> nn.Module:
    """A 1x1 convolution with fixed random weights: its output at a pixel depends on that pixel only."""
    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(in_channels, classes, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
    return conv.eval()


class ColumnRamp(nn.Module):
    """Ignores the image: class-0 logit = column index, class-1 logit = 0 (position dependent)."""

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        ramp = torch.arange(width, dtype=x.dtype).expand(batch, 1, height, width)
        return torch.cat([ramp, torch.zeros_like(ramp)], dim=1)


class ConstantLogits(nn.Module):
    """Same logits at every pixel, whatever the input size."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1, *x.shape[-2:]).clone()


class CountingModel(nn.Module):
    """Wraps a model and records the batch size of every forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.batch_sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.model(x)


def test_defaults_match_the_seed() -> None:
    config = TTAConfig()
    assert config.scales == (0.75, 1.0, 1.25)
    assert config.transforms == ("none", "h", "v")
    assert config.views_per_model == 9


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scales": (1.0, 0.0)}, "scales"),
        ({"scales": (-0.5,)}, "scales"),
        ({"scales": (float("nan"),)}, "scales"),
        ({"scales": ()}, "scales"),
        ({"flips": ("none", "diagonal")}, "flips"),
        ({"flips": ()}, "flips"),
        ({"merge": "median"}, "merge"),
        ({"pad_multiple": 0}, "pad_multiple"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TTAConfig(**kwargs)


def test_d4_expands_to_eight_distinct_transforms_without_duplicates() -> None:
    config = TTAConfig(flips=("h", "d4", "hv"))
    assert len(config.transforms) == 8
    assert set(config.transforms) == set(DIHEDRAL_TRANSFORMS)
    assert config.transforms[0] == "h"


@pytest.mark.parametrize("name", DIHEDRAL_TRANSFORMS)
def test_every_transform_is_inverted_exactly(name: str) -> None:
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)
    assert torch.equal(invert_transform(apply_transform(x, name), name), x)


def test_transforms_match_numpy_reference() -> None:
    image = np.arange(12).reshape(3, 4)
    x = torch.from_numpy(image).view(1, 1, 3, 4)
    expected = {
        "h": image[:, ::-1],
        "v": image[::-1, :],
        "rot90": np.rot90(image, 1),
        "rot180": np.rot90(image, 2),
        "rot270": np.rot90(image, 3),
        "transpose": image.T,
        "antitranspose": image[::-1, ::-1].T,
    }
    for name, reference in expected.items():
        assert np.array_equal(apply_transform(x, name)[0, 0].numpy(), reference), name


@pytest.mark.parametrize("batch_augmentations", [False, True])
def test_flips_and_rotations_leave_a_pointwise_model_unchanged(batch_augmentations: bool) -> None:
    model = pointwise_conv()
    x = torch.randn(2, 3, 20, 27, generator=torch.Generator().manual_seed(1))  # non-square, not /32
    config = TTAConfig(scales=(1.0,), flips=("d4",), batch_augmentations=batch_augmentations)
    expected = model(x).softmax(dim=1)
    assert torch.allclose(tta_predict([model], x, config), expected, atol=1e-6)


def test_scales_leave_a_constant_model_unchanged() -> None:
    model = ConstantLogits([0.5, -1.0, 2.0])
    x = torch.randn(1, 3, 33, 50)
    probabilities = tta_predict([model], x, TTAConfig(scales=(0.5, 0.75, 1.0, 1.25, 2.0)))
    expected = torch.tensor([0.5, -1.0, 2.0]).softmax(dim=0).view(1, 3, 1, 1).expand_as(probabilities)
    assert torch.allclose(probabilities, expected, atol=1e-6)


def test_scales_leave_a_pointwise_model_on_a_flat_image_unchanged() -> None:
    model = pointwise_conv()
    x = torch.tensor([0.3, -1.2, 0.8]).view(1, 3, 1, 1).expand(1, 3, 40, 24).contiguous()
    expected = model(x).softmax(dim=1)
    assert torch.allclose(tta_predict([model], x, TTAConfig()), expected, atol=1e-6)


def test_horizontal_flip_is_undone_on_a_position_dependent_model() -> None:
    # Hand-computed: without TTA p0(col) = sigmoid(col); the h view's output, flipped back, is
    # sigmoid(W-1-col). mean_prob averages the two probabilities.
    width = 6
    x = torch.zeros(1, 3, 4, width)
    probabilities = tta_predict(
        [ColumnRamp()], x, TTAConfig(scales=(1.0,), flips=("none", "h"), pad_multiple=1)
    )
    cols = np.arange(width)
    sigmoid = 1 / (1 + np.exp(-cols.astype(np.float64)))
    expected = (sigmoid + sigmoid[::-1]) / 2
    assert np.allclose(probabilities[0, 0].numpy(), np.broadcast_to(expected, (4, width)), atol=1e-6)


def test_mean_logit_is_softmax_of_the_mean_logit() -> None:
    # Logits (col, 0) and (W-1-col, 0) average to ((W-1)/2, 0) everywhere.
    width = 6
    x = torch.zeros(1, 3, 4, width)
    config = TTAConfig(scales=(1.0,), flips=("none", "h"), merge="mean_logit", pad_multiple=1)
    probabilities = tta_predict([ColumnRamp()], x, config)
    expected = 1 / (1 + np.exp(-(width - 1) / 2))
    assert np.allclose(probabilities[0, 0].numpy(), expected, atol=1e-6)
    assert np.allclose(probabilities.sum(dim=1).numpy(), 1.0, atol=1e-6)


def test_models_are_averaged_with_equal_weight() -> None:
    first, second = ConstantLogits([0.0, 0.0]), ConstantLogits([2.0, 0.0])
    probabilities = tta_predict([first, second], torch.zeros(1, 1, 8, 8), TTAConfig(scales=(1.0, 0.5)))
    expected = (0.5 + 1 / (1 + np.exp(-2.0))) / 2
    assert np.allclose(probabilities[0, 0].numpy(), expected, atol=1e-6)


def test_forward_passes_equal_models_times_scales_times_flips() -> None:
    models = [CountingModel(pointwise_conv(seed=s)) for s in (0, 1)]
    x = torch.randn(3, 3, 32, 32)
    tta_predict(models, x, TTAConfig(batch_augmentations=False))
    for model in models:
        assert model.batch_sizes == [3] * 9  # 3 scales x 3 flips, one batch of 3 images each


def test_batched_augmentations_run_one_pass_per_scale_and_shape() -> None:
    model = CountingModel(pointwise_conv())
    x = torch.randn(2, 3, 32, 48)  # rot90 views of a non-square image cannot share a batch with "none"
    tta_predict(
        [model], x, TTAConfig(scales=(1.0, 0.5), flips=("none", "h", "v", "rot90"), batch_augmentations=True)
    )
    assert sorted(model.batch_sizes) == [2, 2, 6, 6]


def test_batched_and_sequential_agree_on_a_real_unet() -> None:
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=3).eval()
    x = torch.randn(1, 3, 45, 61)  # padded to 64x64 inside, scaled sizes 34x46 and 56x76
    sequential = tta_predict([model], x, TTAConfig(batch_augmentations=False))
    batched = tta_predict([model], x, TTAConfig(batch_augmentations=True))
    assert sequential.shape == (1, 3, 45, 61)
    assert torch.allclose(sequential.sum(dim=1), torch.ones(1, 45, 61), atol=1e-5)
    assert torch.allclose(sequential, batched, atol=1e-5)


def test_bf16_autocast_and_channels_last_stay_close_to_fp32() -> None:
    model = pointwise_conv()
    x = torch.randn(1, 3, 16, 16)
    reference = tta_predict([model], x, TTAConfig())
    fast = tta_predict(
        [model.to(memory_format=torch.channels_last)],
        x,
        TTAConfig(amp_dtype=torch.bfloat16, channels_last=True),
    )
    assert fast.dtype == torch.float32
    assert torch.allclose(fast, reference, atol=0.05)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="no models"):
        tta_predict([], torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="float tensor"):
        tta_predict([pointwise_conv()], torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="float tensor"):
        tta_predict([pointwise_conv()], torch.zeros(3, 8, 8))
    downsampling = nn.Conv2d(3, 2, kernel_size=2, stride=2)
    with pytest.raises(ValueError, match="output size"):
        tta_predict([downsampling], torch.zeros(1, 3, 8, 8), TTAConfig(pad_multiple=1))
