"""The one typed schema of every component's settings (pydantic); the Dagster config derives from it.

One module per stage of the pipeline: ``data`` (ingest), ``training``, ``inference``, ``evaluation``.
"""

from seg_pipeline.settings.base import Settings, SettingsError, format_errors, override
from seg_pipeline.settings.data import (
    AuxDatasetSettings,
    AuxiliarySettings,
    DatasetSettings,
    ShardSettings,
    SplitSettings,
)
from seg_pipeline.settings.evaluation import ChampionSettings, EvaluationSettings
from seg_pipeline.settings.inference import PredictSettings, TTASettings, WindowSettings
from seg_pipeline.settings.training import (
    AugmentSettings,
    DistillSettings,
    KDStageSettings,
    LoaderSettings,
    LoopSettings,
    LossSettings,
    ModelSettings,
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
    "KDStageSettings",
    "LoaderSettings",
    "LoopSettings",
    "LossSettings",
    "ModelSettings",
    "OptimizerSettings",
    "PredictSettings",
    "PretrainSettings",
    "SchedulerSettings",
    "Settings",
    "SettingsError",
    "ShardSettings",
    "SplitSettings",
    "StageSettings",
    "TTASettings",
    "WindowSettings",
    "format_errors",
    "override",
]
