"""Training stages as library calls: combined sources, and kill -9 then resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from seg_pipeline.data.headers import build_headers, write_catalog
from seg_pipeline.data.shards import write_shards
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.data.splits import SplitConfig, assign_splits
from seg_pipeline.data.synthetic import AUX_CLASSES, TARGET_CLASSES, SyntheticSpec, write_synthetic_dataset
from seg_pipeline.training.checkpoint import load_checkpoint
from seg_pipeline.training.loop import TrainConfig
from seg_pipeline.training.models import ModelSpec
from seg_pipeline.training.stages import SourceSpec, StageConfig, build_training_data, run_stage

REMAP = {
    "unknown": None,
    "bareland": "bare_soil",
    "rangeland": "vegetation",
    "developed_space": "building",
    "tree": "vegetation",
    "agriculture_land": "cropland",
}


def _prepare(
    root: Path, name: str, spec: SyntheticSpec, seed: int, classes: tuple[str, ...], remap: dict | None = None
) -> SourceSpec:
    raw = write_synthetic_dataset(root / "raw" / name, spec, seed=seed)
    headers = build_headers(DatasetSpec(name, raw))
    out = root / "processed" / name
    write_catalog(headers.catalog, out / "headers.parquet", headers.class_names)
    splits = assign_splits(
        headers.catalog,
        SplitConfig(policy="supervised", train_fraction=0.6, val_fraction=0.4, test_fraction=0.0),
    )
    write_shards(headers.catalog, splits, out)
    return SourceSpec(name, out, out / "headers.parquet", classes, class_remap=remap)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[SourceSpec, SourceSpec]:
    root = tmp_path_factory.mktemp("stages")
    target = _prepare(root, "demo", SyntheticSpec(grid_rows=3, grid_cols=4, tile_size=32), 1, TARGET_CLASSES)
    aux = _prepare(
        root,
        "aux",
        SyntheticSpec(
            grid_rows=2,
            grid_cols=3,
            tile_size=32,
            class_scheme="aux",
            item_prefix="oem",
            nodata_tile_fraction=1.0,
        ),
        2,
        AUX_CLASSES,
        REMAP,
    )
    return target, aux


def _config(epochs: int) -> StageConfig:
    return StageConfig(
        model=ModelSpec("unet", "resnet18", 3, len(TARGET_CLASSES)),
        train=TrainConfig(
            epochs=epochs,
            max_steps_per_epoch=2,
            ema_decay=None,
            log_every_n_steps=0,
            early_stopping_patience=None,
        ),
        warmup_epochs=0.0,
    )


def test_combined_stream_remaps_aux_masks_into_the_target_scheme(sources) -> None:
    target, aux = sources
    data = build_training_data([target, aux], TARGET_CLASSES, _config(1))
    seen = {"demo/train": set(), "aux/train": set()}
    for sample in data:
        seen[sample["source"]] |= set(sample["mask"].unique().tolist())
    assert seen["aux/train"] and seen["demo/train"]
    # Aux ids 6 (water) and 7 (agriculture) exist only after remapping to 1 and 5; "unknown"
    # swaths (every aux tile has one here) become ignore.
    assert seen["aux/train"] <= {*range(len(TARGET_CLASSES)), 255}
    assert 255 in seen["aux/train"]
    assert not seen["aux/train"] & {6, 7}


def test_stage_without_tracking_trains_and_reports(sources, tmp_path: Path) -> None:
    target, aux = sources
    result = run_stage("pretrain", _config(1), [target, aux], target, tmp_path / "ckpt")
    assert result.epochs_run == 1 and result.best_checkpoint.exists()
    assert set(result.per_class_iou) <= set(TARGET_CLASSES) and result.per_class_iou
    assert result.normalization["mean"] and result.model_spec["encoder"] == "resnet18"


def test_num_classes_mismatch_is_refused_before_training(sources, tmp_path: Path) -> None:
    target, _ = sources
    config = _config(1)
    config.model = ModelSpec("unet", "resnet18", 3, 4)
    with pytest.raises(ValueError, match=r"model.num_classes=4 but the target 'demo' has 6 classes"):
        run_stage("pretrain", config, [target], target, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_killed_training_resumes_epoch_counter_and_optimizer_state(sources, tmp_path: Path) -> None:
    target, _aux = sources
    ckpt = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from seg_pipeline.training import stages
        from seg_pipeline_tests.training.test_stages import _config
        target = stages.SourceSpec(
            "demo", Path({str(target.dataset_dir)!r}), Path({str(target.catalog_path)!r}),
            {tuple(target.class_names)!r},
        )
        original = stages.fit
        def slow_fit(*args, **kwargs):
            user_hook = kwargs.get("on_epoch_end")
            def hook(epoch, logs):
                if user_hook: user_hook(epoch, logs)
                time.sleep(30)  # leave time to be killed after epoch 1 is on disk
            kwargs["on_epoch_end"] = hook
            return original(*args, **kwargs)
        stages.fit = slow_fit
        stages.run_stage("pretrain", _config(3), [target], target, Path({str(ckpt)!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 240
        while not (ckpt / "last.pt").exists():
            assert proc.poll() is None, "training process died before writing last.pt"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.5)
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_state = load_checkpoint(ckpt / "last.pt")
    assert killed_state["epoch"] == 1
    assert not list(ckpt.glob("*.tmp*")), "a half-written checkpoint is visible"
    steps_per_epoch = int(killed_state["global_step"])

    result = run_stage("pretrain", _config(3), [target], target, ckpt)
    assert result.resumed_from_epoch == 1 and result.epochs_run == 3  # epochs_run counts the whole run
    final = load_checkpoint(ckpt / "last.pt")
    assert final["epoch"] == 3
    adam_steps = {float(torch.as_tensor(s["step"])) for s in final["optimizer"]["state"].values()}
    # A fresh optimizer would have counted only the two resumed epochs.
    assert adam_steps == {3.0 * steps_per_epoch}
    assert [h["epoch"] for h in result.history] == [1.0, 2.0, 3.0]
