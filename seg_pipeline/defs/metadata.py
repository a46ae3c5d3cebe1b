"""Turn library results into Dagster metadata: tables, pictures, links, rounded numbers."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

_TYPES = {bool: "bool", int: "int", float: "float"}
#: Decimals shown for scores and shares (a 0.4325341730966898 helps nobody).
DIGITS = 4


def rounded(value: float | None, digits: int = DIGITS) -> float | None:
    """``value`` rounded for display; None and NaN stay None (shown as empty, not as 'None')."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return round(float(value), digits)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return rounded(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> dg.MetadataValue:
    """A Dagster table from a list of flat dicts (column types taken from the first row)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    first = rows[0] if rows else {}
    schema = dg.TableSchema(
        columns=[dg.TableColumn(c, _TYPES.get(type(first.get(c)), "string")) for c in columns]
    )
    records = [dg.TableRecord({c: _cell(row.get(c)) for c in columns}) for row in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def type_name(type_: Any) -> str:
    """A pyarrow type as a short name (``list<int64>``, not ``list<item: int64>``)."""
    value_type = getattr(type_, "value_type", None)
    return f"list<{type_name(value_type)}>" if value_type is not None else str(type_)


def column_schema(schema: Any) -> dg.TableSchema:
    """A parquet schema (``pyarrow.Schema``) as Dagster's column schema, descriptions from field metadata."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                field.name,
                type_name(field.type),
                description=(field.metadata or {}).get(b"description", b"").decode() or None,
            )
            for field in schema
        ]
    )


#: Dagster's asset pages show markdown metadata inline only below this many characters (longer
#: markdown hides behind "[Show Markdown]"): a picture served by URL fits, an embedded PNG never does.
INLINE_MARKDOWN_CHARS = 1000


def picture(path: Path | str | None, url: str | None = None) -> dg.MetadataValue | None:
    """A PNG as markdown: by ``url`` when one serves it (its copy in the MLflow run, shown inline on the
    asset page while the MLflow UI runs), else embedded (one click away); None when there is no file.
    """
    if path is None or not Path(path).is_file():
        return None
    name = Path(path).stem.replace("_", " ")
    if url:
        inline = f"![{name} (served by the MLflow UI: make mlflow-ui)]({url})"
        if len(inline) < INLINE_MARKDOWN_CHARS:
            return dg.MetadataValue.md(inline)
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{name}](data:image/png;base64,{encoded})")


def link(url: str | None) -> dg.MetadataValue | str:
    """A clickable URL for http(s) addresses, else the text itself."""
    if url and url.startswith(("http://", "https://")):
        return dg.MetadataValue.url(url)
    return url or ""


def without_none(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata with empty entries left out, so the UI never shows 'None'."""
    return {key: value for key, value in metadata.items() if value is not None}
