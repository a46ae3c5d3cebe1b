"""Helpers that turn library results into Dagster metadata values (tables, markdown)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

_TYPES = {bool: "bool", int: "int", float: "float"}


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> dg.MetadataValue:
    """A Dagster table from a list of flat dicts (column types taken from the first row)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    first = rows[0] if rows else {}
    schema = dg.TableSchema(
        columns=[dg.TableColumn(c, _TYPES.get(type(first.get(c)), "string")) for c in columns]
    )
    records = [dg.TableRecord({c: _cell(row.get(c)) for c in columns}) for row in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
