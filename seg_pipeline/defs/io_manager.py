"""Stores the typed values assets pass to each other as readable JSON, not pickle.

Built on Dagster's own ``UPathIOManager`` (paths per asset key, partitions, any fsspec store), so
only the (de)serialisation is ours: a value is written as ``{"type": <contract name>, "value": ...}``
and read back through :data:`seg_pipeline.contracts.CONTRACT_TYPES` only, so a stored file can
never name an arbitrary class to import. Files live under the instance's storage folder
(``$DAGSTER_HOME/storage/<asset>.json``) unless ``base_dir`` says otherwise.
"""

from __future__ import annotations

import json
from typing import Any

import dagster as dg
from upath import UPath

from seg_pipeline.contracts import CONTRACT_TYPES, Contract
from seg_pipeline.io import atomic_write


class ContractJsonIOManager(dg.UPathIOManager):
    """Reads and writes :class:`~seg_pipeline.contracts.Contract` values as JSON files."""

    extension: str = ".json"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        """Write ``obj`` (a contract, or None for assets that return nothing) as JSON, atomically."""
        if obj is None:
            return
        if not isinstance(obj, Contract):
            raise TypeError(
                f"{context.asset_key.to_user_string() if context.has_asset_key else context.name} returned "
                f"a {type(obj).__name__}; assets of this project return seg_pipeline.contracts values"
            )
        payload = json.dumps({"type": type(obj).__name__, "value": json.loads(obj.to_json())}, indent=2)
        with atomic_write(path) as tmp:  # type: ignore[arg-type]
            tmp.write_text(payload + "\n")

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        """Read a contract written by :meth:`dump_to_path`, checked against the input's annotation."""
        stored = json.loads(path.read_text())
        cls = CONTRACT_TYPES.get(stored.get("type", ""))
        if cls is None:
            raise TypeError(f"{path}: holds {stored.get('type')!r}, not a seg_pipeline contract type")
        expected = context.dagster_type.typing_type if context.dagster_type else None
        if isinstance(expected, type) and issubclass(expected, Contract) and not issubclass(cls, expected):
            raise TypeError(f"{path}: holds a {cls.__name__} but {context.name} expects {expected.__name__}")
        return cls.model_validate(stored["value"])


class ContractIOManager(dg.ConfigurableIOManagerFactory):
    """JSON storage of asset values; ``base_dir`` empty = the Dagster instance's storage folder."""

    base_dir: str = ""

    def create_io_manager(self, context: dg.InitResourceContext) -> ContractJsonIOManager:
        """The IO manager rooted at ``base_dir`` or ``<instance storage>``."""
        base = self.base_dir or (context.instance.storage_directory() if context.instance else "storage")
        return ContractJsonIOManager(base_path=UPath(base))
