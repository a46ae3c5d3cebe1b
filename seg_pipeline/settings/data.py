"""Settings of the ingest steps: which dataset, how to split it, how to shard it, which auxiliary sources."""

from __future__ import annotations

import math
import re
from typing import Literal, Self

from pydantic import Field, ValidationInfo, field_validator, model_validator

from seg_pipeline.settings.base import Settings, override

#: A dataset id names folders, so it must not climb out of the data root or hide.
DATASET_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
SplitPolicy = Literal["v0", "supervised", "fixed"]
TileFormat = Literal["tif", "npy"]


def check_dataset_id(value: str) -> str:
    """Refuse ids that are not a plain folder name (``..``, ``/``, absolute paths, hidden names)."""
    if not re.fullmatch(DATASET_ID_PATTERN, value) or value in (".", ".."):
        raise ValueError(
            "use letters, digits, '_', '-' or '.' (it names a folder under the data root, so no '/', '..' "
            "or absolute paths)"
        )
    return value


class DatasetSettings(Settings):
    """Which dataset to catalogue and how to validate its tiles."""

    dataset_id: str = Field(
        default="demo",
        description="Dataset name: tiles in data_root/raw/NAME, outputs in data_root/processed/NAME",
    )
    raw_dir: str | None = Field(
        default=None, description="Override the raw folder (absolute, or relative to the working directory)."
    )
    images_glob: str | None = Field(
        default=None, description="Glob for images relative to the raw folder, e.g. 'chips/*.tif'."
    )
    masks_glob: str | None = Field(
        default=None, description="Glob for masks relative to the raw folder; pairs with images by stem."
    )
    class_names: list[str] = Field(
        default=[], description="Class names by id; empty = read classes.txt in the raw folder."
    )
    ignore_index: int = Field(
        default=255, ge=0, le=65535, description="Mask value meaning 'not labelled' (no loss, not scored)."
    )
    mask_values: dict[int, int] | None = Field(
        default=None,
        description="Raw mask value -> class id (or the ignore value), e.g. {255: 1} for 0/255 masks; "
        "unlisted values are class ids. null = detect: binary masks holding only 0 and 255 get {255: 1}.",
    )
    mask_colors: dict[str, list[int]] = Field(
        default={},
        description="Colour-coded RGB masks: class name -> [r, g, b] (as many public datasets ship); "
        "pixels are recoded to the class ids.",
    )
    class_colors: dict[str, list[int]] = Field(
        default={},
        description="Display colours of classes in outputs (GeoTIFF colour table, QGIS style, previews): "
        "class name -> [r, g, b]. Classes not named here take a '#rrggbb' after their name in classes.txt, "
        "then their mask_colors colour, then the remote-sensing palette by name (water blue, vegetation "
        "green, building red, bare soil brown, ...).",
    )
    positive_classes: list[str] = Field(
        default=[],
        description="Foreground classes pooled into one (seed 003's fire IoU of every fire grade): the "
        "pooled IoU/Dice/precision/recall and patch detection in validation and the report; empty = every "
        "class after the first.",
    )
    expected_bands: int | None = Field(
        default=None, ge=1, description="Band count every image must have; null = the majority count."
    )
    incremental: bool = Field(
        default=True, description="Reuse catalog rows of files whose size and mtime did not change."
    )
    verify_checksums: bool = Field(
        default=False,
        description="Incremental rebuilds also compare sha256 checksums: catches in-place edits that keep "
        "size and mtime (reads every file once more).",
    )
    max_quarantine_fraction: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Blocking check: fail when more than this share of the tiles is quarantined.",
    )

    _check_id = field_validator("dataset_id")(check_dataset_id)

    @field_validator("mask_colors", "class_colors")
    @classmethod
    def _rgb_triplets(cls, value: dict[str, list[int]], info: ValidationInfo) -> dict[str, list[int]]:
        for name, rgb in value.items():
            if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
                raise ValueError(f"{info.field_name}[{name!r}]={rgb}: give [r, g, b] with values 0..255")
        return value

    @model_validator(mode="after")
    def _globs_together(self) -> Self:
        if self.masks_glob and not self.images_glob:
            raise ValueError("masks_glob is set but images_glob is not: set both or neither")
        return self


