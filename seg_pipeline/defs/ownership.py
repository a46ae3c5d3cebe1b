"""Owners and tags of the assets: who answers for a step, and how to filter the asset catalog.

Owners come from ``SEG_PIPELINE_OWNERS`` (comma-separated e-mail addresses or ``team:<name>``, as
Dagster accepts them), read when the code location loads, so a deployment names its own people
without editing the package; unset, every asset belongs to ``team:seg_pipeline``. Each asset is
tagged with its stage (``seg_pipeline/stage``: ingest, train, inference, evaluation, export), and
the training steps with ``seg_pipeline/gpu`` (a run queue can route them to a GPU worker).
"""

from __future__ import annotations

import os

DEFAULT_OWNER = "team:seg_pipeline"
STAGE_TAG = "seg_pipeline/stage"
GPU_TAG = "seg_pipeline/gpu"


def owners() -> list[str]:
    """The owners of every asset, from ``SEG_PIPELINE_OWNERS`` (default ``team:seg_pipeline``)."""
    named = [o.strip() for o in os.environ.get("SEG_PIPELINE_OWNERS", "").split(",") if o.strip()]
    return named or [DEFAULT_OWNER]


def stage_tags(stage: str, gpu: bool = False) -> dict[str, str]:
    """The tags of an asset of ``stage``; ``gpu`` marks a step that wants an accelerator."""
    tags = {STAGE_TAG: stage}
    if gpu:
        tags[GPU_TAG] = "true"
    return tags
