"""Jobs: named asset selections runnable with ``dagster job execute -m seg_pipeline.definitions -j NAME``."""

import dagster as dg

GPU_TAGS = {"seg_pipeline/gpu": "true"}

ingest_job = dg.define_asset_job(
    name="ingest_job",
    selection=dg.AssetSelection.groups("ingest"),
    description="Catalogue, split and shard the target and auxiliary tiles (with their blocking checks).",
)

train_job = dg.define_asset_job(
    name="train_job",
    selection=dg.AssetSelection.groups("ingest", "train"),
    description="Ingest, then stage-1 pretraining and stage-2 KD finetuning, each an MLflow run.",
    tags=GPU_TAGS,
)

full_pipeline_job = dg.define_asset_job(
    name="full_pipeline_job",
    selection=dg.AssetSelection.groups("ingest", "train", "inference", "evaluation"),
    description="Ingest -> pretrain -> KD -> ensemble TTA predictions -> evaluation report -> champion gate.",
    tags=GPU_TAGS,
)
