"""Training assets: stage 1 pretraining on combined sources, stage 2 KD finetuning.

Each materialization is one MLflow run. The asset value is the stage result (best
checkpoint path, MLflow run id, model URI, registered version): downstream assets use that
value, never "the newest checkpoint on disk". A retried or re-executed run resumes from the
``last.pt`` of its own run family (``models/<stage>/<root run id>/``).

No ``from __future__ import annotations``: Dagster reads Config annotations at runtime.
"""

import base64
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from seg_pipeline.defs.metadata import table
from seg_pipeline.defs.resources import MlflowResource, StorageResource

GROUP = "train"
GPU_TAGS = {"seg_pipeline/gpu": "true"}
DEFAULT_AUX_REMAP = {
    "demo_aux": {
        "unknown": "",
        "bareland": "bare_soil",
        "rangeland": "vegetation",
        "developed_space": "building",
        "tree": "vegetation",
        "agriculture_land": "cropland",
    }
}


class ModelConfig(dg.Config):
    """An SMP model: architecture x encoder (weights None = offline)."""

    architecture: str = Field(
        default="unet", description="unet, unetplusplus, deeplabv3plus, fpn, segformer, ..."
    )
    encoder: str = Field(
        default="resnet34", description="resnet18/34/50, efficientnet-b0..b2, mobilenet_v2, ..."
    )
    encoder_weights: str | None = Field(default=None, description="None (offline) or 'imagenet' when online.")


class TrainingConfig(dg.Config):
    """Knobs shared by both stages (DESIGN section 5 defaults)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: str = Field(
        default="ce+dice", description="ce, dice, focal, jaccard, lovasz, bce or combos: ce+dice."
    )
    class_weighting: bool = Field(default=False, description="Inverse-frequency (sqrt) class weights in CE.")
    lr: float = 3e-4
    weight_decay: float = 1e-2
    encoder_lr_mult: float = 1.0
    scheduler: str = Field(default="cosine", description="cosine (with warmup), step, plateau or none.")
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    epochs: int = 50
    batch_size: int = 8
    num_workers: int = 0
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = 1.0
    ema_decay: float | None = 0.999
    early_stopping_patience: int | None = 10
    save_every: int = 5
    log_every_n_steps: int = 20
    max_steps_per_epoch: int | None = None
    device: str = Field(default="auto", description="auto, cuda, mps or cpu.")
    nproc_per_node: int = Field(
        default=1,
        description="DDP ranks on this machine (one per GPU), started with torchrun from this step; "
        "1 trains in the step's own process.",
    )
    amp: bool | None = Field(default=None, description="None = policy (CUDA on, MPS off, CPU bf16).")
    channels_last: bool | None = None
    augment: bool = True
    seed: int = 42


class PretrainConfig(TrainingConfig):
    """Stage 1: supervised on the target's train split plus the auxiliary sources."""

    use_auxiliary: bool = Field(default=True, description="Train on the auxiliary sources too.")
    aux_class_remaps: dict[str, dict[str, str]] = Field(
        default=DEFAULT_AUX_REMAP,
        description="Per aux dataset: source class -> target class ('' = ignore). Same-name classes map "
        "automatically.",
    )
    register_as: str = "seg_pipeline_pretrained"


class KDConfig(TrainingConfig):
    """Stage 2: KD finetuning from stage 1 (seed 002 defaults)."""

    lr: float = 1e-4
    min_lr: float = 3e-5
    epochs: int = 25
    warmup_epochs: float = 0.0
    student_model: ModelConfig | None = Field(
        default=None, description="A different (e.g. smaller) student; None = same as the teacher."
    )
    alpha: float = Field(default=0.7, description="Weight of CE; KD gets 1 - alpha.")
    temperature: float = 3.0
    confidence_threshold: float = Field(
        default=0.5, description="Teacher max prob below this: pixel ignored."
    )
    kd_warmup_epochs: int = Field(default=5, description="CE-only epochs before KD starts.")
    transfer_split: str | None = Field(
        default=None, description="e.g. 'unlabeled': teacher soft labels only."
    )
    extra_teachers: list[str] = Field(
        default=[], description="More teachers: checkpoint paths or MLflow model URIs (models:/name@alias)."
    )
    patch_sizes: list[int] = Field(default=[], description="Multi-scale schedule, e.g. [96, 128, 160].")
    multi_scale_mode: str = "sample_one_scale_per_step"
    register_as: str = "seg_pipeline_student"


