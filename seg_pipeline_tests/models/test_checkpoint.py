"""Tests for atomic checkpoint files, safe loading and the best/last/every-N policy."""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from seg_pipeline import io as io_module
from seg_pipeline.models.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from seg_pipeline.training.checkpoints import CheckpointManager


class _Marker:
    """Unpickling this object would create a file: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_round_trip_keeps_plain_content(tmp_path: Path) -> None:
    state = {
        "weights": {"w": torch.arange(3.0)},
        "betas": (0.9, 0.999),
        "path": tmp_path / "x",
        "nested": [1, 2.5, None, "a", {"k": True}],
    }
    path = save_checkpoint(tmp_path / "sub" / "c.pt", state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["weights"]["w"], torch.arange(3.0))
    assert loaded["betas"] == (0.9, 0.999)
    assert loaded["path"] == str(tmp_path / "x")
    assert loaded["nested"] == [1, 2.5, None, "a", {"k": True}]
    assert _leftovers(path.parent) == []


def test_non_plain_state_is_rejected_with_its_key(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"state\['config'\]\['loss'\]"):
        save_checkpoint(tmp_path / "c.pt", {"config": {"loss": nn.CrossEntropyLoss()}})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "last.pt", {"epoch": 1, "w": torch.zeros(1000)})
    # Pickling fails mid-write (the large tensor is already serialised when the lambda is reached).
    with pytest.raises(Exception, match=r"lambda|pickle|Can't"):
        save_checkpoint(path, {"epoch": 2, "w": torch.ones(1000), "bad": lambda: None}, check_plain=False)
    assert load_checkpoint(path)["epoch"] == 1
    assert _leftovers(tmp_path) == []


def test_crash_before_rename_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(io_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path / "best.pt", {"epoch": 3})
    assert list(tmp_path.iterdir()) == []


def test_weights_only_load_refuses_malicious_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Marker(marker)}, evil)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        load_checkpoint(evil)
    assert not marker.exists()
    # Control: an unsafe load really would have run the payload, so the test above can fail.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_missing_and_truncated_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    good = save_checkpoint(tmp_path / "good.pt", {"w": torch.zeros(10_000)})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"truncated\.pt"):
        load_checkpoint(truncated)


def _unet(classes: int, encoder: str = "resnet18") -> nn.Module:
    return smp.Unet(encoder, encoder_weights=None, in_channels=3, classes=classes)


def test_loading_weights_from_another_architecture_names_file_and_mismatches(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "six_classes.pt", {"model": _unet(6).state_dict()})
    with pytest.raises(CheckpointMismatchError) as info:
        load_model_weights(_unet(3), path)
    message = str(info.value)
    assert "six_classes.pt" in message
    assert "segmentation_head.0.weight: checkpoint (6, 16, 3, 3) vs model (3, 16, 3, 3)" in message

    with pytest.raises(CheckpointMismatchError) as info:
        load_model_weights(_unet(6, "resnet34"), path)
    message = str(info.value)
    assert "missing keys" in message and "more" in message
    assert len(message) < 2000  # first few mismatches, not torch's wall of text


def test_load_model_weights_prefers_ema_and_accepts_bare_state_dicts(tmp_path: Path) -> None:
    raw, averaged = nn.Linear(2, 2), nn.Linear(2, 2)
    state = {"model": raw.state_dict(), "ema": {"module": averaged.state_dict(), "num_updates": 3}}
    path = save_checkpoint(tmp_path / "c.pt", state)
    target = nn.Linear(2, 2)
    load_model_weights(target, path)
    assert torch.equal(target.weight, averaged.weight)
    load_model_weights(target, path, prefer_ema=False)
    assert torch.equal(target.weight, raw.weight)
    bare = save_checkpoint(tmp_path / "bare.pt", {f"module.{k}": v for k, v in averaged.state_dict().items()})
    load_model_weights(nn.Linear(2, 2), bare)


def test_manager_writes_best_last_every_n_and_final(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, monitor="val/loss", mode="min", save_every=2)
    scores = [0.9, 0.5, 0.7, 0.6]
    for epoch, score in enumerate(scores, start=1):
        improved = manager.update(score, epoch)
        manager.save_epoch({"epoch": epoch, "score": score}, epoch, improved)
    manager.save_final({"epoch": 4, "final": True})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "epoch-0002.pt", "epoch-0004.pt", "final.pt", "last.pt"]
    # best.pt is a hard link to an older last.pt: later saves must not have changed it.
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 4
    assert load_checkpoint(tmp_path / "epoch-0002.pt")["epoch"] == 2
    assert (manager.best_score, manager.best_epoch, manager.epochs_without_improvement) == (0.5, 2, 2)


def test_manager_ignores_nan_and_refuses_other_monitor(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, monitor="val/miou", mode="max")
    assert manager.update(0.3, 1)
    assert not manager.update(float("nan"), 2)
    assert not manager.update(0.3, 3)  # equal is not better
    other = CheckpointManager(tmp_path, monitor="val/dice", mode="max")
    with pytest.raises(CheckpointError, match="val/miou"):
        other.load_state_dict(manager.state_dict())
    with pytest.raises(ValueError, match="mode="):
        CheckpointManager(tmp_path, mode="maximum")
    assert os.listdir(tmp_path) == []


def _top_k_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("best-epoch-*.pt"))


def test_save_top_k_keeps_the_k_best_epochs_and_survives_resume(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, monitor="val/miou", mode="max", save_every=0, save_top_k=2)
    for epoch, score in enumerate([0.1, 0.5, 0.3, 0.7, 0.2], start=1):
        improved = manager.update(score, epoch)
        state = {"epoch": epoch, "model": {"w": torch.full((1,), score)}, "optimizer": {"m": 1}}
        manager.save_epoch(state, epoch, improved)
    assert _top_k_files(tmp_path) == ["best-epoch-0002.pt", "best-epoch-0004.pt"]
    assert manager.top_k == [(0.7, 4), (0.5, 2)]
    assert manager.top_k_paths == [tmp_path / "best-epoch-0004.pt", tmp_path / "best-epoch-0002.pt"]
    second = load_checkpoint(tmp_path / "best-epoch-0002.pt")
    assert second["epoch"] == 2 and second["weights_only"] and "optimizer" not in second
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 4  # best.pt is kept as with k=1

    resumed = CheckpointManager(tmp_path, monitor="val/miou", mode="max", save_every=0, save_top_k=2)
    resumed.load_state_dict(manager.state_dict())
    assert resumed.top_k == manager.top_k
    # Epoch 6 beats epoch 2 (not 4): only a manager that remembers the list deletes the right file.
    resumed.save_epoch({"epoch": 6}, 6, resumed.update(0.6, 6))
    assert _top_k_files(tmp_path) == ["best-epoch-0004.pt", "best-epoch-0006.pt"]


def test_save_top_k_one_writes_best_only_and_zero_is_refused(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, save_every=0)
    for epoch, score in enumerate([0.1, 0.5, 0.3], start=1):
        manager.save_epoch({"epoch": epoch}, epoch, manager.update(score, epoch))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    old = {key: value for key, value in manager.state_dict().items() if key != "top_k"}
    upgraded = CheckpointManager(tmp_path, save_top_k=3)
    upgraded.load_state_dict(old)  # a last.pt written before top-k: its best epoch seeds the list
    assert upgraded.top_k == [(0.5, 2)]
    with pytest.raises(ValueError, match="save_top_k=0"):
        CheckpointManager(tmp_path, save_top_k=0)
