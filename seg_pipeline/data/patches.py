"""Random windows from large GeoTIFFs (F7 in docs/architecture.md): :class:`GeoPatchDataset` samples them, one
patch size per batch through :class:`PatchSizeBatchSampler`.

Samples are made as :mod:`seg_pipeline.data.samples` describes (including ``set_epoch``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import RasterioIOError
from rasterio.windows import Window
from torch.utils.data import Dataset, Sampler

from seg_pipeline.data.augment import Augmenter, derive_seed
from seg_pipeline.data.normalization import BandStats, invalid_pixels, scale_stats
from seg_pipeline.data.raster_io import RasterReadError, gdal_env, read_info
from seg_pipeline.data.samples import _check_common, _EpochState, _SampleMaker
from seg_pipeline.data.tiles import RawTile

PATCH_SIZE_SAMPLING = ("uniform", "cycle")


class _RasterHandles:
    """Open rasterio datasets kept per process (a forked worker must not reuse its parent's)."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._open: dict[Path, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def read(self, path: Path, window: Window) -> np.ndarray:
        if os.getpid() != self._pid:
            self._pid, self._open = os.getpid(), {}
        src = self._open.get(path)
        if src is None:
            try:
                with gdal_env():
                    src = rasterio.open(path)
            except RasterioIOError as exc:
                raise RasterReadError(path, f"not a readable raster ({exc})") from exc
            self._open[path] = src
        try:
            return src.read(window=window)
        except RasterioIOError as exc:
            raise RasterReadError(path, f"pixel data is corrupt or truncated ({exc})") from exc

    def close(self) -> None:
        for src in self._open.values():
            src.close()
        self._open = {}


class GeoPatchDataset(_EpochState, Dataset):
    """Random windows from large GeoTIFFs, read with ``rasterio.windows.Window`` (never whole).

    Index with ``(i, patch_size)`` (what :class:`PatchSizeBatchSampler` yields: one size per
    batch, decided in the main process, so it works with any number of workers) or with a plain
    ``i`` (uses :attr:`patch_size`, set by :meth:`set_patch_size`; with ``num_workers > 0`` call
    it only before workers start). Sample ``i`` of epoch ``e`` is a pure function of
    ``(seed, e, i, patch_size)``: windows lie fully inside the raster; a raster smaller than
    the patch is read whole and padded (image 0 after normalisation, mask ``ignore_index``).

    Args:
        raster_paths: Images, any band count; all must share band count and dtype.
        target_paths: Masks aligned with ``raster_paths`` (``None`` entries, or ``None``: unlabeled).
        patch_sizes: Sizes the batch sampler chooses from (seed 000 default 256/512/1024).
        patch_size_sampling: ``uniform`` (random per batch) or ``cycle`` (round robin).
        samples_per_epoch: Length of the dataset.
        stats: Band statistics; ``None`` uses the dtype scale fallback.
        seed: Base seed of window positions and augmentation.
        augmenter: Optional augmentation (applied after the window read).
        ignore_index: Mask value for unlabeled, nodata and padded pixels.
        weight_by_area: Draw rasters proportionally to their pixel count (else uniformly).
        epoch: Starting epoch.
    """

    def __init__(
        self,
        raster_paths: Sequence[Path | str],
        target_paths: Sequence[Path | str | None] | None = None,
        *,
        patch_sizes: Sequence[int] = (256, 512, 1024),
        patch_size_sampling: str = "uniform",
        samples_per_epoch: int,
        stats: BandStats | None = None,
        seed: int = 0,
        augmenter: Augmenter | None = None,
        ignore_index: int = 255,
        weight_by_area: bool = True,
        epoch: int = 0,
    ) -> None:
        super().__init__(epoch)
        self.raster_paths = [Path(p) for p in raster_paths]
        if not self.raster_paths:
            raise ValueError("raster_paths is empty: give at least one GeoTIFF")
        targets = list(target_paths) if target_paths is not None else [None] * len(self.raster_paths)
        if len(targets) != len(self.raster_paths):
            raise ValueError(
                f"target_paths has {len(targets)} entries but raster_paths {len(self.raster_paths)}; "
                "give one target (or None) per raster"
            )
        self.target_paths = [None if t is None else Path(t) for t in targets]
        self.patch_sizes = tuple(int(s) for s in patch_sizes)
        if not self.patch_sizes or min(self.patch_sizes) < 1:
            raise ValueError(f"patch_sizes={patch_sizes}: give at least one size >= 1")
        if patch_size_sampling not in PATCH_SIZE_SAMPLING:
            raise ValueError(
                f"patch_size_sampling={patch_size_sampling!r}: choose one of {', '.join(PATCH_SIZE_SAMPLING)}"
            )
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch={samples_per_epoch}: must be >= 1")
        self.patch_size_sampling = patch_size_sampling
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.patch_size = self.patch_sizes[0]
        self.infos = [read_info(p) for p in self.raster_paths]
        bands = {info.count for info in self.infos}
        dtypes = {info.dtype for info in self.infos}
        if len(bands) != 1 or len(dtypes) != 1:
            raise ValueError(
                f"rasters differ in band count {sorted(bands)} or dtype {sorted(dtypes)}; use one kind"
            )
        for info, target in zip(self.infos, self.target_paths, strict=True):
            if target is None:
                continue
            target_info = read_info(target)
            if (target_info.width, target_info.height) != (info.width, info.height) or target_info.count != 1:
                raise ValueError(
                    f"target {target} is {target_info.width}x{target_info.height}x{target_info.count} "
                    f"but raster {info.path} is {info.width}x{info.height}; targets must be single-band "
                    "and the same size"
                )
        self.stats = stats if stats is not None else scale_stats(self.infos[0].count, self.infos[0].dtype)
        _check_common(self.stats, ignore_index, "none", 0)
        if self.stats.bands != self.infos[0].count:
            raise ValueError(
                f"stats describe {self.stats.bands} bands but the rasters have {self.infos[0].count}"
            )
        areas = np.array([info.width * info.height for info in self.infos], dtype=np.float64)
        weights = areas if weight_by_area else np.ones_like(areas)
        self._cumulative = np.cumsum(weights / weights.sum())
        self._maker = _SampleMaker(self.stats, augmenter, ignore_index, False, self.seed)
        self._handles = _RasterHandles()

    def __len__(self) -> int:
        return self.samples_per_epoch

    def batch_sampler(self, batch_size: int, *, drop_last: bool = False) -> PatchSizeBatchSampler:
        """A :class:`PatchSizeBatchSampler` over this dataset with its sizes, sampling and seed."""
        return PatchSizeBatchSampler(
            self.samples_per_epoch,
            batch_size,
            self.patch_sizes,
            sampling=self.patch_size_sampling,
            seed=self.seed,
            drop_last=drop_last,
        )

    def set_patch_size(self, size: int) -> None:
        """Patch size for plain integer indices (main process / before workers start)."""
        if size < 1:
            raise ValueError(f"patch size {size}: must be >= 1")
        self.patch_size = int(size)

    def window_for(self, index: int, patch_size: int, epoch: int | None = None) -> tuple[int, Window]:
        """``(raster index, window)`` of sample ``index``: deterministic, inside the raster."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(
            derive_seed("geo-window", self.seed, epoch, index, patch_size)
        )
        u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        raster = min(int(np.searchsorted(self._cumulative, u[0], side="right")), len(self.infos) - 1)
        info = self.infos[raster]
        height, width = min(patch_size, info.height), min(patch_size, info.width)
        top = min(int(u[1] * (info.height - height + 1)), info.height - height)
        left = min(int(u[2] * (info.width - width + 1)), info.width - width)
        return raster, Window(left, top, width, height)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, patch_size = key if isinstance(key, tuple) else (key, self.patch_size)
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"index {index} out of range for samples_per_epoch={self.samples_per_epoch}")
        epoch = self.epoch
        raster, window = self.window_for(index, patch_size, epoch)
        image = self._handles.read(self.raster_paths[raster], window)
        target = self.target_paths[raster]
        mask = None if target is None else self._handles.read(target, window)[0]
        invalid = invalid_pixels(image, self.infos[raster].nodata)
        if window.height < patch_size or window.width < patch_size:
            image, mask, invalid = _pad_to(image, mask, invalid, patch_size, self._maker.ignore_index)
        item_id = f"{self.raster_paths[raster].stem}:{window.row_off}:{window.col_off}:{patch_size}"
        return self._maker.make(item_id, (image, mask, invalid), epoch)


def _pad_to(
    image: np.ndarray, mask: np.ndarray | None, invalid: np.ndarray | None, size: int, ignore_index: int
) -> RawTile:
    """Pad a window read from a small raster to ``size x size`` (bottom/right)."""
    bands, height, width = image.shape
    padded = np.zeros((bands, size, size), dtype=image.dtype)
    padded[:, :height, :width] = image
    padded_invalid = np.ones((size, size), dtype=bool)
    padded_invalid[:height, :width] = False if invalid is None else invalid
    padded_mask = None
    if mask is not None:
        padded_mask = np.full(
            (size, size), ignore_index, dtype=np.int64 if ignore_index > 255 else mask.dtype
        )
        padded_mask[:height, :width] = mask
    return padded, padded_mask, padded_invalid


class PatchSizeBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, patch_size)`` keys with one patch size per batch (seed 000).

    The size is drawn in the main process, so every worker builds its batch at the size the
    sampler chose. Use with ``DataLoader(dataset, batch_sampler=...)``; call :meth:`set_epoch`
    each epoch (and ``dataset.set_epoch``) for fresh draws.

    Args:
        num_samples: Samples per epoch (``len(dataset)``).
        batch_size: Samples per batch.
        patch_sizes: Sizes to choose from.
        sampling: ``uniform`` (independent draw per batch) or ``cycle`` (round robin).
        seed: Base seed of the size draws.
        drop_last: Drop the last incomplete batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        patch_sizes: Sequence[int] = (256, 512, 1024),
        *,
        sampling: str = "uniform",
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples={num_samples}, batch_size={batch_size}: both must be >= 1")
        if not patch_sizes or min(patch_sizes) < 1:
            raise ValueError(f"patch_sizes={patch_sizes}: give at least one size >= 1")
        if sampling not in PATCH_SIZE_SAMPLING:
            raise ValueError(f"sampling={sampling!r}: choose one of {', '.join(PATCH_SIZE_SAMPLING)}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.patch_sizes = tuple(int(s) for s in patch_sizes)
        self.sampling = sampling
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the patch sizes of ``epoch`` (the trainer calls this before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def batch_sizes(self) -> list[int]:
        """The patch size of every batch of the current epoch."""
        n = len(self)
        if self.sampling == "cycle":
            start = self.epoch * n
            return [self.patch_sizes[(start + b) % len(self.patch_sizes)] for b in range(n)]
        rng = np.random.default_rng(derive_seed("patch-size", self.seed, self.epoch))
        return [self.patch_sizes[i] for i in rng.integers(0, len(self.patch_sizes), size=n)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b, size in enumerate(self.batch_sizes()):
            start = b * self.batch_size
            stop = min(start + self.batch_size, self.num_samples)
            yield [(i, size) for i in range(start, stop)]
