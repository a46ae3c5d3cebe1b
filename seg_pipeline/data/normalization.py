"""Per-band normalisation from header statistics (F8 in docs/architecture.md).

The header catalog already holds, per tile, the mean and standard deviation of every band over
its valid (non-nodata, finite) pixels. Dataset statistics are the *pooled* combination of those:
each tile counts with its number of valid pixels, and the variance includes the spread between
tile means (``E[x^2] - E[x]^2`` over all pixels), which an average of per-tile stds would miss.

When no catalog is at hand, :func:`scale_stats` gives the ``scale`` fallback: divide by the
dtype's maximum (255 for ``uint8``, 65535 for ``uint16``) or by a value you name, e.g.
``max_value=10000`` for Sentinel-2 reflectance stored as ``uint16``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from seg_pipeline.data.catalog import ok_rows

if TYPE_CHECKING:
    import torch

#: Default divisors of the scale fallback, by dtype name.
DTYPE_MAX: dict[str, float] = {"uint8": 255.0, "uint16": 65535.0, "int16": 32767.0}


@dataclass(frozen=True)
class BandStats:
    """Per-band mean and standard deviation in raw pixel units.

    Attributes:
        mean: One value per band.
        std: One value per band, all > 0.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) == 0 or len(self.mean) != len(self.std):
            raise ValueError(
                f"BandStats: mean has {len(self.mean)} values and std {len(self.std)}; "
                "give one mean and one std per band"
            )
        bad = [v for v in self.std if not np.isfinite(v) or v <= 0]
        if bad or not all(np.isfinite(self.mean)):
            raise ValueError(
                f"BandStats: std must be finite and > 0 and mean finite (std={self.std}, mean={self.mean}); "
                "a constant band has std 0: use scale_stats() or drop the band"
            )

    @property
    def bands(self) -> int:
        """Number of bands the statistics describe."""
        return len(self.mean)

    def scale_and_offset(self) -> tuple[np.ndarray, np.ndarray]:
        """``(1/std, -mean/std)`` as float32 arrays: ``x * scale + offset`` normalises in one pass."""
        std = np.asarray(self.std, dtype=np.float64)
        mean = np.asarray(self.mean, dtype=np.float64)
        return (1.0 / std).astype(np.float32), (-mean / std).astype(np.float32)


def scale_stats(bands: int, dtype: str | np.dtype | None = None, max_value: float | None = None) -> BandStats:
    """The scale fallback: ``x / max_value`` for every band (mean 0, std ``max_value``).

    Args:
        bands: Number of bands.
        dtype: Pixel dtype; its default divisor comes from :data:`DTYPE_MAX` (floats: 1.0).
        max_value: Explicit divisor (e.g. 10000 for reflectance); wins over ``dtype``.
    """
    if bands < 1:
        raise ValueError(f"bands={bands}: must be >= 1")
    if max_value is None:
        if dtype is None:
            raise ValueError("scale_stats needs dtype or max_value (e.g. dtype='uint8' or max_value=10000)")
        name = np.dtype(dtype).name
        if np.dtype(dtype).kind == "f":
            max_value = 1.0
        elif name in DTYPE_MAX:
            max_value = DTYPE_MAX[name]
        else:
            raise ValueError(
                f"dtype={name!r} has no default scale; pass max_value (e.g. 10000 for reflectance)"
            )
    if not max_value > 0:
        raise ValueError(f"max_value={max_value}: must be > 0")
    return BandStats(mean=(0.0,) * bands, std=(float(max_value),) * bands)


def _valid_pixels(row: dict) -> float:
    fraction = row.get("nodata_fraction")
    fraction = 0.0 if fraction is None or pd.isna(fraction) else float(fraction)
    return float(row["width"]) * float(row["height"]) * (1.0 - fraction)


