"""Tests for parameter groups, optimizers and LR schedules (hand-computed references)."""

from __future__ import annotations

import math

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from seg_pipeline.settings import OptimizerSettings, SettingsError
from seg_pipeline.training.optim import (
    build_optimizer,
    build_scheduler,
    encoder_stages,
    param_groups,
    scheduler_interval,
)


def _unet() -> nn.Module:
    return smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=6)


def _names_by_group(model: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {name_of[id(p)] for p in g["params"]} for g in groups}


def test_no_decay_groups_hold_exactly_biases_and_norm_params_of_unet() -> None:
    model = _unet()
    groups = param_groups(model, weight_decay=0.05)
    names = _names_by_group(model, groups)
    # Hand count: resnet18 has 20 BatchNorms (stem 1 + 8 blocks x 2 + 3 downsample) and no conv biases.
    assert len(names["encoder_no_decay"]) == 40
    assert all(
        ".bn" in n or ".downsample.1." in n or n.startswith("encoder.bn1") for n in names["encoder_no_decay"]
    )
    # Unet decoder: 5 blocks x 2 Conv-BN-ReLU (BN params, conv without bias) + segmentation head bias.
    assert len(names["decoder_no_decay"]) == 21
    assert "segmentation_head.0.bias" in names["decoder_no_decay"]
    assert "segmentation_head.0.weight" in names["decoder_decay"]
    # Every decayed parameter is a conv weight (4-D); nothing is lost or duplicated.
    params = dict(model.named_parameters())
    assert all(params[n].ndim == 4 for n in names["encoder_decay"] | names["decoder_decay"])
    assert sum(len(v) for v in names.values()) == len(params)
    wd = {g["name"]: g["weight_decay"] for g in groups}
    assert wd == {
        "encoder_decay": 0.05,
        "encoder_no_decay": 0.0,
        "decoder_decay": 0.05,
        "decoder_no_decay": 0.0,
    }


