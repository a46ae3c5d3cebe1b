"""The run config every job starts from: the CPU demo settings, written out field by field.

Jobs carry it as their default run config, so the launchpad opens on it (every setting visible,
those whose default is ``null`` included, each editable), and the schedule and the sensor run on
it instead of the library defaults (sized for a GPU). ``SEG_PIPELINE_RUN_CONFIG=path.yaml`` makes
another run config the default; a run launched with its own config (``dagster job execute -c``)
uses that config alone, as Dagster always does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from pydantic import ValidationError

from seg_pipeline.defs.preflight import config_class
from seg_pipeline.settings import format_errors

PRESET_ENV = "SEG_PIPELINE_RUN_CONFIG"
DEMO_PRESET = Path(__file__).resolve().parents[1] / "presets" / "demo.yaml"


def preset_path() -> Path:
    """``$SEG_PIPELINE_RUN_CONFIG`` when set, else the demo preset."""
    return Path(os.environ.get(PRESET_ENV) or DEMO_PRESET)


def read_preset(path: Path) -> dict[str, Any]:
    """The ``ops`` section of a run-config YAML, with a message naming the file when it is unusable."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{PRESET_ENV}: cannot read run config {path}: {error}") from error
    ops = loaded.get("ops") if isinstance(loaded, Mapping) else None
    if not isinstance(ops, Mapping):
        raise ValueError(f"{path}: a run config needs an 'ops:' mapping (see configs/demo.yaml)")
    return dict(ops)


def job_run_config(
    assets: Iterable[dg.AssetsDefinition], groups: Iterable[str], path: Path
) -> dict[str, Any]:
    """The full run config of the assets in ``groups``: every field, the preset's value or the default."""
    ops = read_preset(path)
    wanted = set(groups)
    full: dict[str, Any] = {}
    for asset in assets:
        config_cls = config_class(asset)
        if config_cls is None or not wanted & set(asset.group_names_by_key.values()):
            continue
        entry = ops.get(asset.op.name) or {}
        try:
            config = config_cls(**(entry.get("config") or {}))
        except ValidationError as error:
            raise ValueError(f"{path}: {format_errors(error, asset.op.name)}") from error
        full[asset.op.name] = {"config": config.model_dump()}
    return {"ops": full}
