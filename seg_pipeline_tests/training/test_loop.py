"""Tests for ``fit``: accumulation, clipping, EMA evaluation, checkpoints, early stopping, resume, logging."""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from seg_pipeline.hardware import cpu_bf16_is_fast
from seg_pipeline.models.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from seg_pipeline.settings import LoopSettings, SettingsError
from seg_pipeline.training.objectives import SupervisedObjective
from seg_pipeline.training.optim import build_optimizer, build_scheduler
from seg_pipeline.training.progress import ProgressLogger, format_duration
from seg_pipeline.training.trainer import FitResult, fit


class TinyNet(nn.Module):
    """Two convs, no BatchNorm: gradients do not depend on how the batch is split."""

    def __init__(self, classes: int = 3, norm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


def _data(count: int, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, size, size, generator=generator)
    masks = images.argmax(dim=1)  # learnable: the class is the brightest channel
    return images, masks


def _batches(count: int, batch_size: int, size: int = 8) -> list[dict[str, Any]]:
    images, masks = _data(count, size)
    return [
        {"image": images[i : i + batch_size], "mask": masks[i : i + batch_size], "item_id": [str(i)]}
        for i in range(0, count, batch_size)
    ]


def _config(**overrides: Any) -> LoopSettings:
    """fp32, no EMA/clipping, monitor the train loss: the bare loop unless a test turns things on."""
    settings: dict[str, Any] = {
        "epochs": 1,
        "device": "cpu",
        "amp": False,
        "ema_decay": None,
        "clip_grad_norm": None,
        "monitor": "train/loss",
        "mode": "min",
        "early_stopping_patience": None,
        "log_every_n_steps": 0,
        "save_every": 0,
    }
    settings.update(overrides)
    return LoopSettings(**settings)


def _fit_sgd(
    model: nn.Module, batches: list, tmp: Path, lr: float = 1.0, objective=None, **config: Any
) -> FitResult:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    objective = objective or SupervisedObjective(F.cross_entropy)
    return fit(model, objective, batches, None, None, optimizer, None, _config(**config), tmp, resume=False)


def _tiny_net(seed: int = 0, norm: bool = False) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(norm=norm)


def test_train_config_validation_names_the_field() -> None:
    for field, value in [
        ("epochs", 0),
        ("grad_accum_steps", 0),
        ("clip_grad_norm", -1.0),
        ("ema_decay", 1.0),
        ("mode", "maximum"),
        ("device", "tpu"),
        ("early_stopping_patience", 0),
        ("amp", "perhaps"),
    ]:
        with pytest.raises(SettingsError, match=f"loop.{field}="):
            LoopSettings.parse({field: value}, "loop")
    assert LoopSettings().epochs == 50


def test_supervised_objective_merges_loss_parts() -> None:
    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target)
        loss_fn.last_parts = {"ce": ce.detach(), "dice": 0.25}  # type: ignore[attr-defined]
        return ce

    batch = _batches(2, 2)[0]
    loss, parts = SupervisedObjective(loss_fn)(_tiny_net(), batch, 1)
    assert loss.requires_grad and set(parts) == {"ce", "dice"}
    assert not parts["ce"].requires_grad


def test_grad_accumulation_of_two_micro_batches_equals_one_batch(tmp_path: Path) -> None:
    accumulated, single = _tiny_net(), _tiny_net()
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    _fit_sgd(accumulated, _batches(4, 2), tmp_path / "a", grad_accum_steps=2)
    result = _fit_sgd(single, _batches(4, 4), tmp_path / "b", grad_accum_steps=1)
    assert result.history[0]["train/steps"] == 1
    for key, value in single.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[key], value, rtol=0, atol=1e-6)
        assert not torch.equal(value, initial[key])  # SGD with lr=1 really stepped


def test_epoch_end_flush_averages_the_leftover_micro_batches(tmp_path: Path) -> None:
    batches = _batches(6, 2)
    model = _tiny_net()
    _fit_sgd(model, batches, tmp_path, lr=0.1, grad_accum_steps=2)

    reference = _tiny_net()  # independent plain-autograd reference: step on (b1+b2)/2, then on b3
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for group in (batches[:2], batches[2:]):
        optimizer.zero_grad()
        loss = sum(F.cross_entropy(reference(b["image"]), b["mask"]) for b in group) / len(group)
        loss.backward()
        optimizer.step()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)


