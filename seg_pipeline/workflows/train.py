"""The two training stages as library calls: stage 1 on target + auxiliary data, stage 2 KD from it.

Each builds a :class:`~seg_pipeline.workflows.stage.StageJob` from settings and upstream contracts
and launches it (in this process, or on torchrun ranks). The stage-specific rules live here: which
sources and class remaps stage 1 trains on; that the KD student starts from the teacher's weights
when it has the teacher's architecture, and which teachers it learns from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from seg_pipeline.contracts import AuxiliarySet, MemberModels, NamedModel, ShardSet, TrainedModel
from seg_pipeline.models.loading import checkpoint_info
from seg_pipeline.settings import ExtraMembersSettings, KDStageSettings, ModelSettings, PretrainSettings
from seg_pipeline.settings.models import ModelSpec
from seg_pipeline.tracking import TrackingSettings
from seg_pipeline.training.sources import TrainingSource
from seg_pipeline.workflows.launch import launch_stage
from seg_pipeline.workflows.resolve import resolve_model_checkpoint
from seg_pipeline.workflows.stage import StageJob

LogFn = Callable[[str], None]


def _spec(model: ModelSettings, target: ShardSet) -> ModelSpec:
    catalog = target.catalog
    if catalog.bands is None:
        raise ValueError(
            f"{target.dataset_id}: no valid tile, so the band count is unknown; fix the data first"
        )
    if catalog.num_classes < 2:
        raise ValueError(
            f"{target.dataset_id}: {catalog.num_classes} class ({catalog.class_names}); segmentation needs "
            "at least 2 (background and a class): list them in classes.txt or set class_names, and when "
            "a mask value stands for a class (255 = building) say so in dataset.mask_values"
        )
    return ModelSpec.from_settings(
        model,
        in_channels=catalog.bands,
        num_classes=catalog.num_classes,
        positive_classes=catalog.positive_ids,
    )


def pretraining_sources(
    settings: PretrainSettings, target: ShardSet, auxiliary: AuxiliarySet
) -> list[TrainingSource]:
    """The target's train split, plus each auxiliary source's train split with its class remap."""
    sources = [TrainingSource(shards=target, splits=["train"])]
    if settings.use_auxiliary:
        for aux in auxiliary.sources:
            remap: Mapping[str, str] = settings.aux_class_remaps.get(aux.dataset_id, {})
            sources.append(
                TrainingSource(
                    shards=aux, splits=["train"], class_remap={k: v or None for k, v in remap.items()}
                )
            )
    return sources


@dataclass(frozen=True)
class StageRun:
    """Where a stage writes, how it is tracked and how many ranks run it (the same for both stages).

    Attributes:
        checkpoint_dir: ``best.pt``/``last.pt``/... go here; a ``last.pt`` already there is resumed.
        tracking: MLflow settings; ``None`` trains without MLflow.
        run_tags: Extra MLflow tags (orchestrator run id, asset key, data version...).
        register_as: Registered model name for the best checkpoint.
        nproc_per_node: Ranks on this machine (torchrun when > 1).
        log_fn: Sink for progress lines.
        resume: True resumes the ``last.pt`` of ``checkpoint_dir`` when there is one, a path resumes
            that checkpoint (``seg-pipeline train --resume``), False starts afresh.
        metrics_csv: Per-epoch history CSV (default ``checkpoint_dir/metrics.csv``).
    """

    checkpoint_dir: Path
    tracking: TrackingSettings | None = None
    run_tags: Mapping[str, str] = field(default_factory=dict)
    register_as: str | None = None
    nproc_per_node: int = 1
    log_fn: LogFn | None = None
    resume: bool | str = True
    metrics_csv: Path | None = None


def pretrain(
    settings: PretrainSettings, target: ShardSet, auxiliary: AuxiliarySet, run: StageRun
) -> TrainedModel:
    """Stage 1: supervised training on the target's train split plus the auxiliary sources."""
    job = StageJob(
        stage="pretrain",
        settings=settings,
        target=target,
        sources=pretraining_sources(settings, target, auxiliary),
        checkpoint_dir=str(run.checkpoint_dir),
        spec=_spec(settings.model, target),
        tracking=run.tracking,
        run_tags=dict(run.run_tags),
        register_as=run.register_as,
        resume=run.resume,
        metrics_csv=None if run.metrics_csv is None else str(run.metrics_csv),
    )
    return launch_stage(job, run.nproc_per_node, run.log_fn)


def student_settings(settings: KDStageSettings, teacher: ModelSpec) -> ModelSettings:
    """The student's architecture: ``student_model`` when given, else the teacher's own."""
    if settings.student_model is not None:
        return settings.student_model
    return ModelSettings(**{name: getattr(teacher, name) for name in ModelSettings.model_fields})


def distill(
    settings: KDStageSettings, target: ShardSet, teacher: TrainedModel, run: StageRun
) -> TrainedModel:
    """Stage 2: KD finetuning on the target, from the stage-1 teacher plus any extra teachers (its
    training curves continue the teacher's).
    """
    return distill_from(settings, target, Path(teacher.checkpoint), run, teacher_history=teacher.history)


def distill_from(
    settings: KDStageSettings,
    target: ShardSet,
    teacher_checkpoint: Path,
    run: StageRun,
    teacher_history: Sequence[Mapping[str, float]] = (),
) -> TrainedModel:
    """Stage 2 from a teacher checkpoint (a stage-1 ``best.pt``: what ``seg-pipeline train --stage kd``
    gets), plus any extra teachers.

    The student starts from the teacher's weights when both have the same architecture and encoder
    (warm start); a different student (``student_model``) starts from its own initialisation.
    """
    teacher_spec = checkpoint_info(teacher_checkpoint).spec
    student = student_settings(settings, teacher_spec)
    spec = _spec(student, target)
    warm_start = (spec.architecture, spec.encoder) == (teacher_spec.architecture, teacher_spec.encoder)
    tracking = run.tracking
    extra = (
        [str(resolve_model_checkpoint(ref, tracking)) for ref in settings.kd.extra_teachers]
        if tracking
        else [str(Path(ref)) for ref in settings.kd.extra_teachers]
    )
    job = StageJob(
        stage="kd",
        settings=settings.replace(model=student),
        target=target,
        sources=[TrainingSource(shards=target, splits=["train"])],
        checkpoint_dir=str(run.checkpoint_dir),
        spec=spec,
        init_checkpoint=str(teacher_checkpoint) if warm_start else None,
        teachers=[str(teacher_checkpoint), *extra],
        tracking=tracking,
        run_tags=dict(run.run_tags),
        register_as=run.register_as,
        resume=run.resume,
        metrics_csv=None if run.metrics_csv is None else str(run.metrics_csv),
        curve_before=[dict(epoch) for epoch in teacher_history],
    )
    return launch_stage(job, run.nproc_per_node, run.log_fn)


def distill_members(
    settings: ExtraMembersSettings,
    target: ShardSet,
    teacher: TrainedModel,
    run_for: Callable[[str], StageRun],
) -> MemberModels:
    """The extra ensemble members: one KD run of ``teacher`` per ``settings.members`` entry, each with
    its own seed and model (:meth:`ExtraMembersSettings.for_member`) and its own ``run_for(name)``
    (checkpoint folder and MLflow run). No member, no training.
    """
    return MemberModels(
        members=[
            NamedModel(
                name=variant.name,
                model=distill(settings.for_member(index), target, teacher, run_for(variant.name)),
            )
            for index, variant in enumerate(settings.members)
        ]
    )
