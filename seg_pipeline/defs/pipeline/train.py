"""Training assets: stage 1 pretraining on combined sources, stage 2 KD finetuning.

No ``from __future__ import annotations``: Dagster reads Config annotations at runtime.
Each materialization is one MLflow run. The asset value is a :class:`~seg_pipeline.contracts.TrainedModel`
(best checkpoint, MLflow run, registered version): downstream assets use that value, never "the newest
checkpoint on disk". A retried or re-executed run resumes from the ``last.pt`` of its own run family
(``models/<stage>/<root run id>/``).
"""

from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from seg_pipeline.contracts import AuxiliarySet, MemberModels, ShardSet, TrainedModel
from seg_pipeline.defs.config import dagster_config, to_settings
from seg_pipeline.defs.failures import no_retry_for_bad_input
from seg_pipeline.defs.metadata import link, picture, rounded, table, without_none
from seg_pipeline.defs.ownership import GPU_TAG, owners, stage_tags
from seg_pipeline.defs.partitions import DATASETS, dataset_of
from seg_pipeline.defs.resources import MlflowResource, StorageResource, run_family
from seg_pipeline.defs.versions import code_version
from seg_pipeline.settings import ExtraMembersSettings, KDStageSettings, PretrainSettings, override

GROUP = "train"
#: Run tags of the jobs that train (dagster.yaml can limit how many such runs share a machine).
GPU_TAGS = {GPU_TAG: "true"}
_MEMBER_COLUMNS = ("member", "model", "best_val_miou", "best_epoch", "wall_time_s", "mlflow_run")


class StageRunConfig(dg.Config):
    """The knobs of a training step that exist only in the Dagster layer: ranks and the registry name."""

    nproc_per_node: int = Field(
        default=1,
        ge=1,
        description="DDP ranks on this machine (one per GPU), started with torchrun from this step; "
        "1 trains in the step's own process.",
    )
    register_as: str = Field(
        default="",
        description="Registered model name in MLflow; {dataset} stands for the run's dataset partition "
        "(each dataset has its own versions and its own champion). Empty = not registered.",
    )


class PretrainRunConfig(StageRunConfig):
    """Stage 1 registers its model as ``<dataset>_pretrained``."""

    register_as: str = override(StageRunConfig, "register_as", "{dataset}_pretrained")


class KDRunConfig(StageRunConfig):
    """Stage 2 registers its model as ``<dataset>_student``."""

    register_as: str = override(StageRunConfig, "register_as", "{dataset}_student")


class MembersRunConfig(StageRunConfig):
    """Extra members are ensemble members only: not registered unless a name is given."""


# For the type checker the derived classes are their Dagster-only bases (settings via to_settings).
if TYPE_CHECKING:
    from seg_pipeline.workflows import train

    PretrainConfig = PretrainRunConfig
    KDConfig = KDRunConfig
    MembersConfig = MembersRunConfig
else:
    PretrainConfig = dagster_config(PretrainSettings, name="PretrainConfig", base=PretrainRunConfig)
    KDConfig = dagster_config(KDStageSettings, name="KDConfig", base=KDRunConfig)
    MembersConfig = dagster_config(ExtraMembersSettings, name="MembersConfig", base=MembersRunConfig)


def registered_name(template: str, dataset: str) -> str | None:
    """The MLflow registry name of ``template`` for ``dataset`` (None when registration is off)."""
    return template.replace("{dataset}", dataset) or None


def _stage_run(
    context: dg.AssetExecutionContext,
    config: StageRunConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
    stage: str,
    data_version: str,
    member: str | None = None,
) -> "train.StageRun":
    """How this step runs the stage: checkpoints stable across retries and re-executions of one run
    family (fresh for a new run), MLflow with the Dagster tags, the ranks and the registry name.
    """
    from seg_pipeline.tracking import TAG_MEMBER
    from seg_pipeline.workflows import train

    tags = mlflow.run_tags(context, stage=context.asset_key.to_user_string(), data_version=data_version)
    if member is not None:
        tags[TAG_MEMBER] = member
    return train.StageRun(
        checkpoint_dir=storage.layout.models_dir(stage, run_family(context)),
        tracking=mlflow.settings(storage.layout),
        run_tags=tags,
        register_as=registered_name(config.register_as, dataset_of(context)),
        nproc_per_node=config.nproc_per_node,
        log_fn=context.log.info,
    )


def _metadata(model: TrainedModel) -> dict[str, Any]:
    tracking = model.tracking
    last = model.last_epoch_logs
    return without_none(
        {
            "best_val_miou": rounded(model.best_score),
            "best_epoch": model.best_epoch,
            "epochs_run": model.epochs_run,
            "resumed_from_epoch": model.resumed_from_epoch,
            "stopped_early": model.stopped_early,
            "wall_time_s": round(model.wall_time_s, 1),
            "images_per_s": round(model.images_per_s, 1),
            "device": f"{model.device} ({model.precision})",
            "ddp_ranks": model.world_size,
            "checkpoint": dg.MetadataValue.path(model.checkpoint),
            "per_class_iou": table(
                [{"class": name, "iou": iou} for name, iou in model.per_class_iou.items()]
            ),
            "mlflow_run": link(tracking.run_url) if tracking else None,
            "mlflow_run_id": tracking.run_id if tracking else None,
            "model_uri": tracking.model_uri if tracking else None,
            "mlflow_logged_model": link(tracking.model_url) if tracking and tracking.model_url else None,
            "registered_version": f"{tracking.registered_model} v{tracking.registered_version}"
            if tracking and tracking.registered_model
            else None,
            "registered_version_page": link(tracking.registered_version_url)
            if tracking and tracking.registered_version_url
            else None,
            "ignored_fraction_last_epoch": rounded(last.get("train/ignored_fraction")),
            "kd_share_last_epoch": rounded(last.get("train/kd")),
            "training_curves": picture(model.curve_path, tracking.curves_url if tracking else None),
        }
    )


