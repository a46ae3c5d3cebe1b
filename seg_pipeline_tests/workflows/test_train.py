"""Training stages as library calls: combined sources, typed results, kill -9 then resume, torchrun."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seg_pipeline.contracts import AuxiliarySet, ShardSet, TrainedModel
from seg_pipeline.data.synthetic import AUX_CLASSES, TARGET_CLASSES, SyntheticSpec
from seg_pipeline.models.checkpoint import load_checkpoint
from seg_pipeline.settings import KDStageSettings, PretrainSettings, SettingsError
from seg_pipeline.training.sources import TrainingSource, build_training_data
from seg_pipeline.workflows.launch import launch_stage
from seg_pipeline.workflows.stage import StageJob
from seg_pipeline.workflows.train import StageRun, distill, pretrain, pretraining_sources
from seg_pipeline_tests.conftest import ingest_synthetic, scratch_dir, tiny_stage

REMAP = {
    "unknown": "",
    "bareland": "bare_soil",
    "rangeland": "vegetation",
    "developed_space": "building",
    "tree": "vegetation",
    "agriculture_land": "cropland",
}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sources(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ShardSet, AuxiliarySet]:
    root = scratch_dir(request, tmp_path_factory, "stages")
    target = ingest_synthetic(root, "demo", SyntheticSpec(grid_rows=3, grid_cols=4, tile_size=32), seed=1)
    aux_spec = SyntheticSpec(
        grid_rows=2,
        grid_cols=3,
        tile_size=32,
        class_scheme="aux",
        item_prefix="oem",
        nodata_tile_fraction=1.0,
    )
    aux = ingest_synthetic(root, "aux", aux_spec, seed=2)
    return target, AuxiliarySet(sources=[aux], data_version="aux")


def _settings(epochs: int, loop: dict | None = None, **changes: object) -> PretrainSettings:
    loop = {"epochs": epochs, **(loop or {})}
    return PretrainSettings.parse(tiny_stage(loop=loop, aux_class_remaps={"aux": REMAP}, **changes))


def test_combined_stream_remaps_aux_masks_into_the_target_scheme(sources) -> None:
    target, auxiliary = sources
    settings = _settings(1)
    data = build_training_data(
        pretraining_sources(settings, target, auxiliary),
        TARGET_CLASSES,
        target.catalog.ignore_index,
        settings,
    )
    seen: dict[str, set[int]] = {"demo/train": set(), "aux/train": set()}
    for sample in data:
        seen[sample["source"]] |= set(sample["mask"].unique().tolist())
    assert seen["aux/train"] and seen["demo/train"]
    # Aux ids 6 (water) and 7 (agriculture) exist only after remapping to 1 and 5; "unknown"
    # swaths (every aux tile has one here) become ignore.
    assert seen["aux/train"] <= {*range(len(TARGET_CLASSES)), 255}
    assert 255 in seen["aux/train"]
    assert not seen["aux/train"] & {6, 7}
    assert auxiliary.sources[0].catalog.class_names == list(AUX_CLASSES)


def test_stage_without_tracking_trains_and_returns_a_typed_model(sources, tmp_path: Path) -> None:
    target, auxiliary = sources
    model = pretrain(_settings(1), target, auxiliary, StageRun(tmp_path / "ckpt"))
    assert isinstance(model, TrainedModel) and model.tracking is None
    assert model.epochs_run == 1 and Path(model.checkpoint).exists()
    assert set(model.per_class_iou) <= set(TARGET_CLASSES) and model.per_class_iou
    assert model.normalization.mean and model.spec.encoder == "mobilenet_v2"
    assert model.spec.in_channels == 3 and model.spec.num_classes == len(TARGET_CLASSES)  # from the data
    assert TrainedModel.from_json(model.to_json()) == model  # what the IO manager stores


def test_hand_over_final_passes_on_the_last_epoch_instead_of_the_best(sources, tmp_path: Path) -> None:
    """``loop.hand_over: final``: the last epoch goes on, not the one a small val split picked."""
    target, auxiliary = sources
    best = pretrain(_settings(2), target, auxiliary, StageRun(tmp_path / "best"))
    assert Path(best.checkpoint).name == "best.pt"
    final = pretrain(_settings(2, {"hand_over": "final"}), target, auxiliary, StageRun(tmp_path / "final"))
    assert Path(final.checkpoint).name == "final.pt" and final.best_epoch == 2
    assert final.best_score == final.history[-1]["val/miou"]
    assert load_checkpoint(final.checkpoint)["epoch"] == 2


def test_layer_decay_and_head_multiplier_reach_the_stage_optimizer(sources, tmp_path: Path) -> None:
    """Seed 001's layer-wise LR decay and head LR multiplier, set in the stage settings, shape the groups."""
    target, auxiliary = sources
    optimizer = {"lr": 1e-3, "layer_decay": 0.5, "head_lr_mult": 4.0}
    model = pretrain(_settings(1, optimizer=optimizer), target, auxiliary, StageRun(tmp_path / "ckpt"))
    groups = load_checkpoint(Path(model.checkpoint_dir) / "last.pt")["optimizer"]["param_groups"]
    mult = {group["name"]: group["lr_mult"] for group in groups}
    assert mult["head_no_decay"] == pytest.approx(4.0 * mult["decoder_no_decay"])
    encoder = [mult[f"encoder_stage{i}_decay"] for i in range(3)]  # tiny_stage: encoder depth 3
    assert encoder[0] == pytest.approx(0.25 * encoder[2]) and encoder[1] == pytest.approx(0.5 * encoder[2])