def band_stats_from_catalog(catalog: pd.DataFrame, item_ids: Iterable[str] | None = None) -> BandStats:
    """Pool per-tile band means/stds of the catalog into dataset statistics.

    Each tile is weighted by its valid pixel count ``width * height * (1 - nodata_fraction)``;
    the pooled variance is ``sum(n_i * (std_i^2 + mean_i^2)) / N - mean^2``.

    Args:
        catalog: Header catalog (``headers.build_headers(...).catalog`` or ``read_catalog``).
        item_ids: Restrict to these tiles (e.g. the training split, so validation does not leak).

    Raises:
        ValueError: no usable tile, an unknown item id, or tiles with different band counts.
    """
    rows = ok_rows(catalog, item_ids)
    weights: list[float] = []
    means: list[Sequence[float]] = []
    stds: list[Sequence[float]] = []
    for row in rows.to_dict("records"):
        n_valid = _valid_pixels(row)
        band_mean = row.get("band_mean")
        if band_mean is None or np.isscalar(band_mean) or n_valid <= 0:
            continue
        weights.append(n_valid)
        means.append(list(row["band_mean"]))
        stds.append(list(row["band_std"]))
    if not weights:
        raise ValueError("catalog: no OK tile with valid pixels to compute band statistics from")
    if len({len(m) for m in means}) != 1:
        raise ValueError(f"catalog: tiles have different band counts {sorted({len(m) for m in means})}")
    n = np.asarray(weights, dtype=np.float64)[:, None]
    mean_i = np.asarray(means, dtype=np.float64)
    std_i = np.asarray(stds, dtype=np.float64)
    total = n.sum()
    mean = (n * mean_i).sum(axis=0) / total
    second_moment = (n * (std_i**2 + mean_i**2)).sum(axis=0) / total
    std = np.sqrt(np.maximum(second_moment - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)  # a constant band: centre it, do not divide by zero
    return BandStats(mean=tuple(mean.tolist()), std=tuple(std.tolist()))


def normalize(array: np.ndarray | torch.Tensor, stats: BandStats) -> np.ndarray | torch.Tensor:
    """``(array - mean) / std`` per band of a ``(C, H, W)`` or ``(B, C, H, W)`` array, as float32.

    Returns the same kind (numpy or torch) as the input.
    """
    channels = array.shape[-3] if array.ndim >= 3 else -1
    if channels != stats.bands:
        raise ValueError(
            f"array has shape {tuple(array.shape)} but stats describe {stats.bands} bands; "
            "expected (..., bands, H, W)"
        )
    scale, offset = stats.scale_and_offset()
    if not isinstance(array, np.ndarray):  # a tensor (torch loads only where tensors exist)
        import torch

        out = array.to(torch.float32)
        out = out * torch.from_numpy(scale)[:, None, None] + torch.from_numpy(offset)[:, None, None]
        return out
    out = np.multiply(array, scale[:, None, None], dtype=np.float32)
    out += offset[:, None, None]
    return out


def invalid_pixels(image: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """``(H, W)`` bool map of pixels to ignore: all bands equal ``nodata``, or any band NaN.

    Returns ``None`` when every pixel is valid, so callers can skip the masking pass.
    """
    invalid: np.ndarray | None = None
    if image.dtype.kind == "f":
        nan = np.isnan(image).any(axis=0)
        if nan.any():
            invalid = nan
    if nodata is None or np.isnan(nodata):
        return invalid
    if image.dtype.kind in "ui":
        info = np.iinfo(image.dtype)
        if not float(nodata).is_integer() or not info.min <= nodata <= info.max:
            return invalid  # the nodata value cannot occur in this dtype
        if nodata == 0 and image.dtype.kind == "u":
            equal = image.max(axis=0) == 0  # faster than any() on unsigned pixels
        else:
            equal = (image == nodata).all(axis=0)
    else:
        equal = (image == nodata).all(axis=0)
    if equal.any():
        invalid = equal if invalid is None else invalid | equal
    return invalid
