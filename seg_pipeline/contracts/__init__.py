"""Typed values passed between pipeline steps (and stored as JSON by the Dagster IO manager).

Each step of the pipeline returns one of these small frozen values and the next step receives it:
paths, counts, hashes, scores, never "the newest file on disk" and never a ``dict[str, Any]``.
"""

from seg_pipeline.contracts.base import Contract
from seg_pipeline.contracts.data import AuxiliarySet, BandStatistics, Catalog, ShardSet, SplitTable
from seg_pipeline.contracts.models import (
    ExportedModel,
    MemberModels,
    NamedModel,
    TrackingRecord,
    TrainedModel,
)
from seg_pipeline.contracts.predictions import (
    ENSEMBLE,
    ChampionDecision,
    ClassDelta,
    DeployableModel,
    DeployedMember,
    EnsembleMember,
    EnsembleTuning,
    EvaluationReport,
    ModelScores,
    PredictionItem,
    PredictionSet,
)

#: Every contract type by name: the IO manager resolves stored values through this table only.
CONTRACT_TYPES: dict[str, type[Contract]] = {
    cls.__name__: cls
    for cls in (
        AuxiliarySet,
        BandStatistics,
        Catalog,
        ChampionDecision,
        ClassDelta,
        DeployableModel,
        DeployedMember,
        EnsembleMember,
        EnsembleTuning,
        EvaluationReport,
        ExportedModel,
        MemberModels,
        ModelScores,
        NamedModel,
        PredictionItem,
        PredictionSet,
        ShardSet,
        SplitTable,
        TrackingRecord,
        TrainedModel,
    )
}

__all__ = [
    "CONTRACT_TYPES",
    "ENSEMBLE",
    "AuxiliarySet",
    "BandStatistics",
    "Catalog",
    "ChampionDecision",
    "ClassDelta",
    "Contract",
    "DeployableModel",
    "DeployedMember",
    "EnsembleMember",
    "EnsembleTuning",
    "EvaluationReport",
    "ExportedModel",
    "MemberModels",
    "ModelScores",
    "NamedModel",
    "PredictionItem",
    "PredictionSet",
    "ShardSet",
    "SplitTable",
    "TrackingRecord",
    "TrainedModel",
]