def test_data_wait_fraction_is_the_share_of_the_epoch_spent_waiting_for_batches(tmp_path: Path) -> None:
    def slow_loader() -> Iterator[dict[str, Any]]:
        for batch in _batches(4, 2):
            time.sleep(0.2)  # a loader far slower than the tiny model's step
            yield batch

    fast = _fit_sgd(_tiny_net(), _batches(4, 2), tmp_path / "fast")
    slow = _fit_sgd(_tiny_net(), _SizedIterable(slow_loader), tmp_path / "slow")
    assert 0.0 <= fast.history[0]["train/data_wait_fraction"] < 0.5  # batches already in memory
    assert slow.history[0]["train/data_wait_fraction"] > 0.5
    assert slow.history[0]["train/data_wait_fraction"] <= 1.0


class _SizedIterable:
    """A fresh generator per epoch, like a DataLoader."""

    def __init__(self, make: Callable[[], Iterator[dict[str, Any]]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.make()


def test_clipping_bounds_the_gradient_norm(tmp_path: Path) -> None:
    def huge_loss(model: nn.Module, batch: dict, epoch: int) -> tuple[torch.Tensor, dict]:
        return 1000.0 * F.cross_entropy(model(batch["image"]), batch["mask"]), {}

    def update_norm(clip: float | None, folder: str) -> float:
        model = _tiny_net()
        before = [p.detach().clone() for p in model.parameters()]
        _fit_sgd(model, _batches(2, 2), tmp_path / folder, objective=huge_loss, clip_grad_norm=clip)
        return (
            torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
            .norm()
            .item()
        )

    assert update_norm(0.5, "clipped") <= 0.5 + 1e-5  # SGD lr=1: the update is the (clipped) gradient
    assert update_norm(None, "raw") > 10.0


def test_evaluation_sees_ema_weights_and_training_keeps_raw_weights(tmp_path: Path) -> None:
    seen: list[dict[str, torch.Tensor]] = []
    modes: list[bool] = []

    def evaluate(model: nn.Module, loader: Any) -> dict[str, float]:
        modes.append(model.training)
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"score": 0.0}

    model = _tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    config = _config(epochs=2, ema_decay=0.5, ema_warmup=False, monitor="val/score", mode="max")
    fit(
        model,
        SupervisedObjective(F.cross_entropy),
        _batches(4, 2),
        None,
        evaluate,
        optimizer,
        None,
        config,
        tmp_path,
    )
    final = load_checkpoint(tmp_path / "final.pt")
    assert modes == [False, False]
    for key, value in seen[-1].items():
        assert torch.equal(value, final["ema"]["module"][key])
        assert torch.equal(model.state_dict()[key], final["model"][key])
    assert not torch.equal(seen[-1]["conv1.weight"], model.conv1.weight.detach())


def _tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    model = smp.Unet(
        "resnet18",
        encoder_weights=None,
        in_channels=3,
        classes=3,
        encoder_depth=3,
        decoder_channels=(32, 16, 8),
    )
    del model.encoder.layer3, model.encoder.layer4  # unused at depth 3; keeps checkpoints small
    return model


def _accuracy(model: nn.Module, loader: list[dict]) -> dict[str, float]:
    correct = sum((model(b["image"]).argmax(1) == b["mask"]).sum().item() for b in loader)
    return {"acc": correct / sum(b["mask"].numel() for b in loader)}


def test_fit_overfits_tiny_unet_with_default_cpu_policy_and_writes_files(tmp_path: Path) -> None:
    batches = _batches(4, 2, size=32)
    model = _tiny_unet()
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=1e-4)
    scheduler = build_scheduler(optimizer, "cosine", epochs=4, steps_per_epoch=2, min_lr=1e-3)
    epochs_seen: list[int] = []
    config = LoopSettings(
        epochs=4, device="cpu", save_every=2, monitor="acc", ema_decay=0.9, log_every_n_steps=0
    )
    result = fit(
        model,
        SupervisedObjective(F.cross_entropy),
        batches,
        batches,
        _accuracy,
        optimizer,
        scheduler,
        config,
        tmp_path,
        on_epoch_end=lambda epoch, logs: epochs_seen.append(epoch),
        model_spec={"arch": "unet", "encoder": "resnet18", "classes": 3},
        run_config={"dataset": "tiny"},
    )
    # The CPU default follows the machine (bf16 only where AMX makes it fast) and says why.
    fast = cpu_bf16_is_fast()
    expected = (
        "cpu bf16-autocast channels_last (bf16 chosen" if fast else "cpu fp32 channels_last (fp32 chosen"
    )
    assert result.precision.startswith(expected)
    assert epochs_seen == [1, 2, 3, 4] and result.epochs_run == 4 and not result.stopped_early
    losses = [h["train/loss"] for h in result.history]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    assert losses[-1] < 0.9 * losses[0]
    assert {"train/loss", "lr", "val/acc", "epoch_time_s"} <= set(result.history[-1])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "best.pt", "epoch-0002.pt", "epoch-0004.pt", "final.pt", "last.pt", "metrics.csv", "run_manifest.json"
    ]  # fmt: skip
    # Only last.pt keeps what resuming needs; the files people deploy hold weights (and EMA) only.
    assert "optimizer" in load_checkpoint(tmp_path / "last.pt")
    for name in ("best.pt", "epoch-0002.pt", "final.pt"):
        published = load_checkpoint(tmp_path / name)
        assert published["weights_only"] and not {"optimizer", "scheduler", "scaler", "rng"} & set(published)
    assert (tmp_path / "best.pt").stat().st_size < 0.75 * (tmp_path / "last.pt").stat().st_size
    with pytest.raises(CheckpointError, match=r"holds weights only .* resume from last.pt"):
        again = _tiny_unet()
        optimizer = torch.optim.SGD(again.parameters(), lr=0.1)
        fit(again, SupervisedObjective(F.cross_entropy), _batches(4, 2), None, None, optimizer, None,
            _config(), tmp_path / "again", resume=tmp_path / "best.pt")  # fmt: skip
    best = load_model_weights(_tiny_unet(), result.best_checkpoint)
    assert best["epoch"] == result.best_epoch and best["best_score"] == pytest.approx(result.best_score)
    assert best["model_spec"]["encoder"] == "resnet18" and best["config"]["run"] == {"dataset": "tiny"}
    manifest = json.loads((tmp_path / "run_manifest.json").read_text())
    assert manifest["config"]["train"]["epochs"] == 4 and manifest["packages"]["torch"]


