"""The base of the typed values passed between pipeline steps: frozen, JSON round-trip, NaN kept."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict

ContractT = TypeVar("ContractT", bound="Contract")


class Contract(BaseModel):
    """A small immutable value one step hands to the next (paths, counts, hashes, scores).

    Stored as JSON by the Dagster IO manager, readable by a person and by any later version that
    keeps the fields. NaN scores (a class absent from truth and prediction) survive the round trip.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    def to_json(self) -> str:
        """The value as JSON text."""
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls: type[ContractT], text: str) -> ContractT:
        """Inverse of :meth:`to_json`."""
        return cls.model_validate_json(text)
