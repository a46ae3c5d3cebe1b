"""What the ingest steps hand on: the catalog of a dataset, its split table, its shards."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import Field

from seg_pipeline.contracts.base import Contract


def class_ids(field: str, names: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """The ids of class ``names``; a name that is not a class is an error naming ``field``."""
    unknown = [name for name in names if name not in class_names]
    if unknown:
        raise ValueError(
            f"{field}: {unknown} are not classes of the dataset; its classes are {list(class_names)}"
        )
    return [list(class_names).index(name) for name in names]


def positive_ids(named: list[int], num_classes: int) -> list[int]:
    """The foreground class ids: those named, else every class after the first (seed 003's rule)."""
    return list(named) if named else list(range(1, num_classes))


class BandStatistics(Contract):
    """Per-band mean and standard deviation of the valid pixels: the normalisation a model trains with."""

    mean: list[float]
    std: list[float]


class Catalog(Contract):
    """A dataset's header catalog and what every later step must know about its tiles.

    ``class_names``, ``ignore_index``, ``bands`` and ``normalization`` are set once, at ingest, and
    reach training, prediction and evaluation through this value, never re-typed.
    """

    dataset_id: str
    raw_dir: str
    catalog_path: str
    quarantine_path: str
    class_names: list[str]
    ignore_index: int
    class_colors: list[list[int]] = Field(
        default_factory=list,
        description="Display colour [r, g, b] of each class by id, resolved at ingest ([] = by class name).",
    )
    mask_values: dict[int, int] = Field(
        default_factory=dict, description="Raw mask value -> class id applied at ingest ({} = none)."
    )
    positive_classes: list[int] = Field(
        default_factory=list,
        description="Foreground class ids pooled in validation and the report ([] = all after the first).",
    )
    bands: int | None = Field(description="Band count of the valid tiles (None when none is valid).")
    normalization: BandStatistics | None
    n_tiles: int
    n_ok: int
    n_labeled: int
    n_quarantined: int
    quarantine_limit: float = Field(description="Largest quarantined share the blocking check accepts.")
    content_hash: str
    warnings: list[str] = Field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of classes (model outputs)."""
        return len(self.class_names)

    @property
    def positive_ids(self) -> list[int]:
        """``positive_classes``, or every class after the first when none were named."""
        return positive_ids(self.positive_classes, self.num_classes)


class SplitTable(Contract):
    """The split table of one dataset: where it is and how many tiles each split holds."""

    dataset_id: str
    splits_path: str
    counts: dict[str, int]
    policy: str
    seed: int
    grouped: bool
    content_hash: str
    pictures: dict[str, str] = Field(
        default_factory=dict, description="Picture name (footprints, class_shares) -> PNG beside the table."
    )


class ShardSet(Contract):
    """Training-ready shards of one dataset, with the catalog and split table they were cut from."""

    dataset_id: str
    dataset_dir: str
    manifest_path: str
    catalog: Catalog
    splits: SplitTable
    items: dict[str, int] = Field(description="Tiles per split in the shards.")
    tile_format: str
    data_version: str

    @property
    def path(self) -> Path:
        """``<processed>/<dataset>``: the folder holding the manifest and the split folders."""
        return Path(self.dataset_dir)


class AuxiliarySet(Contract):
    """The auxiliary sources of stage 1, each sharded like the target; may be empty."""

    sources: list[ShardSet] = Field(default_factory=list)
    data_version: str