def test_opt_in_bf16_autocast_on_cpu_runs_forward_in_bf16(tmp_path: Path) -> None:
    dtypes: list[torch.dtype] = []

    def objective(model: nn.Module, batch: dict, epoch: int) -> tuple[torch.Tensor, dict]:
        logits = model(batch["image"])
        dtypes.append(logits.dtype)
        return F.cross_entropy(logits, batch["mask"]), {}

    model = _tiny_net()
    result = _fit_sgd(model, _batches(4, 2), tmp_path, lr=0.1, objective=objective, amp=True)
    assert result.precision == "cpu bf16-autocast channels_last"
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert model.conv1.weight.dtype == torch.float32  # master weights stay fp32
    assert math.isfinite(result.history[0]["train/loss"])


def test_early_stopping_after_patience_with_constant_metric(tmp_path: Path) -> None:
    def constant(model: nn.Module, loader: Any) -> dict[str, float]:
        return {"val/miou": 0.5}

    model = _tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = _config(epochs=10, monitor="val/miou", mode="max", early_stopping_patience=2)
    batches = _batches(2, 2)
    result = fit(
        model,
        SupervisedObjective(F.cross_entropy),
        batches,
        None,
        constant,
        optimizer,
        None,
        config,
        tmp_path,
    )
    assert (result.epochs_run, result.stopped_early, result.best_epoch) == (3, True, 1)
    assert load_checkpoint(tmp_path / "final.pt")["epoch"] == 3
    again = fit(
        model,
        SupervisedObjective(F.cross_entropy),
        batches,
        None,
        constant,
        optimizer,
        None,
        config,
        tmp_path,
    )
    assert again.stopped_early and again.epochs_run == 3 and len(again.history) == 3  # nothing left to do


