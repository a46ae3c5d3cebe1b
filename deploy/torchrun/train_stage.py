"""Stage-1 training of one ingested dataset under torchrun, outside Dagster (F16 in docs/architecture.md).

The Dagster training assets start torchrun themselves (``nproc_per_node``). Outside Dagster, torchrun
starts one copy of this script per GPU; the stage joins the process group from torchrun's
environment (NCCL on GPU, gloo on CPU), the shard stream splits the data across ranks, and only
rank 0 writes checkpoints and talks to MLflow::

    torchrun --standalone --nproc_per_node=4 deploy/torchrun/train_stage.py \\
        --dataset-dir data/processed/demo --checkpoint-dir data/models/pretrain/ddp-1 \\
        --config configs/gpu.yaml

``--config`` is a run config (its ``ops.pretrained_model.config``) or a bare settings mapping: the
same schema as the Dagster asset. The dataset must have been ingested already (``ingest_job``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options: where the data and checkpoints are, and the settings file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset-dir", type=Path, required=True, help="data/processed/<dataset_id>")
    parser.add_argument("--checkpoint-dir", type=Path, required=True, help="best.pt/last.pt go here")
    parser.add_argument("--config", type=Path, default=None, help="YAML: a run config or PretrainSettings")
    parser.add_argument(
        "--mlflow-data-root",
        type=Path,
        default=None,
        help="Track in MLflow: $MLFLOW_TRACKING_URI if set, else SQLite under this data root.",
    )
    parser.add_argument("--register-as", default=None, help="registered model name (needs MLflow)")
    return parser.parse_args(argv)


def stage_settings(config: Path | None) -> Any:
    """The PretrainSettings of ``config`` (a run config's pretrained_model section, or bare settings)."""
    import yaml

    from seg_pipeline.settings import PretrainSettings

    data = yaml.safe_load(config.read_text()) if config is not None else {}
    section = (data.get("ops") or {}).get("pretrained_model", {}).get("config", {}) if "ops" in data else data
    section = {k: v for k, v in section.items() if k not in ("nproc_per_node", "register_as")}
    return PretrainSettings.parse(section, str(config or "defaults"))


def main(argv: Sequence[str] | None = None) -> None:
    """Train, print the stage result as JSON on rank 0, leave the process group cleanly."""
    from seg_pipeline.training import distributed
    from seg_pipeline.workflows.ingest import load_shard_set
    from seg_pipeline.workflows.stage import StageJob, run_stage
    from seg_pipeline.workflows.train import _spec, pretraining_sources

    args = parse_args(argv)
    target = load_shard_set(args.dataset_dir)
    settings = stage_settings(args.config)
    tracking = None
    if args.mlflow_data_root is not None:
        from seg_pipeline.tracking import TrackingSettings

        tracking = TrackingSettings.from_data_root(args.mlflow_data_root)
    from seg_pipeline.contracts import AuxiliarySet

    job = StageJob(
        stage="pretrain",
        settings=settings,
        target=target,
        sources=pretraining_sources(settings, target, AuxiliarySet(data_version="none")),
        checkpoint_dir=str(args.checkpoint_dir),
        spec=_spec(settings.model, target),
        tracking=tracking,
        register_as=args.register_as if tracking is not None else None,
    )
    try:
        model = run_stage(job)
        if distributed.is_main_process():
            summary = {
                "world_size": distributed.world_size(),
                "best_score": model.best_score,
                "epochs_run": model.epochs_run,
                "best_checkpoint": model.checkpoint,
                "run_id": model.tracking.run_id if model.tracking else None,
            }
            print(json.dumps(summary))
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
