"""Every seed's workflow as a run config (``configs/seeds/``): valid for Dagster's own config check, and
each trains once at CI size on synthetic data of the seed's shape (7 bands and 2 classes for 003).

What the test changes to reach CI size, and nothing else: epochs, steps, batch size, patch sizes and
workers shrink, ImageNet weights are off (no network), synthetic mask classes are folded onto the
seed's class list, and a ``fixed`` split (folders the user brings) becomes ``supervised``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from seg_pipeline.contracts import AuxiliarySet
from seg_pipeline.data.synthetic import SyntheticSpec, write_synthetic_dataset
from seg_pipeline.defs.definitions import defs
from seg_pipeline.settings import (
    DatasetSettings,
    KDStageSettings,
    PretrainSettings,
    ShardSettings,
    SplitSettings,
)
from seg_pipeline.settings.compose import apply_overrides, compose, section
from seg_pipeline.workflows import ingest
from seg_pipeline.workflows.layout import DataLayout
from seg_pipeline.workflows.train import StageRun, distill, pretrain

SEEDS = Path(__file__).parents[2] / "configs" / "seeds"
CONFIGS = sorted(SEEDS.glob("*.yaml"))
#: CI size for any stage section.
CI_STAGE = [
    "loop.epochs=1",
    "scheduler.warmup_epochs=0.0",
    "loop.max_steps_per_epoch=1",
    "loop.log_every_n_steps=0",
    "loader.batch_size=2",
    "loader.num_workers=0",
    "loader.persistent_workers=false",
    "model.encoder_weights=null",
    "validation.windows.window=64",
    "validation.windows.overlap=8",
]


def test_every_seed_has_a_config() -> None:
    assert [p.name for p in CONFIGS] == [
        "000_quant_civil.yaml",
        "001_generic.yaml",
        "002_biodiversity.yaml",
        "003_wildfire.yaml",
        "004_crack.yaml",
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_seed_config_is_valid_for_the_full_pipeline_job(path: Path) -> None:
    result = dg.validate_run_config(defs.resolve_job_def("full_pipeline_job"), compose([path]))
    assert result["ops"]  # a typo in any key or a wrong type would have raised DagsterInvalidConfigError


def _ingest(data_root: Path, config: dict[str, Any], name: str, spec: SyntheticSpec, seed: int) -> Any:
    """The seed's ingest settings on synthetic tiles of its shape; classes folded onto its class list."""
    write_synthetic_dataset(data_root / "raw" / name, spec, seed=seed)
    fields = {**section(config, "tile_headers"), "dataset_id": name}
    names = fields.get("class_names") or []
    if names:
        fields["mask_values"] = {value: value % len(names) for value in range(6)}  # synthetic ids 0..5
    layout = DataLayout.at(data_root)
    catalog = ingest.catalogue(DatasetSettings.parse(fields), layout, log_fn=lambda _: None).catalog
    split = section(config, "dataset_splits")
    if split.get("policy", "supervised") == "fixed":
        split = {"policy": "supervised"}
    split = {"train_fraction": 0.5, "val_fraction": 0.5, "test_fraction": 0.0, **split}
    table = ingest.split(SplitSettings.parse(split), catalog, log_fn=lambda _: None)
    return ingest.shard(ShardSettings(), catalog, table, log_fn=lambda _: None).shards


def _stage(config: dict[str, Any], op: str, cls: type[PretrainSettings | KDStageSettings]) -> Any:
    stage = {k: v for k, v in section(config, op).items() if k not in ("nproc_per_node", "register_as")}
    overrides = list(CI_STAGE)
    if (stage.get("patches") or {}).get("sizes"):
        overrides += ["patches.sizes=[64, 96]"]
    elif (stage.get("patches") or {}).get("size"):
        overrides += ["patches.size=64"]
    return cls.parse(apply_overrides(stage, overrides), op)


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_seed_config_trains_at_ci_size(path: Path, tmp_path: Path) -> None:
    config = compose([path])
    bands = "s2" if section(config, "tile_headers").get("expected_bands") == 7 else "rgb"
    spec = SyntheticSpec(grid_rows=2, grid_cols=4, tile_size=64, bands=bands, labeled_fraction=1.0)
    if section(config, "dataset_splits").get("policy") == "v0":
        spec = SyntheticSpec(grid_rows=3, grid_cols=4, tile_size=64, labeled_fraction=0.75)
    target = _ingest(tmp_path, config, "target", spec, seed=0)
    assert target.catalog.bands == (7 if bands == "s2" else 3)
    aux_names = [d["dataset_id"] for d in section(config, "auxiliary_sources").get("datasets") or []]
    aux_spec = SyntheticSpec(grid_rows=2, grid_cols=2, tile_size=64, class_scheme="aux", item_prefix="oem")
    auxiliary = AuxiliarySet(
        sources=[_ingest(tmp_path, {}, name, aux_spec, seed=1) for name in aux_names], data_version="aux"
    )
    settings = _stage(config, "pretrained_model", PretrainSettings)
    teacher = pretrain(settings, target, auxiliary, StageRun(checkpoint_dir=tmp_path / "pretrain"))
    # The seed's own choices reached the run: its monitor picked best.pt and was logged each epoch.
    assert teacher.monitor == settings.loop.monitor_key and teacher.best_score is not None
    assert settings.loop.monitor_key in teacher.history[0]
    assert (tmp_path / "pretrain" / "metrics.csv").is_file()
    if section(config, "kd_student_model").get("kd"):  # seed 002 is the KD recipe: run its stage 2 too
        kd = _stage(config, "kd_student_model", KDStageSettings)
        student = distill(kd, target, teacher, StageRun(checkpoint_dir=tmp_path / "kd"))
        assert student.epochs_run == 1 and "train/kd" in student.history[0]