def test_plateau_scheduler_steps_on_the_monitored_metric(tmp_path: Path) -> None:
    model = _tiny_net()
    optimizer = build_optimizer(model, name="sgd", lr=1.0, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, "plateau", epochs=4, plateau_factor=0.5, plateau_patience=1)
    config = _config(epochs=4, monitor="val/miou", mode="max")
    evaluate = lambda model, loader: {"miou": 0.5}  # noqa: E731
    result = fit(
        model,
        SupervisedObjective(F.cross_entropy),
        _batches(2, 2),
        None,
        evaluate,
        optimizer,
        scheduler,
        config,
        tmp_path,
    )
    assert [h["lr"] for h in result.history] == pytest.approx([1.0, 1.0, 1.0, 0.5])


def test_step_scheduler_is_stepped_per_optimizer_step(tmp_path: Path) -> None:
    model = _tiny_net()
    optimizer = build_optimizer(model, name="sgd", lr=1.0, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, "cosine", epochs=1, steps_per_epoch=2)
    config = _config(grad_accum_steps=2)
    batches = _batches(6, 2)  # 3 micro-batches -> one full step + one flush step
    result = fit(
        model,
        SupervisedObjective(F.cross_entropy),
        batches,
        None,
        None,
        optimizer,
        scheduler,
        config,
        tmp_path,
    )
    assert scheduler.last_epoch == 2 and result.history[0]["train/steps"] == 2


def test_missing_monitor_and_max_steps(tmp_path: Path) -> None:
    model = _tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = _config(monitor="val/miou", mode="max")
    evaluate = lambda model, loader: {"acc": 1.0}  # noqa: E731
    with pytest.raises(ValueError, match=r"monitor='val/miou'.*val/acc"):
        fit(
            model,
            SupervisedObjective(F.cross_entropy),
            _batches(2, 2),
            None,
            evaluate,
            optimizer,
            None,
            config,
            tmp_path,
        )
    result = _fit_sgd(_tiny_net(), _batches(8, 2), tmp_path / "capped", max_steps_per_epoch=1)
    assert result.history[0]["train/steps"] == 1 and result.history[0]["train/images"] == 2


# ----- resume ---------------------------------------------------------------------------------------


class _NoisyObjective:
    """Uses torch and python RNGs (augmentation-like), optionally crashing in a given epoch."""

    def __init__(self, crash_in_epoch: int | None = None) -> None:
        self.crash_in_epoch = crash_in_epoch

    def __call__(self, model: nn.Module, batch: dict, epoch: int) -> tuple[torch.Tensor, dict]:
        if epoch == self.crash_in_epoch:
            raise RuntimeError("simulated kill")
        image = batch["image"] + 0.05 * torch.randn_like(batch["image"])
        if random.random() < 0.5:
            image = image.flip(-1)
            return F.cross_entropy(model(image), batch["mask"].flip(-1)), {}
        return F.cross_entropy(model(image), batch["mask"]), {}


def _dict_loader() -> DataLoader:
    images, masks = _data(12)
    dataset = TensorDataset(images, masks)

    def collate(items: list) -> dict[str, Any]:
        return {
            "image": torch.stack([i for i, _ in items]),
            "mask": torch.stack([m for _, m in items]),
            "item_id": [],
        }

    return DataLoader(dataset, batch_size=4, shuffle=True, collate_fn=collate, num_workers=0)


