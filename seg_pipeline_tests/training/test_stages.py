"""Training stages as library calls: combined sources, and kill -9 then resume."""

from __future__ import annotations

import dataclasses
import json
import os
import re
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
from seg_pipeline.models import ModelSpec
from seg_pipeline.models.checkpoint import load_checkpoint
from seg_pipeline.training.loop import TrainConfig
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


#: kill -9 right after the child printed its N-th "epoch ..." line (16 in all: one step line and one
#: summary line per epoch over 8 epochs), then after a short extra delay, so the kills land mid-step,
#: mid-validation and mid-save in different epochs, whatever the speed of the machine.
_KILL_AFTER_LINE = (1, 4, 7, 10, 13)
_KILL_DELAY_S = (0.0, 0.15, 0.3, 0.05, 0.2)
_REAL_CHILD = """
import dataclasses, sys
from pathlib import Path
from seg_pipeline.training import stages
from seg_pipeline_tests.training.test_stages import _config
target = stages.SourceSpec("demo", Path(sys.argv[1]), Path(sys.argv[2]), tuple(sys.argv[3].split(",")))
config = _config(int(sys.argv[5]))
config.train = dataclasses.replace(config.train, log_every_n_steps=1)
print("START", flush=True)
# Lines: "epoch e/E step s/S ..." per step and "epoch e/E done ..." once last.pt of epoch e is on disk.
log = lambda line: print(line, flush=True)
stages.run_stage("pretrain", config, [target], target, Path(sys.argv[4]), log_fn=log)
print("DONE", flush=True)
"""


@pytest.mark.slow
def test_five_kills_during_training_each_resume_and_finish_like_an_uninterrupted_run(
    sources, tmp_path: Path
) -> None:
    """kill -9 at five points of a real (un-slowed) stage; every retry resumes and ends like the straight run.

    "Like": the same final epoch and the same weights (to float tolerance); the retry redoes at most
    the epoch the kill interrupted, since ``last.pt`` holds every epoch the killed process reported done.
    """
    target, _aux = sources
    epochs = 8
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def start_child(ckpt: Path) -> subprocess.Popen[str]:
        args = [
            sys.executable, "-c", _REAL_CHILD, str(target.dataset_dir), str(target.catalog_path),
            ",".join(target.class_names), str(ckpt), str(epochs),
        ]  # fmt: skip
        child = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "START", "the training child died while importing"
        return child

    reference = load_checkpoint(
        run_stage("pretrain", _config(epochs), [target], target, tmp_path / "straight").last_checkpoint
    )["model"]
    outcomes = []
    for attempt, (after_line, delay_s) in enumerate(zip(_KILL_AFTER_LINE, _KILL_DELAY_S, strict=True)):
        ckpt = tmp_path / f"try{attempt}"
        child = start_child(ckpt)
        try:
            assert child.stdout is not None
            lines = []
            while len(lines) < after_line:
                line = child.stdout.readline()
                assert line, f"try {attempt}: the child ended before line {after_line}: {lines}"
                lines += [line] if line.startswith("epoch ") else []
            time.sleep(delay_s)
            os.kill(child.pid, signal.SIGKILL)
            reported = "".join(lines) + child.stdout.read()
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        assert "DONE" not in reported, f"try {attempt}: the run finished before the kill"
        done_before_kill = max(map(int, re.findall(r"^epoch (\d+)/\d+ done", reported, re.M)), default=0)
        # Every checkpoint under its real name is whole; a kill mid-save leaves only a hidden temp.
        for path in ckpt.glob("*.pt"):
            load_checkpoint(path)
        killed_mid_save = [p.name for p in ckpt.glob(".*.tmp-*")]
        saved = load_checkpoint(ckpt / "last.pt")["epoch"] if (ckpt / "last.pt").exists() else 0
        # Saved after the epoch's checkpoint is written, so a kill between the two leaves one more.
        assert saved in (done_before_kill, done_before_kill + 1), (attempt, saved, done_before_kill)

        retry = run_stage("pretrain", _config(epochs), [target], target, ckpt)
        assert retry.resumed_from_epoch == saved and retry.epochs_run == epochs
        assert [p.name for p in ckpt.iterdir() if p.name.startswith(".")] == []  # the retry swept the temps
        assert [h["epoch"] for h in retry.history] == [float(e) for e in range(1, epochs + 1)]
        final = load_checkpoint(retry.last_checkpoint)
        assert final["epoch"] == epochs
        for key, value in reference.items():
            torch.testing.assert_close(final["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        outcomes.append((after_line, done_before_kill, saved, killed_mid_save))
    print("killed after line, epochs reported done, last.pt epoch, temps left by the kill:", outcomes)
    # The kills really landed at different points: not all before the first epoch, not all at the end.
    assert len({outcome[2] for outcome in outcomes}) >= 2, outcomes


def test_stage_config_and_sources_survive_the_torchrun_job_file(sources) -> None:
    from seg_pipeline.training.launch import dataclass_from_json, dataclass_to_json
    from seg_pipeline.training.stages import KDSettings

    _target, aux = sources
    config = _config(3)
    config.kd = KDSettings(alpha=0.6, patch_sizes=(32, 48))
    back = dataclass_from_json(StageConfig, json.loads(json.dumps(dataclass_to_json(config))))
    assert back == config and isinstance(back.kd.patch_sizes, tuple)
    assert dataclass_from_json(SourceSpec, json.loads(json.dumps(dataclass_to_json(aux)))) == aux
    with pytest.raises(ValueError, match=r"StageConfig got unknown keys \['lr_typo'\]"):
        dataclass_from_json(StageConfig, {**dataclass_to_json(config), "lr_typo": 1})


@pytest.mark.slow
def test_train_stage_runs_the_same_stage_on_two_torchrun_ranks(tmp_path: Path) -> None:
    """``train_stage(nproc_per_node=2)``: torchrun, two gloo ranks on CPU, rank 0's result comes back."""
    from seg_pipeline.training.launch import train_stage

    # 24 tiles: each rank gets several training tiles per batch (BatchNorm needs more than one).
    spec = SyntheticSpec(grid_rows=4, grid_cols=6, tile_size=32)
    target = _prepare(tmp_path, "demo", spec, 3, TARGET_CLASSES)
    lines: list[str] = []
    value = train_stage(
        "pretrain", _config(2), [target], target, tmp_path / "ddp", nproc_per_node=2, log_fn=lines.append
    )
    assert value["epochs_run"] == 2 and Path(value["best_checkpoint"]).exists()
    assert load_checkpoint(value["best_checkpoint"])["world_size"] == 2
    assert any("world size 2" in line for line in lines), lines[-20:]
    manifest = json.loads((tmp_path / "ddp" / "run_manifest.json").read_text())
    assert manifest["config"]["world_size"] == 2, manifest["config"]


def test_train_stage_refuses_impossible_rank_counts(sources, tmp_path: Path) -> None:
    from seg_pipeline.training.launch import train_stage

    target, _aux = sources
    with pytest.raises(ValueError, match=r"nproc_per_node=0: must be an integer >= 1"):
        train_stage("pretrain", _config(1), [target], target, tmp_path / "x", nproc_per_node=0)
    cuda = _config(1)
    cuda.train = dataclasses.replace(cuda.train, device="cuda")
    with pytest.raises(ValueError, match=r"nproc_per_node=\d+ but only \d+ CUDA device"):
        train_stage("pretrain", cuda, [target], target, tmp_path / "x", nproc_per_node=64)
    assert not (tmp_path / "x").exists()