def _stage_config(
    config: TrainingConfig, model: ModelConfig, num_classes: int, in_channels: int, kd: Any = None
):
    from seg_pipeline.data.augment import AugmentConfig
    from seg_pipeline.data.loaders import LoaderConfig
    from seg_pipeline.models import ModelSpec
    from seg_pipeline.training.loop import TrainConfig
    from seg_pipeline.training.stages import StageConfig

    return StageConfig(
        model=ModelSpec(
            architecture=model.architecture,
            encoder=model.encoder,
            in_channels=in_channels,
            num_classes=num_classes,
            encoder_weights=model.encoder_weights,
        ),
        loss=config.loss,
        class_weighting=config.class_weighting,
        lr=config.lr,
        weight_decay=config.weight_decay,
        encoder_lr_mult=config.encoder_lr_mult,
        scheduler=config.scheduler,
        warmup_epochs=config.warmup_epochs,
        min_lr=config.min_lr,
        train=TrainConfig(
            epochs=config.epochs,
            grad_accum_steps=config.grad_accum_steps,
            clip_grad_norm=config.clip_grad_norm,
            ema_decay=config.ema_decay,
            early_stopping_patience=config.early_stopping_patience,
            save_every=config.save_every,
            log_every_n_steps=config.log_every_n_steps,
            max_steps_per_epoch=config.max_steps_per_epoch,
            device=config.device,
            amp=config.amp,
            channels_last=config.channels_last,
            seed=config.seed,
        ),
        loader=LoaderConfig(batch_size=config.batch_size, num_workers=config.num_workers),
        augment=AugmentConfig.light() if config.augment else AugmentConfig.disabled(),
        kd=kd,
    )


def _source(shards: dict[str, Any], splits: tuple[str, ...], remap: dict[str, str] | None = None):
    from seg_pipeline.training.stages import SourceSpec

    return SourceSpec(
        name=shards["dataset_id"],
        dataset_dir=Path(shards["dataset_dir"]),
        catalog_path=Path(shards["catalog_path"]),
        class_names=tuple(shards["class_names"]),
        splits=splits,
        class_remap=None if remap is None else {k: (v or None) for k, v in remap.items()},
    )


def _in_channels(shards: dict[str, Any]) -> int:
    from seg_pipeline.data.headers import read_catalog

    catalog = read_catalog(shards["catalog_path"])
    return int(catalog.loc[catalog["status"] == "ok", "bands"].mode().iloc[0])


def _checkpoint_dir(context: dg.AssetExecutionContext, storage: StorageResource, stage: str) -> Path:
    """Stable across retries and re-executions of one run family, fresh for a new run."""
    family = context.run.root_run_id or context.run.run_id
    return storage.stage_dir("models", stage) / family


def _tags(context: dg.AssetExecutionContext, data_version: str) -> dict[str, str]:
    from seg_pipeline.tracking import build_run_tags

    return build_run_tags(
        stage=context.asset_key.to_user_string(),
        pipeline_run_id=context.run.run_id,
        asset_key=context.asset_key.to_user_string(),
        code_version=context.assets_def.code_versions_by_key.get(context.asset_key) or "",
        data_version=data_version,
        repo_dir=Path(__file__).resolve().parents[3],
    )


