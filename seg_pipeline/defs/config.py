"""Dagster ``Config`` classes derived from the library's settings, so every setting is written once.

:func:`dagster_config` turns a :class:`~seg_pipeline.settings.Settings` model into a ``dg.Config``
class with the same fields, defaults, bounds and descriptions (nested settings become nested config
classes); :func:`to_settings` turns a config back into the library's settings. Only knobs that exist
in the Dagster layer alone (``nproc_per_node``, ``register_as``) come from a real ``dg.Config`` ``base``.
"""

from __future__ import annotations

import copy
import types
import typing
from functools import cache
from typing import Any, TypeVar

import dagster as dg
from pydantic import create_model
from pydantic.fields import FieldInfo

from seg_pipeline.settings import DatasetSettings, Settings

SettingsT = TypeVar("SettingsT", bound=Settings)

#: Library fields the launchpad does not show, with the reason (a short, explicit list).
HIDDEN_FIELDS: dict[tuple[type[Settings], str], str] = {
    (DatasetSettings, "dataset_id"): "the dataset is the run's partition key (seg_pipeline.defs.partitions)",
}


@cache
def _derived(settings_cls: type[Settings]) -> type[dg.Config]:
    return dagster_config(settings_cls)


def _convert_annotation(annotation: Any) -> Any:
    """The same type with every Settings model replaced by its derived Config class."""
    if isinstance(annotation, type) and issubclass(annotation, Settings):
        return _derived(annotation)
    origin = typing.get_origin(annotation)
    if origin is None:
        return annotation
    args = tuple(_convert_annotation(arg) for arg in typing.get_args(annotation))
    if origin in (types.UnionType, typing.Union):
        return typing.Union[args]  # noqa: UP007  (rebuilt from parts)
    return origin[args] if origin is not typing.Literal else annotation


def _convert_default(value: Any) -> Any:
    if isinstance(value, Settings):
        return _derived(type(value))(**value.model_dump())
    return value


def _convert_field(info: FieldInfo) -> FieldInfo:
    converted = copy.copy(info)
    if info.default_factory is not None:
        factory = info.default_factory

        def make() -> Any:
            return _convert_default(factory())  # type: ignore[call-arg]

        converted.default_factory = make
    else:
        converted.default = _convert_default(info.default)
    return converted


def dagster_config(
    settings_cls: type[Settings],
    *,
    name: str | None = None,
    base: type[dg.Config] = dg.Config,
) -> type[dg.Config]:
    """A ``dg.Config`` class with ``settings_cls``'s fields on top of ``base`` (Dagster-only fields)."""
    fields: dict[str, Any] = {}
    for field_name, info in settings_cls.model_fields.items():
        if (settings_cls, field_name) in HIDDEN_FIELDS:
            continue
        fields[field_name] = (_convert_annotation(info.annotation), _convert_field(info))
    config_cls: type[dg.Config] = create_model(
        name or f"{settings_cls.__name__.removesuffix('Settings')}Config",
        __base__=base,
        __doc__=settings_cls.__doc__,
        __module__=__name__,
        **fields,
    )
    config_cls.__settings_class__ = settings_cls  # type: ignore[attr-defined]
    return config_cls


def to_settings(config: dg.Config, settings_cls: type[SettingsT], where: str = "", **given: Any) -> SettingsT:
    """The library settings a Dagster config holds (Dagster-only fields left out), plus the ``given``
    fields the run supplies itself (a hidden field such as the dataset id, which is the partition key).
    """
    data = config.model_dump()
    known = settings_cls.model_fields
    return settings_cls.parse({**{k: v for k, v in data.items() if k in known}, **given}, where)