class SplitSettings(Settings):
    """How tiles are assigned to splits: a pure function of (item or spatial group, seed, policy)."""

    policy: SplitPolicy = Field(
        default="supervised",
        description="v0 (labeled: metrics_train/train/val; unlabeled: train), supervised (train/val/test by "
        "fractions; unlabeled: unlabeled) or fixed (the train|val|test folder a tile came from).",
    )
    seed: int = Field(
        default=0, ge=0, description="Hash salt: the same seed gives the same split, byte for byte."
    )
    metrics_fraction: float = Field(
        default=0.25, ge=0.0, le=1.0, description="v0: share of labeled tiles in metrics_train."
    )
    v0_train_fraction: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="v0: share of labeled tiles in train (the stages train on labels); the rest is val.",
    )
    train_fraction: float = Field(
        default=0.7, ge=0.0, le=1.0, description="supervised: share of labeled tiles in train."
    )
    val_fraction: float = Field(default=0.15, ge=0.0, le=1.0, description="supervised: share in val.")
    test_fraction: float = Field(default=0.15, ge=0.0, le=1.0, description="supervised: share in test.")
    group_block_size: float | None = Field(
        default=None,
        gt=0.0,
        description="Spatial grouping block in CRS units (e.g. 256.0 metres): tiles whose centres share a "
        "block share a split. null = off.",
    )
    group_footprints: bool = Field(
        default=False,
        description="Tiles whose ground footprints overlap (same CRS, any units, any resolution) share a "
        "split: stops leakage between zoom levels and overlapping chips.",
    )
    unassigned_split: str | None = Field(
        default=None,
        description="fixed: split of tiles outside any train/val/test folder (e.g. train for chips/ beside "
        "val-chips/); null = refuse them.",
    )

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> Self:
        if self.metrics_fraction + self.v0_train_fraction > 1.0 + 1e-6:
            raise ValueError(
                f"metrics_fraction {self.metrics_fraction} + v0_train_fraction {self.v0_train_fraction} "
                "exceed 1: lower one of them (val gets the rest)"
            )
        fractions = (self.train_fraction, self.val_fraction, self.test_fraction)
        if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            raise ValueError(
                f"train/val/test fractions {fractions} must sum to 1 (they sum to {sum(fractions):.3f})"
            )
        return self


class ShardSettings(Settings):
    """How splits are cut into shards."""

    max_items_per_shard: int = Field(default=256, ge=1, description="Upper bound on tiles per shard.")
    max_shard_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1,
        description="Upper bound on source bytes per shard (a single larger tile gets a shard of its own).",
    )
    tile_format: TileFormat = Field(
        default="tif",
        description="tif keeps GeoTIFFs (georeferenced, readable by any GIS); npy stores raw arrays, "
        "several times faster to load for training.",
    )


class AuxDatasetSettings(Settings):
    """One auxiliary source, catalogued, split and sharded like the target; its classes stay its own."""

    dataset_id: str = Field(description="Dataset name; raw tiles in data_root/raw/dataset_id.")
    raw_dir: str | None = override(DatasetSettings, "raw_dir", None)
    class_names: list[str] = override(DatasetSettings, "class_names", [])
    ignore_index: int = override(DatasetSettings, "ignore_index", 255)
    mask_values: dict[int, int] | None = override(DatasetSettings, "mask_values", None)

    _check_id = field_validator("dataset_id")(check_dataset_id)

    def as_dataset(self) -> DatasetSettings:
        """The same source as target-style dataset settings (for the shared catalogue step)."""
        return DatasetSettings(
            dataset_id=self.dataset_id,
            raw_dir=self.raw_dir,
            class_names=self.class_names,
            ignore_index=self.ignore_index,
            mask_values=self.mask_values,
        )


class AuxiliarySettings(Settings):
    """Auxiliary sources for stage-1 pretraining; an empty list trains on the target alone."""

    datasets: list[AuxDatasetSettings] = Field(
        default=[],
        description="Auxiliary datasets; masks are remapped to the target classes at training time.",
    )
    split_seed: int = Field(default=0, ge=0, description="Hash salt of the auxiliary train/val split.")
    val_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Share of labeled auxiliary tiles held out as auxiliary val."
    )
    max_quarantine_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Blocking check per source, as for the target."
    )
    shards: ShardSettings = Field(
        default_factory=ShardSettings, description="How auxiliary splits are sharded."
    )

    def split(self) -> SplitSettings:
        """The auxiliary split: supervised train/val, no test (the target's test split is what counts)."""
        return SplitSettings(
            policy="supervised",
            seed=self.split_seed,
            train_fraction=1.0 - self.val_fraction,
            val_fraction=self.val_fraction,
            test_fraction=0.0,
        )