class _MixedNet(nn.Module):
    """LayerNorm with a 2-D weight must be detected by module type, a bare 1-D scale by ndim."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm((4, 4))
        self.group_norm = nn.GroupNorm(2, 4)
        self.linear = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(2))


def test_norm_layers_detected_by_type_and_one_dim_params_by_shape() -> None:
    model = _MixedNet()
    assert model.norm.weight.ndim == 2
    names = _names_by_group(model, param_groups(model, weight_decay=0.1))
    assert names["decoder_no_decay"] == {
        "conv.bias",
        "norm.weight",
        "norm.bias",
        "group_norm.weight",
        "group_norm.bias",
        "linear.bias",
        "scale",
    }
    assert names["decoder_decay"] == {"conv.weight", "linear.weight"}


def test_encoder_and_decoder_lr_multipliers() -> None:
    model = _unet()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01, encoder_lr_mult=0.1, decoder_lr_mult=2.0)
    assert isinstance(optimizer, torch.optim.AdamW)
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    for group in optimizer.param_groups:
        in_encoder = {id(p) in encoder_ids for p in group["params"]}
        assert len(in_encoder) == 1
        expected_lr = 1e-4 if in_encoder.pop() else 2e-3
        assert group["lr"] == pytest.approx(expected_lr)


def test_encoder_found_through_net_wrapper_and_missing_encoder_is_an_error() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _unet()

    wrapped = Wrapper()
    groups = param_groups(wrapped, 0.01, encoder_lr_mult=0.5)
    encoder_count = sum(len(g["params"]) for g in groups if g["name"].startswith("encoder"))
    assert encoder_count == len(list(wrapped.net.encoder.parameters()))
    with pytest.raises(ValueError, match="encoder_lr_mult"):
        param_groups(nn.Linear(2, 2), 0.01, encoder_lr_mult=0.5)


def _lr_of_each_param(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}


def test_defaults_keep_the_four_groups_so_older_optimizer_states_still_load() -> None:
    names = [g["name"] for g in param_groups(_unet(), 0.01, layer_decay=None, head_lr_mult=1.0)]
    assert names == ["encoder_decay", "encoder_no_decay", "decoder_decay", "decoder_no_decay"]


def test_layer_decay_and_head_multiplier_set_the_lr_of_every_unet_stage() -> None:
    model = _unet()
    plain = _lr_of_each_param(
        model, build_optimizer(model, lr=1e-3, encoder_lr_mult=0.5, decoder_lr_mult=2.0)
    )
    optimizer = build_optimizer(
        model, lr=1e-3, encoder_lr_mult=0.5, decoder_lr_mult=2.0, layer_decay=0.8, head_lr_mult=10.0
    )
    lrs = _lr_of_each_param(model, optimizer)
    assert set(lrs) == {n for n, _ in model.named_parameters()}  # each parameter in exactly one group
    # resnet18: stem (conv1, bn1), layer1..layer4; the deepest keeps lr x encoder_lr_mult.
    prefixes = ["encoder.conv1.", "encoder.layer1.", "encoder.layer2.", "encoder.layer3.", "encoder.layer4."]
    stage_lrs = []
    for depth, prefix in enumerate(prefixes):
        expected = 1e-3 * 0.5 * 0.8 ** (4 - depth)
        stage = {lr for name, lr in lrs.items() if name.startswith(prefix)}
        assert len(stage) == 1 and stage.pop() == pytest.approx(expected), prefix
        stage_lrs.append(expected)
    assert lrs["encoder.bn1.weight"] == pytest.approx(stage_lrs[0])
    assert stage_lrs == sorted(stage_lrs) and len(set(stage_lrs)) == 5  # strictly increasing with depth
    for name, lr in lrs.items():
        if name.startswith("segmentation_head."):
            assert lr == pytest.approx(1e-3 * 2.0 * 10.0)  # head = lr x decoder_lr_mult x head_lr_mult
        elif name.startswith("decoder."):
            assert lr == pytest.approx(2e-3) == plain[name]
    assert plain["encoder.conv1.weight"] == plain["encoder.layer4.0.conv1.weight"] == pytest.approx(5e-4)
    # The no-decay rule and the lr_mult key hold in the new groups too.
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_mult"])
        wants_decay = group["name"].endswith("_decay") and not group["name"].endswith("_no_decay")
        assert group["weight_decay"] == (1e-2 if wants_decay else 0.0)
        assert all(p.ndim == 4 for p in group["params"]) == wants_decay
    names = [g["name"] for g in optimizer.param_groups]
    assert names[:2] == ["encoder_stage0_decay", "encoder_stage0_no_decay"] and names[-1] == "head_no_decay"


def test_scheduler_keeps_the_layer_decay_ratios() -> None:
    model = _unet()
    optimizer = build_optimizer(model, name="sgd", lr=1.0, weight_decay=0.0, layer_decay=0.5)
    scheduler = build_scheduler(optimizer, "cosine", epochs=2, steps_per_epoch=2, warmup_epochs=1)
    optimizer.step()
    scheduler.step()
    assert {round(g["lr"] / g["lr_mult"], 6) for g in optimizer.param_groups} == {round(2 / 3, 6)}
    assert sorted({g["lr_mult"] for g in optimizer.param_groups}) == [0.0625, 0.125, 0.25, 0.5, 1.0]


@pytest.mark.parametrize(
    ("encoder", "count", "first", "last"),
    [
        ("resnet18", 5, "conv1.weight", "layer4.1.bn2.bias"),
        ("mobilenet_v2", 5, "features.0.0.weight", "features.18.1.bias"),
        ("efficientnet-b0", 5, "_conv_stem.weight", "_bn1.bias"),  # unused _conv_head: deepest stage
        pytest.param(
            "timm-efficientnet-b0",
            5,
            "conv_stem.weight",
            "bn2.bias",
            marks=pytest.mark.filterwarnings("ignore:`timm-` encoders are deprecated"),
        ),
        ("tu-resnet18", 5, "model.conv1.weight", "model.layer4.1.bn2.bias"),
    ],
)
def test_encoder_stages_follow_the_feature_strides(encoder: str, count: int, first: str, last: str) -> None:
    module = smp.encoders.get_encoder(encoder, weights=None)
    stages = encoder_stages(module)
    name_of = {id(p): n for n, p in module.named_parameters()}
    assert len(stages) == count
    assert (name_of[id(stages[0][0])], name_of[id(stages[-1][-1])]) == (first, last)
    assert sorted(name_of[id(p)] for stage in stages for p in stage) == sorted(name_of.values())


def test_bad_layer_decay_and_head_multiplier_are_rejected() -> None:
    for field, value in [("layer_decay", 0.0), ("layer_decay", 1.5), ("head_lr_mult", 0.0)]:
        with pytest.raises(SettingsError, match=f"optimizer.{field}="):
            OptimizerSettings.parse({field: value}, "optimizer")
    settings = OptimizerSettings.parse({"layer_decay": 0.8, "head_lr_mult": 5.0}, "optimizer")
    assert (settings.layer_decay, settings.head_lr_mult) == (0.8, 5.0)
    assert (OptimizerSettings().layer_decay, OptimizerSettings().head_lr_mult) == (None, 1.0)
    with pytest.raises(ValueError, match=r"layer_decay=1\.5"):
        build_optimizer(_unet(), layer_decay=1.5)
    with pytest.raises(ValueError, match=r"layer_decay=0\.8 but Linear has no `\.encoder`"):
        build_optimizer(nn.Linear(2, 2), layer_decay=0.8)
    with pytest.raises(ValueError, match=r"head_lr_mult=2\.0 but Linear has no `\.segmentation_head`"):
        build_optimizer(nn.Linear(2, 2), head_lr_mult=2.0)


def _lrs_over_steps(scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_cosine_with_linear_warmup_hand_checked() -> None:
    model = nn.Linear(1, 1)
    optimizer = build_optimizer(model, name="sgd", lr=1.0, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, "cosine", epochs=3, steps_per_epoch=4, warmup_epochs=1, min_lr=0.1)
    lrs = _lrs_over_steps(scheduler, optimizer, 12)
    # warmup (k+1)/(4+1) for k < 4, then 0.1 + 0.9 * 0.5 * (1 + cos(pi * (k-4)/8))
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[6] == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))
    assert lrs[8] == pytest.approx(0.55)
    assert lrs[12] == pytest.approx(0.1)
    assert scheduler_interval(scheduler) == "step"


def test_cosine_keeps_group_multipliers() -> None:
    model = _MixedNet()
    model.encoder = nn.Conv2d(1, 1, 1)  # type: ignore[assignment]  # gives the model an "encoder"
    optimizer = build_optimizer(model, lr=1.0, weight_decay=0.0, encoder_lr_mult=0.5)
    scheduler = build_scheduler(optimizer, "cosine", epochs=2, steps_per_epoch=2, warmup_epochs=1)
    ratios = {round(g["lr"] / g["lr_mult"], 6) for g in optimizer.param_groups}
    assert ratios == {round(1 / 3, 6)}
    optimizer.step()
    scheduler.step()
    assert {round(g["lr"] / g["lr_mult"], 6) for g in optimizer.param_groups} == {round(2 / 3, 6)}


def test_step_scheduler_decays_per_epoch_and_plateau_on_metric() -> None:
    model = nn.Linear(1, 1)
    optimizer = build_optimizer(model, name="sgd", lr=1.0, weight_decay=0.0)
    step = build_scheduler(optimizer, "step", epochs=3, steps_per_epoch=2, step_size=1, gamma=0.5)
    assert _lrs_over_steps(step, optimizer, 5) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])

    optimizer = build_optimizer(model, name="sgd", lr=1.0, weight_decay=0.0)
    plateau = build_scheduler(optimizer, "plateau", epochs=10, plateau_factor=0.5, plateau_patience=1)
    assert scheduler_interval(plateau) == "epoch"
    for metric in (0.5, 0.4, 0.4):  # best 0.5 then two bad epochs > patience 1
        plateau.step(metric)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    assert build_scheduler(optimizer, "none") is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": 0.0}, "lr="),
        ({"lr": -1e-3}, "lr="),
        ({"weight_decay": -0.1}, "weight_decay="),
        ({"name": "lamb"}, "name="),
        ({"encoder_lr_mult": 0.0}, "encoder_lr_mult="),
        ({"head_lr_mult": 0.0}, "head_lr_mult="),
        ({"layer_decay": -0.5}, "layer_decay="),
    ],
)
def test_build_optimizer_rejects_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_optimizer(nn.Linear(2, 2), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "cosinus"}, "name="),
        ({"epochs": 0}, "epochs="),
        ({"steps_per_epoch": 0}, "steps_per_epoch="),
        ({"warmup_epochs": 5, "epochs": 5}, "warmup_epochs="),
        ({"min_lr": 1.0}, "min_lr="),
        ({"name": "plateau", "warmup_epochs": 1}, "warmup_epochs="),
        ({"name": "plateau", "plateau_mode": "up"}, "plateau_mode="),
    ],
)
def test_build_scheduler_rejects_bad_values(kwargs: dict, field: str) -> None:
    optimizer = build_optimizer(nn.Linear(2, 2), lr=0.1)
    arguments = {"name": "cosine", "epochs": 5, "steps_per_epoch": 2, **kwargs}
    with pytest.raises(ValueError, match=field):
        build_scheduler(optimizer, **arguments)
