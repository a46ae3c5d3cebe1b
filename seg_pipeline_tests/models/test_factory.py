"""Tests for the SMP model factory and the SegmentationModel wrapper (F10 in docs/architecture.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from seg_pipeline.models import (
    ARCHITECTURES,
    ModelSpec,
    SegmentationModel,
    build_model,
    count_parameters,
)

EXPECTED_ARCHITECTURES = {
    "unet",
    "unetplusplus",
    "deeplabv3",
    "deeplabv3plus",
    "fpn",
    "pspnet",
    "linknet",
    "manet",
    "pan",
    "upernet",
    "segformer",
}


def _tiny_spec(architecture: str = "unet", **overrides: object) -> ModelSpec:
    values: dict[str, object] = {"architecture": architecture, "encoder": "resnet18", "num_classes": 3}
    values.update(overrides)
    return ModelSpec(**values)  # type: ignore[arg-type]


def _fast_spec(**overrides: object) -> ModelSpec:
    """A shallow, narrow U-Net so tests that run many forwards stay quick on 2 CPU cores."""
    arch_kwargs = {"encoder_depth": 3, "decoder_channels": [16, 8, 4]}
    return _tiny_spec("unet", arch_kwargs=arch_kwargs, **overrides)


def _identity_logits_model(num_classes: int = 3, **spec_overrides: object) -> SegmentationModel:
    """A model whose logits are its input: a bias-free 1x1 conv with identity weights."""
    conv = nn.Conv2d(num_classes, num_classes, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(num_classes).view(num_classes, num_classes, 1, 1))
    spec = ModelSpec(
        architecture="unet",
        encoder="resnet18",
        in_channels=num_classes,
        num_classes=num_classes,
        **spec_overrides,
    )  # type: ignore[arg-type]
    return SegmentationModel(spec, net=conv, pad_multiple=1)


def test_registry_holds_every_expected_architecture() -> None:
    assert set(ARCHITECTURES) == EXPECTED_ARCHITECTURES


@pytest.mark.parametrize("architecture", sorted(EXPECTED_ARCHITECTURES))
def test_every_architecture_builds_and_runs_forward(architecture: str) -> None:
    torch.manual_seed(0)
    model = build_model(_tiny_spec(architecture)).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 3, 64, 64)
    assert torch.isfinite(logits).all()


def test_seven_band_input_adapts_first_conv() -> None:
    model = build_model(_fast_spec(in_channels=7, num_classes=2)).eval()
    assert model.net.encoder.conv1.weight.shape[1] == 7
    with torch.no_grad():
        logits = model(torch.randn(2, 7, 32, 32))
    assert logits.shape == (2, 2, 32, 32)


@pytest.mark.parametrize("architecture", ["unet", "fpn", "deeplabv3plus", "pspnet", "segformer", "pan"])
def test_odd_input_size_gives_logits_of_the_same_size(architecture: str) -> None:
    model = build_model(_tiny_spec(architecture)).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 70, 45))
    assert logits.shape == (1, 3, 70, 45)


def test_tiny_input_smaller_than_the_pad_falls_back_to_replicate() -> None:
    model = build_model(_tiny_spec("fpn")).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 5, 7))
    assert logits.shape == (1, 3, 5, 7)


def test_padding_and_crop_keep_pixels_aligned() -> None:
    # A pointwise network makes the reference trivial: cropped output must equal conv(x) exactly.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, kernel_size=1)
    spec = ModelSpec(encoder="resnet18", in_channels=3, num_classes=2)
    model = SegmentationModel(spec, net=conv, pad_multiple=32).eval()
    x = torch.randn(1, 3, 70, 45)
    with torch.no_grad():
        assert torch.allclose(model(x), conv(x), atol=1e-6)


def test_predict_methods_shapes_dtypes_and_ranges() -> None:
    torch.manual_seed(0)
    model = build_model(_fast_spec(num_classes=3))
    x = torch.randn(2, 3, 32, 32)
    probabilities = model.predict_probabilities(x)
    assert probabilities.shape == (2, 3, 32, 32)
    assert not probabilities.requires_grad
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(2, 32, 32), atol=1e-5)
    classes = model.predict_segmentation(x)
    assert classes.shape == (2, 32, 32) and classes.dtype == torch.int64
    assert classes.min() >= 0 and classes.max() < 3
    detection = model.predict_detection(x)
    assert detection.shape == (2,) and detection.dtype == torch.bool
    confidence = model.predict_confidence(x)
    assert confidence.shape == (2,) and ((confidence >= 0) & (confidence <= 1)).all()
    fraction = model.predict_fraction(x)
    assert fraction.shape == (2,) and ((fraction >= 0) & (fraction <= 1)).all()
    assert torch.equal(detection, fraction > 0)


def test_predict_restores_the_modes_it_found() -> None:
    model = build_model(_fast_spec())
    model.train()
    frozen_norm = model.net.encoder.bn1
    frozen_norm.eval()  # e.g. BatchNorm frozen during finetuning
    model.predict_segmentation(torch.randn(1, 3, 32, 32))
    assert model.training and model.net.decoder.training
    assert not frozen_norm.training
    model.eval()
    model.predict_probabilities(torch.randn(1, 3, 32, 32))
    assert not model.training


def test_detection_confidence_fraction_on_hand_built_logits() -> None:
    model = _identity_logits_model(num_classes=3)  # positives default to classes 1 and 2
    x = torch.zeros(2, 3, 4, 4)
    x[:, 0] = 5.0  # every pixel background with logits (5, 0, 0)
    x[1, :, 2, 3] = torch.tensor([0.0, 0.0, 5.0])  # one class-2 pixel in the second patch
    assert model.predict_detection(x).tolist() == [False, True]
    assert model.predict_detection(x, min_pixels=2).tolist() == [False, False]
    assert torch.allclose(model.predict_fraction(x), torch.tensor([0.0, 1.0 / 16.0]))
    background_pixel_positive = 2.0 / (math.exp(5.0) + 2.0)  # p1 + p2 for logits (5, 0, 0)
    class2_pixel_positive = (1.0 + math.exp(5.0)) / (math.exp(5.0) + 2.0)  # p1 + p2 for (0, 0, 5)
    expected = torch.tensor([background_pixel_positive, class2_pixel_positive])
    assert torch.allclose(model.predict_confidence(x), expected, atol=1e-6)


def test_detection_uses_the_configured_positive_classes() -> None:
    model = _identity_logits_model(num_classes=3, positive_classes=(2,))
    x = torch.zeros(1, 3, 2, 2)
    x[0, 1] = 5.0  # all pixels class 1, which is not positive here
    assert model.predict_detection(x).tolist() == [False]
    x[0, 2, 0, 0] = 9.0
    assert model.predict_detection(x).tolist() == [True]
    assert model.predict_fraction(x).tolist() == [0.25]


def test_unknown_architecture_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="architecture") as error:
        ModelSpec(architecture="unet3")
    assert "deeplabv3plus" in str(error.value)


def test_unknown_encoder_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="encoder") as error:
        ModelSpec(encoder="resnet19")
    assert "resnet18" in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"positive_classes": (3,)}, "positive_classes"),
    ],
)
def test_bad_spec_values_raise(overrides: dict[str, object], field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        _tiny_spec(**overrides)


@pytest.mark.parametrize(
    "arch_kwargs", [{"no_such_option": 1}, {"classes": 4}, {"aux_params": {"classes": 2}}]
)
def test_bad_arch_kwargs_raise_value_error(arch_kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="arch_kwargs"):
        _tiny_spec(arch_kwargs=arch_kwargs)


def test_arch_kwargs_reach_the_smp_class() -> None:
    model = build_model(_tiny_spec("deeplabv3plus", arch_kwargs={"encoder_output_stride": 8}))
    assert model.pad_multiple == 8
    assert model.net.encoder.output_stride == 8


def test_wrong_channel_count_raises() -> None:
    model = build_model(_fast_spec(in_channels=7))
    with pytest.raises(ValueError, match="7"):
        model(torch.randn(1, 3, 32, 32))


def test_spec_round_trips_through_json() -> None:
    spec = ModelSpec(
        architecture="DeepLabV3Plus",
        encoder="resnet18",
        in_channels=7,
        num_classes=5,
        positive_classes=(2, 3, 4),
        arch_kwargs={"decoder_channels": 64},
    )
    restored = ModelSpec.model_validate(json.loads(json.dumps(spec.model_dump())))
    assert restored == spec
    assert restored.architecture == "deeplabv3plus"
    assert restored.positive_classes == [2, 3, 4]
    assert build_model(restored).net.__class__.__name__ == "DeepLabV3Plus"


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="classes_count"):
        ModelSpec.model_validate({"architecture": "unet", "classes_count": 3})


def test_count_parameters_by_hand() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))  # (3*2 + 2) + (2*1 + 1) = 11
    assert count_parameters(model) == 11
    model[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 5