def _resumable_run(
    folder: Path,
    epochs: int,
    scheduler_epochs: int | None,
    objective: Callable,
    epochs_seen: list[int] | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, FitResult]:
    """A fresh process' worth of setup: seed, build model/optimizer/scheduler, fit with resume=True."""
    model = _tiny_net(seed=3, norm=True)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=1e-2)
    scheduler = (
        build_scheduler(optimizer, "cosine", epochs=scheduler_epochs, steps_per_epoch=3, warmup_epochs=1)
        if scheduler_epochs
        else None
    )
    config = _config(epochs=epochs, ema_decay=0.9, clip_grad_norm=1.0, seed=11)
    on_end = (lambda epoch, logs: epochs_seen.append(epoch)) if epochs_seen is not None else None
    result = fit(
        model,
        objective,
        _dict_loader(),
        None,
        None,
        optimizer,
        scheduler,
        config,
        folder,
        resume=True,
        on_epoch_end=on_end,
    )
    return model, optimizer, result


def _assert_same_training_state(a: tuple, b: tuple, folder_a: Path, folder_b: Path) -> None:
    (model_a, optimizer_a, _), (model_b, optimizer_b, _) = a, b
    for key, value in model_a.state_dict().items():
        torch.testing.assert_close(model_b.state_dict()[key], value, rtol=0, atol=1e-6)
    state_a, state_b = optimizer_a.state_dict()["state"], optimizer_b.state_dict()["state"]
    for index in state_a:
        torch.testing.assert_close(state_b[index]["exp_avg"], state_a[index]["exp_avg"], rtol=0, atol=1e-7)
    ema_a = load_checkpoint(folder_a / "final.pt")["ema"]["module"]
    ema_b = load_checkpoint(folder_b / "final.pt")["ema"]["module"]
    for key, value in ema_a.items():
        torch.testing.assert_close(ema_b[key], value, rtol=0, atol=1e-6)


def test_resume_after_two_epochs_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = _resumable_run(tmp_path / "straight", 4, None, _NoisyObjective())
    _resumable_run(tmp_path / "split", 2, None, _NoisyObjective())
    epochs_seen: list[int] = []
    resumed = _resumable_run(tmp_path / "split", 4, None, _NoisyObjective(), epochs_seen)
    assert resumed[2].start_epoch == 3 and epochs_seen == [3, 4] and len(resumed[2].history) == 4
    _assert_same_training_state(straight, resumed, tmp_path / "straight", tmp_path / "split")


def test_killed_run_loses_at_most_the_current_epoch(tmp_path: Path) -> None:
    straight = _resumable_run(tmp_path / "straight", 4, 4, _NoisyObjective())
    with pytest.raises(RuntimeError, match="simulated kill"):
        _resumable_run(tmp_path / "killed", 4, 4, _NoisyObjective(crash_in_epoch=3))
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 2
    assert not (tmp_path / "killed" / "final.pt").exists()
    resumed = _resumable_run(tmp_path / "killed", 4, 4, _NoisyObjective())
    assert resumed[2].start_epoch == 3
    _assert_same_training_state(straight, resumed, tmp_path / "straight", tmp_path / "killed")


