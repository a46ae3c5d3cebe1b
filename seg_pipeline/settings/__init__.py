"""The one typed schema of every component's settings (pydantic); the Dagster config derives from it.

One module per part of the pipeline: ``data`` (ingest), ``models``, ``batches`` (patches, loading,
augmentation), ``training``, ``inference``, ``evaluation``, ``export``.
"""

from seg_pipeline.settings.base import Settings, SettingsError, format_errors, override
from seg_pipeline.settings.batches import AugmentSettings, LoaderSettings, PatchSettings
from seg_pipeline.settings.data import (
    AuxDatasetSettings,
    AuxiliarySettings,
    DatasetSettings,
    ShardSettings,
    SplitSettings,
)
from seg_pipeline.settings.evaluation import ChampionSettings, EvaluationSettings, ScoringSettings
from seg_pipeline.settings.export import ExportSettings
from seg_pipeline.settings.inference import (
    PredictSettings,
    TTASettings,
    TuningSettings,
    ValidationSettings,
    WindowSettings,
)
from seg_pipeline.settings.models import ModelSettings, ModelSpec
from seg_pipeline.settings.training import (
    DistillSettings,
    ExtraMembersSettings,
    KDStageSettings,
    LoopSettings,
    LossSettings,
    MemberVariant,
    OptimizerSettings,
    PretrainSettings,
    SchedulerSettings,
    StageSettings,
)

__all__ = [
    "AugmentSettings",
    "AuxDatasetSettings",
    "AuxiliarySettings",
    "ChampionSettings",
    "DatasetSettings",
    "DistillSettings",
    "EvaluationSettings",
    "ExportSettings",
    "ExtraMembersSettings",
    "KDStageSettings",
    "LoaderSettings",
    "LoopSettings",
    "LossSettings",
    "MemberVariant",
    "ModelSettings",
    "ModelSpec",
    "OptimizerSettings",
    "PatchSettings",
    "PredictSettings",
    "PretrainSettings",
    "SchedulerSettings",
    "ScoringSettings",
    "Settings",
    "SettingsError",
    "ShardSettings",
    "SplitSettings",
    "StageSettings",
    "TTASettings",
    "TuningSettings",
    "ValidationSettings",
    "WindowSettings",
    "format_errors",
    "override",
]