def _metadata(result: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "best_val_miou": result["best_score"],
        "best_epoch": result["best_epoch"],
        "epochs_run": result["epochs_run"],
        "resumed_from_epoch": result["resumed_from_epoch"],
        "stopped_early": result["stopped_early"],
        "wall_time_s": round(result["wall_time_s"], 1),
        "images_per_s": round(result["images_per_s"], 1),
        "device": f"{result['device']} ({result['precision']})",
        "ddp_ranks": result["world_size"],
        "checkpoint": dg.MetadataValue.path(result["best_checkpoint"]),
        "per_class_iou": table(
            [{"class": name, "iou": round(value, 4)} for name, value in result["per_class_iou"].items()]
        ),
        "mlflow_run_id": result["run_id"] or "",
        "model_uri": result["model_uri"] or "",
        "registered_version": f"{result['registered_model']} v{result['registered_version']}",
    }
    url = result.get("run_url") or ""
    metadata["mlflow_run"] = dg.MetadataValue.url(url) if url.startswith("http") else url
    curve = result.get("curve_path")
    if curve and Path(curve).exists():
        encoded = base64.b64encode(Path(curve).read_bytes()).decode()
        metadata["training_curves"] = dg.MetadataValue.md(f"![curves](data:image/png;base64,{encoded})")
    return metadata


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"pytorch", "mlflow"},
    tags=GPU_TAGS,
    retry_policy=dg.RetryPolicy(max_retries=1, delay=5),
    description="Stage 1: supervised SMP model trained on the target train split plus auxiliary sources "
    "(class-remapped), validated on the target val split; one MLflow run, registered model version.",
)
def pretrained_model(
    context: dg.AssetExecutionContext,
    config: PretrainConfig,
    tile_shards: dict[str, Any],
    auxiliary_sources: dict[str, Any],
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[dict[str, Any]]:
    """Pretrain on combined sources and track it in MLflow."""
    from seg_pipeline.training.launch import train_stage

    sources = [_source(tile_shards, ("train",))]
    if config.use_auxiliary:
        for name, aux in auxiliary_sources["sources"].items():
            remap = config.aux_class_remaps.get(name, {})
            sources.append(_source(aux, ("train",), remap))
    target = sources[0]
    stage_config = _stage_config(config, config.model, len(target.class_names), _in_channels(tile_shards))
    result = train_stage(
        "pretrain",
        stage_config,
        sources,
        target,
        _checkpoint_dir(context, storage, "pretrain"),
        nproc_per_node=config.nproc_per_node,
        tracking=mlflow.settings(storage.root),
        run_tags=_tags(context, tile_shards["data_version"]),
        register_as=config.register_as,
        log_fn=context.log.info,
    )
    return dg.Output(result, metadata=_metadata(result))


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"pytorch", "mlflow"},
    tags=GPU_TAGS,
    retry_policy=dg.RetryPolicy(max_retries=1, delay=5),
    description="Stage 2: KD finetune on the target from stage 1: alpha*CE + (1-alpha)*T^2*KL with teacher "
    "confidence masking and CE-only warmup; one MLflow run, registered model version.",
)
def kd_student_model(
    context: dg.AssetExecutionContext,
    config: KDConfig,
    tile_shards: dict[str, Any],
    pretrained_model: dict[str, Any],
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[dict[str, Any]]:
    """Distil stage 1 (plus any extra teachers) into the student on target data."""
    from seg_pipeline.cli import resolve_model_checkpoint
    from seg_pipeline.training.launch import train_stage
    from seg_pipeline.training.stages import KDSettings

    target = _source(tile_shards, ("train",))
    teacher_spec = pretrained_model["model_spec"]
    student = config.student_model or ModelConfig(
        architecture=teacher_spec["architecture"],
        encoder=teacher_spec["encoder"],
        encoder_weights=teacher_spec.get("encoder_weights"),
    )
    same_architecture = (student.architecture, student.encoder) == (
        teacher_spec["architecture"],
        teacher_spec["encoder"],
    )
    kd = KDSettings(
        alpha=config.alpha,
        temperature=config.temperature,
        confidence_threshold=config.confidence_threshold,
        warmup_epochs=config.kd_warmup_epochs,
        transfer_split=config.transfer_split,
        patch_sizes=tuple(config.patch_sizes) or None,
        multi_scale_mode=config.multi_scale_mode,
    )
    stage_config = _stage_config(config, student, len(target.class_names), _in_channels(tile_shards), kd=kd)
    settings = mlflow.settings(storage.root)
    result = train_stage(
        "kd",
        stage_config,
        [target],
        target,
        _checkpoint_dir(context, storage, "kd"),
        nproc_per_node=config.nproc_per_node,
        init_checkpoint=pretrained_model["best_checkpoint"] if same_architecture else None,
        teacher_checkpoints=[
            pretrained_model["best_checkpoint"],
            *(resolve_model_checkpoint(ref, storage.root) for ref in config.extra_teachers),
        ],
        tracking=settings,
        run_tags=_tags(context, tile_shards["data_version"]),
        register_as=config.register_as,
        log_fn=context.log.info,
    )
    result["teacher_best_val_miou"] = pretrained_model["best_score"]
    metadata = _metadata(result)
    metadata["teacher_best_val_miou"] = pretrained_model["best_score"]
    metadata["ignored_fraction_last_epoch"] = round(
        result["history"][-1].get("train/ignored_fraction", 0.0), 4
    )
    metadata["kd_share_last_epoch"] = round(result["history"][-1].get("train/kd", 0.0), 4)
    return dg.Output(result, metadata=metadata)
