"""Run configs from files and the command line: config groups merged in order, then ``key=value``.

Seed 004 composes its config from groups (``data: dataloader/default``, ``model: architectures/unet``)
and overrides any value on the command line (``training.optimizer.lr=0.0005``); seed 001 passes
``training.epochs=200 optimizer.lr=0.0001`` after ``--config``. Here a run is one or more YAML files
merged left to right (later files win, mappings merge key by key, lists are replaced), then dotted
overrides, whose values are read as YAML (``3`` is an int, ``[0.75, 1.0]`` a list, ``null`` None).
The result is validated by the settings themselves, so a bad key or value is reported with its
dotted field name before anything runs.

A file may be a Dagster run config (``ops: {pretrained_model: {config: ...}}``, what ``dagster job
execute -c`` takes) or the settings of one section directly: :func:`section` reads either.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from seg_pipeline.settings.base import SettingsError


def read_yaml(path: Path | str) -> dict[str, Any]:
    """A YAML mapping from ``path``; an empty file is ``{}``, anything but a mapping is an error."""
    source = Path(path)
    if not source.is_file():
        raise SettingsError(f"{source}: config file does not exist")
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as error:
        raise SettingsError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{source}: a config file holds a mapping of settings, not {type(data).__name__}")
    return data


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in: nested mappings key by key, every other value replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"loop.epochs=3"`` -> ``(["loop", "epochs"], 3)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(part.strip() for part in path):
        raise SettingsError(f"override {text!r}: write key=value with a dotted key, e.g. loop.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise SettingsError(f"override {text!r}: the value is not valid YAML: {error}") from None
    return [part.strip() for part in path], value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``data`` with each ``key=value`` applied in order (intermediate mappings are created)."""
    result = copy.deepcopy(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise SettingsError(
                    f"override {text!r}: {where} is a value ({child!r}), not a group of settings"
                )
            node = child
        node[path[-1]] = value
    return result


def compose(files: Sequence[Path | str], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The files merged left to right, then the overrides."""
    data: dict[str, Any] = {}
    for path in files:
        data = merge(data, read_yaml(path))
    return apply_overrides(data, overrides)


def section(config: Mapping[str, Any], op: str) -> dict[str, Any]:
    """The settings of asset ``op`` in a Dagster run config (``ops.<op>.config``); ``{}`` if absent.

    A config without an ``ops`` key is taken as the settings themselves.
    """
    if "ops" not in config:
        return dict(config)
    ops = config["ops"] or {}
    entry = ops.get(op) or {}
    if not isinstance(entry, Mapping):
        raise SettingsError(f"ops.{op}: expected a mapping with a 'config' key")
    return dict(entry.get("config") or {})