def test_kd_student_starts_from_the_teacher_and_learns_from_it(sources, tmp_path: Path) -> None:
    target, auxiliary = sources
    teacher = pretrain(_settings(1), target, auxiliary, StageRun(tmp_path / "teacher"))
    settings = KDStageSettings.parse(tiny_stage(loop={"epochs": 2}, kd={"warmup_epochs": 1}))
    lines: list[str] = []
    student = distill(settings, target, teacher, StageRun(tmp_path / "student", log_fn=lines.append))
    assert any(f"initialised from {teacher.checkpoint}" in line for line in lines)  # same arch: warm start
    assert student.history[0]["train/kd_active"] == 0.0 and student.history[1]["train/kd_active"] == 1.0
    run = load_checkpoint(student.checkpoint)["config"]["run"]
    assert run["teachers"] == [teacher.checkpoint] and run["ignore_index"] == target.catalog.ignore_index


def test_a_one_class_dataset_is_refused_with_the_reason_before_training(sources, tmp_path: Path) -> None:
    target, auxiliary = sources
    one_class = target.model_copy(
        update={"catalog": target.catalog.model_copy(update={"class_names": ["class_0"]})}
    )
    with pytest.raises(ValueError, match=r"1 class \(\['class_0'\]\); segmentation needs at least 2"):
        pretrain(_settings(1), one_class, auxiliary, StageRun(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_bad_stage_settings_name_the_field() -> None:
    with pytest.raises(SettingsError, match=r"pretrained_model.loop.epochs=0: Input should be greater"):
        PretrainSettings.parse(tiny_stage(loop={"epochs": 0}), "pretrained_model")
    with pytest.raises(SettingsError, match=r"kd.alpha=1.5"):
        KDStageSettings.parse({"kd": {"alpha": 1.5}})
    with pytest.raises(SettingsError, match=r"optimizer.lr=-0.001"):
        PretrainSettings.parse({"optimizer": {"lr": -0.001}})


_SLOW_CHILD = """
import sys, time
from pathlib import Path
from seg_pipeline.contracts import AuxiliarySet, ShardSet
from seg_pipeline.training.trainer import Trainer
from seg_pipeline.workflows.train import StageRun, pretrain
from seg_pipeline_tests.workflows.test_train import _settings
original = Trainer._log_epoch
def slow(self, *args, **kwargs):
    original(self, *args, **kwargs)
    time.sleep(30)  # leave time to be killed after epoch 1 is on disk
Trainer._log_epoch = slow
target = ShardSet.from_json(Path(sys.argv[1]).read_text())
pretrain(_settings(3), target, AuxiliarySet(data_version="none"), StageRun(Path(sys.argv[2])))
"""


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_killed_training_resumes_epoch_counter_and_optimizer_state(sources, tmp_path: Path) -> None:
    target, _ = sources
    ckpt = tmp_path / "ckpt"
    (tmp_path / "target.json").write_text(target.to_json())
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CHILD, str(tmp_path / "target.json"), str(ckpt)], env=_child_env()
    )
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

    result = pretrain(_settings(3), target, AuxiliarySet(data_version="none"), StageRun(ckpt))
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
import sys
from pathlib import Path
from seg_pipeline.contracts import AuxiliarySet, ShardSet
from seg_pipeline.workflows.train import StageRun, pretrain
from seg_pipeline_tests.workflows.test_train import _settings
target = ShardSet.from_json(Path(sys.argv[1]).read_text())
print("START", flush=True)
# Lines: "epoch e/E step s/S ..." per step and "epoch e/E done ..." once last.pt of epoch e is on disk.
settings = _settings(int(sys.argv[3]), loop={"log_every_n_steps": 1})
log = lambda line: print(line, flush=True)
pretrain(settings, target, AuxiliarySet(data_version="none"), StageRun(Path(sys.argv[2]), log_fn=log))
print("DONE", flush=True)
"""


def _kill_after(child: subprocess.Popen[str], after_line: int, delay_s: float, attempt: int) -> str:
    """Read the child's epoch lines until the ``after_line``-th, wait, kill -9; everything it printed."""
    assert child.stdout is not None
    lines: list[str] = []
    try:
        while len(lines) < after_line:
            line = child.stdout.readline()
            assert line, f"try {attempt}: the child ended before line {after_line}: {lines}"
            lines += [line] if line.startswith("epoch ") else []
        time.sleep(delay_s)
        os.kill(child.pid, signal.SIGKILL)
        return "".join(lines) + child.stdout.read()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