def test_resume_false_starts_over(tmp_path: Path) -> None:
    _resumable_run(tmp_path, 1, None, _NoisyObjective())
    model = _tiny_net(seed=3, norm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = _config(epochs=1)
    result = fit(
        model, _NoisyObjective(), _dict_loader(), None, None, optimizer, None, config, tmp_path, resume=False
    )
    assert result.start_epoch == 1


# ----- progress ---------------------------------------------------------------------------------------


def test_progress_line_format_throughput_and_eta() -> None:
    now = [0.0]
    lines: list[str] = []
    progress = ProgressLogger(
        10, every_n_steps=2, log_fn=lines.append, epochs=2, steps_per_epoch=5, clock=lambda: now[0]
    )
    now[0] = 1.0
    assert progress.step(1, 1, torch.tensor(1.0), 4) is None
    now[0] = 2.0
    # 8 images in 2 s; eta = 2 s / 2 steps * 8 steps left
    assert progress.step(1, 2, 0.5, 4) == "epoch 1/2 step 2/5 loss 0.750 | 4.0 img/s | elapsed 2s | eta 8s"
    now[0] = 30.0
    progress.step(1, 3, torch.tensor(0.2), 4)
    now[0] = 64.0
    # window 2 s -> 64 s: 8 images / 62 s; eta = 64 / 4 * 6 = 96 s
    assert (
        progress.step(1, 4, 0.4, 4) == "epoch 1/2 step 4/5 loss 0.300 | 0.1 img/s | elapsed 1m04s | eta 1m36s"
    )
    assert lines == [lines[0], lines[1]] and len(lines) == 2
    assert format_duration(3725) == "1h02m05s"


def test_fit_logs_progress_lines_only_through_log_fn(tmp_path: Path) -> None:
    lines: list[str] = []
    model = _tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = _config(log_every_n_steps=1)
    fit(
        model,
        SupervisedObjective(F.cross_entropy),
        _batches(4, 2),
        None,
        None,
        optimizer,
        None,
        config,
        tmp_path,
        log_fn=lines.append,
    )
    assert any(line.startswith("epoch 1/1 step 2/2 loss ") and "img/s" in line for line in lines)
    assert any(line.startswith("epoch 1/1 done in") for line in lines)


# ----- top-k checkpoints and memory logs ---------------------------------------------------------------


def _fit_scored(folder: Path, epochs: int, scores: list[float], **config: Any) -> FitResult:
    """Fit the tiny net with ``val/miou`` taken from ``scores`` (one per epoch), resuming when possible."""
    model = _tiny_net()
    optimizer = build_optimizer(model, name="sgd", lr=0.1, weight_decay=0.0)
    remaining = iter(scores)
    evaluate = lambda model, loader: {"miou": next(remaining)}  # noqa: E731
    settings = _config(epochs=epochs, monitor="val/miou", mode="max", **config)
    objective = SupervisedObjective(F.cross_entropy)
    return fit(model, objective, _batches(2, 2), None, evaluate, optimizer, None, settings, folder)


def test_save_top_k_keeps_the_k_best_epochs_across_a_resume(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"loop\.save_top_k="):
        LoopSettings.parse({"save_top_k": 0}, "loop")
    _fit_scored(tmp_path, 3, [0.1, 0.5, 0.3], save_top_k=2)
    assert sorted(p.name for p in tmp_path.glob("best-epoch-*.pt")) == [
        "best-epoch-0002.pt",
        "best-epoch-0003.pt",
    ]
    result = _fit_scored(tmp_path, 5, [0.7, 0.2], save_top_k=2)  # resumes from last.pt at epoch 3
    assert result.start_epoch == 4 and result.best_epoch == 4
    assert sorted(p.name for p in tmp_path.glob("best-epoch-*.pt")) == [
        "best-epoch-0002.pt",
        "best-epoch-0004.pt",
    ]
    assert load_checkpoint(tmp_path / "best-epoch-0002.pt")["metrics"]["val/miou"] == pytest.approx(0.5)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 4
    assert load_checkpoint(tmp_path / "last.pt")["checkpoint_manager"]["top_k"] == [[0.7, 4], [0.5, 2]]
    default = _fit_scored(tmp_path / "default", 3, [0.1, 0.5, 0.3])
    assert default.best_epoch == 2 and not list((tmp_path / "default").glob("best-epoch-*.pt"))


def test_log_memory_adds_peak_memory_to_every_epoch_log(tmp_path: Path) -> None:
    with_memory = _fit_sgd(_tiny_net(), _batches(4, 2), tmp_path / "on", epochs=2, log_memory=True)
    assert [h["memory/peak_rss_mb"] > 0 for h in with_memory.history] == [True, True]
    assert all("memory/cuda_max_allocated_mb" not in h for h in with_memory.history)  # CPU run
    without = _fit_sgd(_tiny_net(), _batches(4, 2), tmp_path / "off", epochs=2)
    assert not any(key.startswith("memory/") for h in without.history for key in h)
    lines: list[str] = []
    model = _tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    objective = SupervisedObjective(F.cross_entropy)
    config = _config(log_memory=True)
    fit(
        model,
        objective,
        _batches(4, 2),
        None,
        None,
        optimizer,
        None,
        config,
        tmp_path / "log",
        log_fn=lines.append,
    )
    assert any(line.startswith("epoch 1/1 done in") and "| peak rss " in line for line in lines)
