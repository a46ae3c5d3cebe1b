"""Stage-1 training of one ingested dataset under torchrun, outside Dagster (DESIGN F16).

The Dagster training assets call ``run_stage`` in one process, so a step uses one GPU. For several
GPUs, torchrun starts one copy of this script per GPU; ``run_stage`` joins the process group from
torchrun's environment (NCCL on GPU, gloo on CPU), the shard stream splits the data across ranks,
and only rank 0 writes checkpoints and talks to MLflow::

    torchrun --standalone --nproc_per_node=4 deploy/torchrun/train_stage.py \\
        --dataset-dir data/processed/demo --checkpoint-dir data/models/pretrain/ddp-1 --device cuda

``--batch-size`` is per rank. The dataset must have been ingested already (``ingest_job``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and SMP load only when training starts (``--help`` stays instant)
    from seg_pipeline.training.stages import SourceSpec, StageConfig

CATALOG_NAME = "headers.parquet"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (a deliberately small subset of the Dagster ``PretrainConfig``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset-dir", type=Path, required=True, help="data/processed/<dataset_id>")
    parser.add_argument("--checkpoint-dir", type=Path, required=True, help="best.pt/last.pt go here")
    parser.add_argument("--architecture", default="unet")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="must be < --epochs")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per rank")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument(
        "--mlflow-data-root",
        type=Path,
        default=None,
        help="Track in MLflow: $MLFLOW_TRACKING_URI if set, else SQLite under this data root.",
    )
    parser.add_argument("--register-as", default=None, help="registered model name (needs MLflow)")
    return parser.parse_args(argv)


def target_source(dataset_dir: Path) -> SourceSpec:
    """The ingested dataset as a training source; class names come from its header catalog."""
    catalog_path = dataset_dir / CATALOG_NAME
    if not catalog_path.is_file():
        raise ValueError(
            f"--dataset-dir={str(dataset_dir)!r} has no {CATALOG_NAME}: point it at data/processed/<id> "
            "after running ingest_job"
        )
    from seg_pipeline.data.headers import read_catalog_class_names
    from seg_pipeline.training.stages import SourceSpec

    return SourceSpec(
        name=dataset_dir.name,
        dataset_dir=dataset_dir,
        catalog_path=catalog_path,
        class_names=read_catalog_class_names(catalog_path),
    )


def in_channels(catalog_path: Path) -> int:
    """Band count of the usable tiles (as the Dagster asset computes it)."""
    from seg_pipeline.data.headers import read_catalog

    catalog = read_catalog(catalog_path)
    return int(catalog.loc[catalog["status"] == "ok", "bands"].mode().iloc[0])


def stage_config(args: argparse.Namespace, source: SourceSpec) -> StageConfig:
    """StageConfig from the options; everything not exposed keeps the library defaults."""
    from seg_pipeline.data.loaders import LoaderConfig
    from seg_pipeline.training.loop import TrainConfig
    from seg_pipeline.models import ModelSpec
    from seg_pipeline.training.stages import StageConfig

    return StageConfig(
        model=ModelSpec(
            architecture=args.architecture,
            encoder=args.encoder,
            in_channels=in_channels(source.catalog_path),
            num_classes=len(source.class_names),
        ),
        lr=args.lr,
        warmup_epochs=args.warmup_epochs,
        train=TrainConfig(
            epochs=args.epochs, device=args.device, max_steps_per_epoch=args.max_steps_per_epoch
        ),
        loader=LoaderConfig(batch_size=args.batch_size, num_workers=args.num_workers),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Train, print the stage result as JSON on rank 0, leave the process group cleanly."""
    from seg_pipeline.training import distributed
    from seg_pipeline.training.stages import run_stage

    args = parse_args(argv)
    source = target_source(args.dataset_dir)
    tracking = None
    if args.mlflow_data_root is not None:
        from seg_pipeline.tracking import TrackingSettings

        tracking = TrackingSettings.from_data_root(args.mlflow_data_root)
    try:
        result = run_stage(
            "pretrain",
            stage_config(args, source),
            [source],
            source,
            args.checkpoint_dir,
            tracking=tracking,
            register_as=args.register_as if tracking is not None else None,
        )
        if distributed.is_main_process():
            summary = {
                "world_size": distributed.world_size(),
                "best_score": result.best_score,
                "epochs_run": result.epochs_run,
                "best_checkpoint": str(result.best_checkpoint),
                "run_id": result.run_id,
            }
            print(json.dumps(summary))
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
