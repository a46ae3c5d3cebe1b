"""Check every asset's run config when a run starts, before any step does work.

Dagster checks types and unknown keys at launch, but bounds and cross-field rules (``overlap <
window``, ``lr > 0``) live in the settings' validators, which would otherwise run only when each
step starts: a bad prediction setting would fail after both training stages had run. The storage
resource calls :func:`check_run_config` while the run initialises its resources.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

import dagster as dg
from pydantic import ValidationError

from seg_pipeline.defs.config import to_settings
from seg_pipeline.settings import SettingsError, format_errors


def config_class(asset: dg.AssetsDefinition) -> type[dg.Config] | None:
    """The class of an asset's ``config`` parameter (None for assets without settings)."""
    function = getattr(getattr(getattr(asset, "op", None), "compute_fn", None), "decorated_fn", None)
    hint = typing.get_type_hints(function).get("config") if function is not None else None
    return hint if isinstance(hint, type) and issubclass(hint, dg.Config) else None


def config_classes(definitions: dg.Definitions) -> dict[str, type[dg.Config]]:
    """The ``config`` parameter's class of every asset, by asset (op) name."""
    classes: dict[str, type[dg.Config]] = {}
    for asset in definitions.assets or []:
        if isinstance(asset, dg.AssetsDefinition) and (found := config_class(asset)) is not None:
            classes[asset.op.name] = found
    return classes


def run_config_problems(run_config: Mapping[str, Any], classes: Mapping[str, type[dg.Config]]) -> list[str]:
    """One ``asset.field=value: why`` line per setting of ``run_config`` that its schema refuses."""
    problems = []
    for op_name, entry in (run_config.get("ops") or {}).items():
        config_cls = classes.get(op_name)
        if config_cls is None or not isinstance(entry, Mapping):
            continue
        try:
            config = config_cls(**(entry.get("config") or {}))
        except ValidationError as error:
            problems.append(format_errors(error, op_name))
            continue
        # The library schema holds the validators a Dagster config class cannot carry (dataset ids,
        # cross-field rules of nested settings): parse it too, as the step will.
        settings_cls = getattr(config_cls, "__settings_class__", None)
        if settings_cls is not None:
            try:
                to_settings(config, settings_cls, op_name)
            except SettingsError as error:
                problems.append(str(error))
    return problems


def check_run_config(run_config: Mapping[str, Any]) -> None:
    """Raise :class:`SettingsError` listing every bad setting of the run (all assets, all at once)."""
    from seg_pipeline.defs.definitions import defs  # the resource is built before this module is

    problems = run_config_problems(run_config, config_classes(defs))
    if problems:
        raise SettingsError("the run config has settings no step can use: " + "; ".join(problems))
