"""The Dagster config is derived from the library's settings: one field, default and description each.

Parity is checked on what users actually see: the config schema of every asset in the loaded
Definitions (what the launchpad and ``dagster job execute`` validate against), compared field by
field with the pydantic settings the library parses.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pytest
from pydantic import BaseModel

from seg_pipeline.defs.config import HIDDEN_FIELDS, dagster_config, to_settings
from seg_pipeline.defs.definitions import defs
from seg_pipeline.defs.preflight import config_classes
from seg_pipeline.settings import KDStageSettings, PretrainSettings, Settings

#: Fields that exist in the Dagster layer alone (not library settings).
DAGSTER_ONLY = {"nproc_per_node", "register_as"}
ASSETS_WITH_CONFIG = {
    "tile_headers",
    "dataset_splits",
    "tile_shards",
    "auxiliary_sources",
    "pretrained_model",
    "kd_student_model",
    "extra_members",
    "ensemble_predictions",
    "evaluation_report",
    "champion_model",
    "exported_model",
}


def _schema_fields(asset_name: str) -> dict[str, Any]:
    asset = next(a for a in defs.assets if a.op.name == asset_name)
    return asset.op.config_schema.config_type.fields


def _compare(
    settings_cls: type[Settings], default: BaseModel, fields: dict[str, Any], where: str
) -> list[str]:
    problems = []
    for name, info in settings_cls.model_fields.items():
        path = f"{where}.{name}"
        if (settings_cls, name) in HIDDEN_FIELDS:
            continue
        if name not in fields:
            problems.append(f"{path}: not in the Dagster config")
            continue
        field = fields[name]
        if field.description != info.description:
            problems.append(f"{path}: description {field.description!r} != {info.description!r}")
        value = getattr(default, name)
        if isinstance(value, BaseModel):
            problems += _compare(type(value), value, field.config_type.fields, path)
            expected: Any = value.model_dump()
        else:
            expected = value.model_dump() if isinstance(value, BaseModel) else value
        shown = field.default_value if field.default_provided else None
        if shown != expected and not (expected is None and not field.default_provided):
            problems.append(f"{path}: launchpad default {shown!r} != library default {expected!r}")
    return problems


def test_every_asset_config_is_derived_from_its_settings() -> None:
    classes = config_classes(defs)
    assert set(classes) == ASSETS_WITH_CONFIG
    for asset_name, config_cls in classes.items():
        settings_cls = config_cls.__settings_class__  # type: ignore[attr-defined]
        assert issubclass(settings_cls, Settings), asset_name
        extra = set(config_cls.model_fields) - set(settings_cls.model_fields)
        assert extra <= DAGSTER_ONLY, (asset_name, extra)


@pytest.mark.parametrize("asset_name", sorted(ASSETS_WITH_CONFIG))
def test_the_launchpad_shows_every_library_field_with_its_default_and_description(asset_name: str) -> None:
    settings_cls = config_classes(defs)[asset_name].__settings_class__  # type: ignore[attr-defined]
    problems = _compare(settings_cls, settings_cls(), _schema_fields(asset_name), asset_name)
    assert problems == []


def test_the_hidden_list_is_short_and_explained() -> None:
    assert len(HIDDEN_FIELDS) <= 5 and all(reason for reason in HIDDEN_FIELDS.values())


def test_stage_defaults_that_differ_stay_different_in_the_launchpad() -> None:
    """KD starts at lr 1e-4 and runs 25 epochs; pretraining 3e-4 and 50: both visible as such."""
    pre, kd = _schema_fields("pretrained_model"), _schema_fields("kd_student_model")
    assert pre["optimizer"].default_value["lr"] == PretrainSettings().optimizer.lr == 3e-4
    assert kd["optimizer"].default_value["lr"] == KDStageSettings().optimizer.lr == 1e-4
    assert kd["loop"].config_type.fields["epochs"].default_value == KDStageSettings().loop.epochs == 25
    # A partial override keeps the stage's other defaults (Dagster fills them from the derived schema).
    job = defs.resolve_job_def("train_job")
    resolved = dg.validate_run_config(
        job, {"ops": {"kd_student_model": {"config": {"optimizer": {"name": "sgd"}}}}}
    )
    assert resolved["ops"]["kd_student_model"]["config"]["optimizer"]["lr"] == 1e-4


def test_a_config_round_trips_to_the_library_settings() -> None:
    config_cls = dagster_config(KDStageSettings, name="RoundTrip")
    config = config_cls(loop={"epochs": 3}, kd={"alpha": 0.5})
    settings = to_settings(config, KDStageSettings)
    assert isinstance(settings, KDStageSettings)
    assert (settings.loop.epochs, settings.kd.alpha, settings.optimizer.lr) == (3, 0.5, 1e-4)
