"""The base of every settings model, and helpers to state a field once and report errors by field.

Settings are pydantic models because Dagster's run config is pydantic too: the Dagster layer derives
its ``Config`` classes from these models mechanically (``seg_pipeline.defs.config``), so a field, its
default, its bounds and its description are written once, here, and the launchpad, YAML run configs,
the command line and the library cannot disagree. Pydantic also gives validation errors that name the
field, and a JSON round trip for the job file handed to torchrun ranks.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

SettingsT = TypeVar("SettingsT", bound="Settings")
#: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``mps``, ``cuda`` or ``cuda:<index>``.
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"


class SettingsError(ValueError):
    """Settings that cannot be used; the message names each bad field and what it got."""


class Settings(BaseModel):
    """Immutable, unknown keys refused, defaults validated like any other value."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    @classmethod
    def parse(cls: type[SettingsT], data: Mapping[str, Any] | None = None, where: str = "") -> SettingsT:
        """Validate ``data``; a :class:`SettingsError` lists each bad ``field=value: why``."""
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as error:
            raise SettingsError(format_errors(error, where or cls.__name__)) from error

    def replace(self: SettingsT, **changes: Any) -> SettingsT:
        """A validated copy with ``changes`` applied (nested settings given as dicts or models)."""
        data = self.model_dump()
        for key, value in changes.items():
            data[key] = value.model_dump() if isinstance(value, BaseModel) else value
        return type(self).parse(data)


def override(parent: type[BaseModel], name: str, default: Any) -> Any:
    """``parent``'s field ``name`` (description and bounds) with another default.

    For a stage whose default differs (the KD optimizer starts at ``lr=1e-4``): the subclass states
    only the new default, the rest of the field is not written twice.
    """
    info: FieldInfo = copy.copy(parent.model_fields[name])
    info.default = default
    info.default_factory = None
    return info


def _value_text(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def format_errors(error: ValidationError, where: str) -> str:
    """One ``<where>.<field.path>=<value>: <why>`` line per problem."""
    lines = []
    for problem in error.errors():
        path = ".".join(str(part) for part in problem["loc"])
        name = f"{where}.{path}" if where and path else (path or where)
        if problem["type"] == "extra_forbidden":
            lines.append(f"{name}: unknown setting (check the spelling)")
        elif problem["type"] == "missing":
            lines.append(f"{name}: required, but not given")
        else:
            why = str(problem["msg"]).removeprefix("Value error, ")
            lines.append(f"{name}={_value_text(problem.get('input'))}: {why}")
    return "; ".join(lines)
