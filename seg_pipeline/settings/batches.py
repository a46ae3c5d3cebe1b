"""Settings of what a training step sees: patches of the tiles, how batches are loaded, augmentation."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from seg_pipeline.settings.base import Settings

#: Patches smaller than this would leave a stride-32 encoder a 1x1 bottleneck, and BatchNorm cannot
#: train on one value per channel (a last batch of one patch): at 64 px the map is at least 2x2.
MIN_PATCH = 64


class PatchSettings(Settings):
    """Training reads square patches, not whole tiles: tiles of any size batch together.

    Each tile gives ``ceil(height * width / size**2)`` patches per epoch (an epoch covers the data
    about once); a patch lies at a random position inside tiles larger than it and covers smaller
    tiles whole, the rest padded with ``ignore_index``.
    """

    size: int | None = Field(
        default=None,
        ge=MIN_PATCH,
        description="Patch side in pixels (also sets patches per tile); null = the median tile side of the "
        "training data rounded up to a multiple of 32, within 64..512.",
    )
    sizes: list[int] = Field(
        default=[],
        description="Patch-size schedule (seed 000: [256, 512, 1024]): patches are read at the largest and "
        "each step trains crops at one drawn size (or all, see mode); empty = size only.",
    )
    sampling: Literal["uniform", "cycle"] = Field(
        default="uniform", description="How a step picks its size: seeded uniform draw, or in turn."
    )
    mode: Literal["one_per_step", "all_per_step"] = Field(
        default="one_per_step",
        description="one_per_step: a step trains one size; all_per_step: a step trains every size (crops of "
        "the largest), each loss normalised by its own running mean.",
    )

    @field_validator("sizes")
    @classmethod
    def _large_enough(cls, value: list[int]) -> list[int]:
        if any(size < MIN_PATCH for size in value):
            raise ValueError(f"patch sizes must be >= {MIN_PATCH} (so BatchNorm always sees a 2x2 map)")
        return value


class LoaderSettings(Settings):
    """How batches are read: size, workers and the per-worker tile cache (seed 000's data knobs)."""

    batch_size: int = Field(default=8, ge=1, description="Samples per batch (per rank under DDP).")
    num_workers: int = Field(
        default=0, ge=0, description="DataLoader worker processes; 0 loads in the main process."
    )
    prefetch_factor: int = Field(
        default=2, ge=1, description="Batches prefetched per worker (or by the prefetch thread)."
    )
    persistent_workers: bool = Field(
        default=False, description="Keep workers (and their caches) across epochs."
    )
    prefetch_thread: bool | None = Field(
        default=None,
        description="With num_workers 0, read the next batches in one background thread while the "
        "model steps (same batches, same order); null = on when training on a GPU without workers, "
        "off on the CPU (its cores are busy with the step: measured slower there).",
    )
    pin_memory: bool = Field(default=False, description="Page-locked batches for faster GPU copies.")
    cache_mode: Literal["auto", "none", "lru"] = Field(
        default="auto",
        description="Per-worker cache of decoded tiles. auto: lru when the training tiles fit "
        "cache_budget_mb decoded (and workers, if any, persist), else none; the stage logs the choice.",
    )
    cache_max_items: int = Field(default=0, ge=0, description="LRU capacity per worker; 0 = unbounded.")
    cache_budget_mb: int = Field(
        default=2048,
        ge=0,
        description="cache_mode auto: the most memory the decoded training tiles may take to be cached "
        "(also at most a quarter of the memory available when the loader is built).",
    )
    rare_class_weight: float | None = Field(
        default=None,
        gt=0.0,
        description="Seed 003's --weighted-sampling --fire-weight: each epoch draws the training patches "
        "again, tiles holding a rare class this many times as often (seed 003: 5.0); null = off.",
    )
    rare_classes: list[str] = Field(
        default=[],
        description="Class names counted as rare by rare_class_weight and augment.rare_boost; empty = auto: "
        "the classes under 5 % of the labelled pixels of the stage's sources.",
    )

    @model_validator(mode="after")
    def _one_way_to_prefetch(self) -> Self:
        if self.prefetch_thread and self.num_workers > 0:
            raise ValueError(
                f"loader.prefetch_thread=true with num_workers={self.num_workers}: worker processes "
                "already prefetch (prefetch_factor); set prefetch_thread to null or false"
            )
        return self


class AugmentSettings(Settings):
    """Seeded augmentation: D4 geometry on image and mask, colour jitter and noise on the image only.

    Ranges are symmetric around 'no change'; 0 disables an op. The defaults are a light recipe.
    """

    enabled: bool = Field(default=True, description="false = tiles are only normalised.")
    hflip_p: float = Field(default=0.5, ge=0.0, le=1.0, description="Probability of a horizontal flip.")
    vflip_p: float = Field(default=0.5, ge=0.0, le=1.0, description="Probability of a vertical flip.")
    rot90: bool = Field(default=True, description="Rotate by k x 90 degrees, k uniform in 0..3.")
    scale_range: list[float] | None = Field(
        default=None, description="[low, high] zoom factors of a random scale + crop; null = off."
    )
    crop_size: int | None = Field(
        default=None, ge=1, description="Side of the random (scale +) crop; null keeps the input size."
    )
    brightness: float = Field(default=0.1, ge=0.0, lt=1.0, description="Brightness factor within 1 +/- this.")
    contrast: float = Field(default=0.1, ge=0.0, lt=1.0, description="Contrast factor within 1 +/- this.")
    saturation: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Saturation factor within 1 +/- this (RGB)."
    )
    noise_std: float = Field(
        default=0.05, ge=0.0, description="Gaussian noise sigma within [0, this], in std units."
    )
    photometric_p: float = Field(default=1.0, ge=0.0, le=1.0, description="Probability of each colour op.")
    noise_p: float = Field(default=0.5, ge=0.0, le=1.0, description="Probability of adding noise.")
    noise_bank_size: int = Field(
        default=1 << 22,
        ge=0,
        description="Standard-normal values kept per process for noise; 0 = fresh draws.",
    )
    rare_boost: float = Field(
        default=1.0,
        ge=1.0,
        description="Seed 003's fire_augment: samples whose mask holds a rare class (loader.rare_classes) "
        "get brightness, contrast, saturation and noise ranges x this (colour ranges at most 0.9); 1 = off.",
    )
    views_per_sample: int = Field(
        default=1,
        ge=1,
        le=2,
        description="Repeated augmentation (seed 000's two views): 2 = each patch is read once and trained "
        "on as two independently augmented samples, so an epoch has twice the samples; 1 = off.",
    )

    @field_validator("scale_range")
    @classmethod
    def _ordered_range(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 2 or not 0 < value[0] <= value[1]):
            raise ValueError("give [low, high] with 0 < low <= high")
        return value

    @model_validator(mode="after")
    def _views_differ(self) -> Self:
        if self.views_per_sample > 1 and not self.enabled:
            raise ValueError("views_per_sample > 1 needs enabled=true (identical views add nothing)")
        return self

    @classmethod
    def off(cls) -> AugmentSettings:
        """The identity: tiles are only normalised."""
        return cls(enabled=False)