@dg.asset(
    group_name=GROUP,
    owners=owners(),
    tags=stage_tags(GROUP, gpu=True),
    partitions_def=DATASETS,
    code_version=code_version("seg_pipeline.workflows.train"),
    kinds={"pytorch", "mlflow"},
    retry_policy=dg.RetryPolicy(max_retries=1, delay=5),
    description="Stage 1: supervised SMP model trained on the target train split plus auxiliary sources "
    "(class-remapped), validated on the target val split; one MLflow run, registered model version.",
)
def pretrained_model(
    context: dg.AssetExecutionContext,
    config: PretrainConfig,
    tile_shards: ShardSet,
    auxiliary_sources: AuxiliarySet,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[TrainedModel]:
    """Pretrain on combined sources and track it in MLflow."""
    from seg_pipeline.workflows import train

    with no_retry_for_bad_input():
        settings = to_settings(config, PretrainSettings, "pretrained_model")
        run = _stage_run(context, config, storage, mlflow, "pretrain", tile_shards.data_version)
        model = train.pretrain(settings, tile_shards, auxiliary_sources, run)
    return dg.Output(model, metadata=_metadata(model))


@dg.asset(
    group_name=GROUP,
    owners=owners(),
    tags=stage_tags(GROUP, gpu=True),
    partitions_def=DATASETS,
    code_version=code_version("seg_pipeline.workflows.train"),
    kinds={"pytorch", "mlflow"},
    retry_policy=dg.RetryPolicy(max_retries=1, delay=5),
    description="Stage 2: KD finetune on the target from stage 1: alpha*CE + (1-alpha)*T^2*KL with teacher "
    "confidence masking and CE-only warmup; one MLflow run, registered model version.",
)
def kd_student_model(
    context: dg.AssetExecutionContext,
    config: KDConfig,
    tile_shards: ShardSet,
    pretrained_model: TrainedModel,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[TrainedModel]:
    """Distil stage 1 (plus any extra teachers) into the student on target data."""
    from seg_pipeline.workflows import train

    with no_retry_for_bad_input():
        settings = to_settings(config, KDStageSettings, "kd_student_model")
        run = _stage_run(context, config, storage, mlflow, "kd", tile_shards.data_version)
        model = train.distill(settings, tile_shards, pretrained_model, run)
    metadata = _metadata(model)
    metadata["teacher_best_val_miou"] = rounded(pretrained_model.best_score) or 0.0
    return dg.Output(model, metadata=metadata)


@dg.asset(
    group_name=GROUP,
    owners=owners(),
    tags=stage_tags(GROUP, gpu=True),
    partitions_def=DATASETS,
    code_version=code_version("seg_pipeline.workflows.train"),
    kinds={"pytorch", "mlflow"},
    retry_policy=dg.RetryPolicy(max_retries=1, delay=5),
    description="Extra ensemble members: more KD students of stage 1, each with its own seed or "
    "encoder and its own MLflow run (members: [] by default, which trains nothing).",
)
def extra_members(
    context: dg.AssetExecutionContext,
    config: MembersConfig,
    tile_shards: ShardSet,
    pretrained_model: TrainedModel,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[MemberModels]:
    """Distil stage 1 into each listed member; ``ensemble_predictions`` adds them to the ensemble."""
    from seg_pipeline.workflows import train

    with no_retry_for_bad_input():
        settings = to_settings(config, ExtraMembersSettings, "extra_members")
        value = train.distill_members(
            settings,
            tile_shards,
            pretrained_model,
            lambda name: _stage_run(
                context, config, storage, mlflow, f"member_{name}", tile_shards.data_version, member=name
            ),
        )
    rows = [
        {
            "member": m.name,
            "model": f"{m.model.spec.architecture}-{m.model.spec.encoder}",
            "best_val_miou": m.model.best_score,
            "best_epoch": m.model.best_epoch,
            "wall_time_s": m.model.wall_time_s,
            "mlflow_run": m.model.tracking.run_url if m.model.tracking else "",
        }
        for m in value.members
    ]
    return dg.Output(
        value, metadata={"members": len(value.members), "trained": table(rows, columns=_MEMBER_COLUMNS)}
    )


def _score_check(model: TrainedModel) -> dg.AssetCheckResult:
    """Warns (does not block) when a stage's best monitored score is missing or below its floor."""
    score = model.best_score
    passed = score is not None and score == score and score >= model.score_floor  # NaN never passes
    return dg.AssetCheckResult(
        passed=bool(passed),
        severity=dg.AssetCheckSeverity.WARN,
        metadata=without_none(
            {"monitor": model.monitor, "best_score": rounded(score), "floor": model.score_floor}
        ),
        description=None
        if passed
        else f"best {model.monitor} {score} is below score_floor {model.score_floor}",
    )


@dg.asset_check(
    partitions_def=DATASETS,
    asset=pretrained_model,
    description="Best monitored score (val mIoU) reaches score_floor.",
)
def pretrained_score_above_floor(pretrained_model: TrainedModel) -> dg.AssetCheckResult:
    """A stage that did not learn should show on its own page."""
    return _score_check(pretrained_model)


@dg.asset_check(
    partitions_def=DATASETS,
    asset=kd_student_model,
    description="Best monitored score (val mIoU) reaches score_floor.",
)
def student_score_above_floor(kd_student_model: TrainedModel) -> dg.AssetCheckResult:
    """A stage that did not learn should show on its own page."""
    return _score_check(kd_student_model)
