"""Jobs: named asset selections runnable with ``dagster job execute -m seg_pipeline.definitions -j NAME``.

Each job's default run config is the preset (:mod:`seg_pipeline.defs.presets`): the launchpad opens on
it with every setting written out, and the schedule and the sensor run on it.
"""

from typing import Any

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from seg_pipeline.defs.pipeline import evaluate, export, ingest, train
from seg_pipeline.defs.pipeline.train import GPU_TAGS
from seg_pipeline.defs.presets import job_run_config, preset_path

PRESET = preset_path()


def _assets() -> list[dg.AssetsDefinition]:
    """The assets whose config the jobs carry (a function: a module-level list would be loaded twice)."""
    found = dg.load_assets_from_modules([ingest, train, evaluate, export])
    return [asset for asset in found if isinstance(asset, dg.AssetsDefinition)]


#: Each job's default run config by job name (the sensor starts its runs from it).
PRESET_CONFIGS: dict[str, dict[str, Any]] = {}


def _job(
    name: str, groups: tuple[str, ...], description: str, tags: dict[str, str] | None = None
) -> UnresolvedAssetJobDefinition:
    PRESET_CONFIGS[name] = job_run_config(_assets(), groups, PRESET)
    return dg.define_asset_job(
        name=name,
        selection=dg.AssetSelection.groups(*groups, include_sources=True),
        description=f"{description} Default run config: {PRESET.name}.",
        config=PRESET_CONFIGS[name],
        tags=tags,
    )


ingest_job = _job(
    "ingest_job",
    ("ingest",),
    "Catalogue, split and shard the target and auxiliary tiles (with their blocking checks).",
)
train_job = _job(
    "train_job",
    ("ingest", "train"),
    "Ingest, then stage-1 pretraining and stage-2 KD finetuning, each an MLflow run.",
    GPU_TAGS,
)
full_pipeline_job = _job(
    "full_pipeline_job",
    ("ingest", "train", "inference", "evaluation", "export"),
    "Ingest -> pretrain -> KD -> ensemble TTA predictions -> evaluation report -> champion gate -> "
    "TorchScript/ONNX export.",
    GPU_TAGS,
)