@pytest.mark.slow
def test_five_kills_during_training_each_resume_and_finish_like_an_uninterrupted_run(
    sources, tmp_path: Path
) -> None:
    """kill -9 at five points of a real (un-slowed) stage; every retry resumes and ends like the straight run.

    "Like": the same final epoch and the same weights (to float tolerance); the retry redoes at most
    the epoch the kill interrupted, since ``last.pt`` holds every epoch the killed process reported done.
    """
    target, _ = sources
    epochs = 8
    job = tmp_path / "target.json"
    job.write_text(target.to_json())
    none = AuxiliarySet(data_version="none")
    reference = load_checkpoint(
        pretrain(_settings(epochs), target, none, StageRun(tmp_path / "straight")).last_checkpoint
    )
    outcomes = []
    for attempt, (after_line, delay_s) in enumerate(zip(_KILL_AFTER_LINE, _KILL_DELAY_S, strict=True)):
        ckpt = tmp_path / f"try{attempt}"
        args = [sys.executable, "-c", _REAL_CHILD, str(job), str(ckpt), str(epochs)]
        child = subprocess.Popen(args, env=_child_env(), stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "START", (
            "the child died importing"
        )
        reported = _kill_after(child, after_line, delay_s, attempt)
        assert "DONE" not in reported, f"try {attempt}: the run finished before the kill"
        done_before_kill = max(map(int, re.findall(r"^epoch (\d+)/\d+ done", reported, re.M)), default=0)
        # Every checkpoint under its real name is whole; a kill mid-save leaves only a hidden temp.
        for path in ckpt.glob("*.pt"):
            load_checkpoint(path)
        killed_mid_save = [p.name for p in ckpt.glob(".*.tmp-*")]
        saved = load_checkpoint(ckpt / "last.pt")["epoch"] if (ckpt / "last.pt").exists() else 0
        # Saved after the epoch's checkpoint is written, so a kill between the two leaves one more.
        assert saved in (done_before_kill, done_before_kill + 1), (attempt, saved, done_before_kill)

        retry = pretrain(_settings(epochs), target, none, StageRun(ckpt))
        assert retry.resumed_from_epoch == saved and retry.epochs_run == epochs
        assert [p.name for p in ckpt.iterdir() if p.name.startswith(".")] == []  # the retry swept the temps
        assert [h["epoch"] for h in retry.history] == [float(e) for e in range(1, epochs + 1)]
        final = load_checkpoint(retry.last_checkpoint)
        assert final["epoch"] == epochs
        for key, value in reference["model"].items():
            torch.testing.assert_close(final["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        outcomes.append((after_line, done_before_kill, saved, killed_mid_save))
    print("killed after line, epochs reported done, last.pt epoch, temps left by the kill:", outcomes)
    # The kills really landed at different points: not all before the first epoch, not all at the end.
    assert len({outcome[2] for outcome in outcomes}) >= 2, outcomes


def test_the_torchrun_job_file_round_trips_settings_and_contracts(sources, tmp_path: Path) -> None:
    target, auxiliary = sources
    settings = KDStageSettings.parse({"kd": {"alpha": 0.6}, "patches": {"sizes": [64, 96]}})
    job = StageJob(
        stage="kd",
        settings=settings,
        target=target,
        sources=[TrainingSource(shards=auxiliary.sources[0], class_remap=REMAP)],
        checkpoint_dir=str(tmp_path),
        spec={"encoder": "resnet18", "num_classes": 6},
        teachers=["a.pt"],
    )
    back = StageJob.from_json(job.to_json())
    assert (
        back == job and isinstance(back.settings, KDStageSettings) and back.settings.patches.sizes == [64, 96]
    )
    with pytest.raises(ValueError, match="lr_typo"):
        StageJob.model_validate({**json.loads(job.to_json()), "lr_typo": 1})


@pytest.mark.slow
def test_the_same_stage_runs_on_two_torchrun_ranks(tmp_path: Path) -> None:
    """``nproc_per_node=2``: torchrun, two gloo ranks on CPU, rank 0's result comes back."""
    # 24 tiles: each rank gets several training tiles per batch (BatchNorm needs more than one).
    target = ingest_synthetic(tmp_path, "demo", SyntheticSpec(grid_rows=4, grid_cols=6, tile_size=32), seed=3)
    lines: list[str] = []
    model = pretrain(
        _settings(2),
        target,
        AuxiliarySet(data_version="none"),
        StageRun(tmp_path / "ddp", nproc_per_node=2, log_fn=lines.append),
    )
    assert model.epochs_run == 2 and Path(model.checkpoint).exists() and model.world_size == 2
    assert load_checkpoint(model.checkpoint)["world_size"] == 2
    assert any("world size 2" in line for line in lines), lines[-20:]
    manifest = json.loads((tmp_path / "ddp" / "run_manifest.json").read_text())
    assert manifest["config"]["world_size"] == 2, manifest["config"]


def test_impossible_rank_counts_are_refused(sources, tmp_path: Path) -> None:
    target, _ = sources
    job = StageJob(
        stage="pretrain",
        settings=_settings(1),
        target=target,
        sources=[TrainingSource(shards=target)],
        checkpoint_dir=str(tmp_path / "x"),
        spec={"encoder": "resnet18", "num_classes": 6},
    )
    with pytest.raises(ValueError, match=r"nproc_per_node=0: must be an integer >= 1"):
        launch_stage(job, nproc_per_node=0)
    cuda = job.model_copy(update={"settings": _settings(1, loop={"device": "cuda"})})
    with pytest.raises(ValueError, match=r"nproc_per_node=\d+ but only \d+ CUDA device"):
        launch_stage(cuda, nproc_per_node=64)
