"""Writers for predictions: GeoTIFF class maps and probabilities, palettes, colourised PNGs.

Every writer goes through :func:`seg_pipeline.io.atomic_write`: the file is written under a temporary
name in the target folder and renamed into place with ``os.replace``, so a reader (or a Dagster sensor)
never sees a half-written file, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import colorsys
import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from seg_pipeline.io import atomic_write

__all__ = [
    "class_dtype_for",
    "colorize",
    "default_palette",
    "geotiff_profile",
    "save_color_png",
    "write_class_map",
    "write_probabilities",
]


def class_dtype_for(num_classes: int) -> tuple[str, int]:
    """Smallest unsigned dtype that holds classes ``0..num_classes-1`` plus a free nodata value.

    Returns:
        ``(dtype, nodata)``: ``("uint8", 255)`` up to 255 classes, else ``("uint16", 65535)``.
    """
    if not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    if num_classes <= 255:
        return "uint8", 255
    if num_classes <= 65535:
        return "uint16", 65535
    raise ValueError(f"num_classes={num_classes} does not fit a uint16 class map (max 65535 classes).")


def _block_size(size: int) -> int:
    """GeoTIFF tile edge: 256, or the size rounded up to a multiple of 16 for small rasters."""
    return min(256, max(16, -(-size // 16) * 16))


def geotiff_profile(
    height: int,
    width: int,
    count: int,
    dtype: str,
    *,
    crs: Any = None,
    transform: Any = None,
    nodata: float | None = None,
) -> dict[str, Any]:
    """A tiled, deflate-compressed GeoTIFF profile; CRS/transform only when the source had them."""
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": int(height),
        "width": int(width),
        "count": int(count),
        "dtype": dtype,
        "tiled": True,
        "blockxsize": _block_size(width),
        "blockysize": _block_size(height),
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    if crs is not None:
        profile["crs"] = crs
    if transform is not None and (crs is not None or transform != rasterio.Affine.identity()):
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    return profile


@contextlib.contextmanager
def _open_for_write(path: Path, profile: dict[str, Any]) -> Iterator[rasterio.io.DatasetWriter]:
    """Open a raster for writing; a missing georeference is intended, so its warning is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            yield dst


def _georeference(profile_like: Mapping[str, Any] | None) -> dict[str, Any]:
    if not profile_like:
        return {}
    return {"crs": profile_like.get("crs"), "transform": profile_like.get("transform")}


def write_class_map(
    path: str | os.PathLike[str],
    classes: np.ndarray,
    profile_like: Mapping[str, Any] | None = None,
    *,
    num_classes: int | None = None,
    nodata: int | None = None,
) -> Path:
    """Write a single-band class map GeoTIFF whose dtype can never overflow.

    Args:
        path: Destination ``.tif``.
        classes: Integer array (H, W) with values in ``0..num_classes-1`` or ``nodata``.
        profile_like: A rasterio profile (e.g. the source's ``src.profile``); only ``crs`` and
            ``transform`` are taken from it. ``None`` writes a non-georeferenced GeoTIFF.
        num_classes: Number of classes; defaults to ``max(classes) + 1`` ignoring ``nodata``.
        nodata: Value of nodata pixels; defaults to the dtype's maximum (255 or 65535).
    """
    classes = np.asarray(classes)
    if classes.ndim != 2 or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"classes must be an integer array (H, W), got {classes.dtype} {classes.shape}.")
    if num_classes is None:
        labelled = classes if nodata is None else classes[classes != nodata]
        num_classes = int(labelled.max()) + 1 if labelled.size else 1
    dtype, default_nodata = class_dtype_for(num_classes)
    nodata = default_nodata if nodata is None else nodata
    if not num_classes <= nodata <= np.iinfo(dtype).max:
        raise ValueError(
            f"nodata={nodata} collides with classes 0..{num_classes - 1} or does not fit {dtype}."
        )
    labelled = classes[classes != nodata]
    if labelled.size and (labelled.min() < 0 or labelled.max() >= num_classes):
        raise ValueError(
            f"classes holds values {int(labelled.min())}..{int(labelled.max())} outside "
            f"0..{num_classes - 1}; pass the right num_classes or nodata."
        )
    height, width = classes.shape
    profile = geotiff_profile(height, width, 1, dtype, nodata=nodata, **_georeference(profile_like))
    with atomic_write(path) as temporary, _open_for_write(temporary, profile) as dst:
        dst.write(classes.astype(dtype, copy=False), 1)
    return Path(path)


def write_probabilities(
    path: str | os.PathLike[str],
    probabilities: np.ndarray,
    profile_like: Mapping[str, Any] | None = None,
    *,
    dtype: str = "float32",
) -> Path:
    """Write class probabilities (K, H, W) as a K-band GeoTIFF.

    Args:
        path: Output GeoTIFF (written atomically).
        probabilities: ``(K, H, W)`` float probabilities; NaN marks nodata.
        profile_like: A rasterio profile (or dataset ``.profile``) whose CRS and transform to copy.
        dtype: ``"float32"`` (NaN marks nodata) or ``"uint8"`` (probabilities scaled to 0..255,
            a quarter of the size; NaN is written as 0).
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 3:
        raise ValueError(f"probabilities must be (K, H, W), got shape {probabilities.shape}.")
    if dtype not in ("float32", "uint8"):
        raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}.")
    count, height, width = probabilities.shape
    nodata = float("nan") if dtype == "float32" else None
    profile = geotiff_profile(height, width, count, dtype, nodata=nodata, **_georeference(profile_like))
    with atomic_write(path) as temporary, _open_for_write(temporary, profile) as dst:
        dst.write(scale_probabilities(probabilities, dtype))
    return Path(path)


def scale_probabilities(probabilities: np.ndarray, dtype: str) -> np.ndarray:
    """Cast probabilities to the on-disk dtype (uint8 = round(p * 255), NaN -> 0)."""
    if dtype == "float32":
        return probabilities.astype(np.float32, copy=False)
    return np.rint(np.nan_to_num(probabilities, nan=0.0) * 255.0).clip(0, 255).astype(np.uint8)


def default_palette(num_classes: int) -> np.ndarray:
    """Deterministic, distinct RGB colours (K, 3) uint8.

    Up to 20 classes use matplotlib's ``tab10``/``tab20`` (designed to be told apart); beyond that
    hues are spaced by the golden ratio with alternating lightness so neighbours still differ.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    from matplotlib import colormaps  # local import: matplotlib is slow to import and optional here
    from matplotlib.colors import ListedColormap

    if num_classes <= 20:
        name = "tab10" if num_classes <= 10 else "tab20"
        colormap = cast(ListedColormap, colormaps[name])  # tab10/tab20 are listed (qualitative) maps
        colours = np.asarray(colormap.colors)[:num_classes]
        return np.rint(colours * 255).astype(np.uint8)
    golden = (np.sqrt(5) - 1) / 2
    rows = [
        colorsys.hls_to_rgb((index * golden) % 1.0, 0.35 + 0.3 * (index % 3) / 2, 0.65 + 0.35 * (index % 2))
        for index in range(num_classes)
    ]
    palette = np.rint(np.asarray(rows) * 255).astype(np.uint8)
    return _make_unique(palette)


def _make_unique(palette: np.ndarray) -> np.ndarray:
    """Nudge repeated colours (possible for thousands of classes) until every row differs."""
    seen: set[tuple[int, ...]] = set()
    for index in range(len(palette)):
        while tuple(palette[index]) in seen:
            palette[index, index % 3] = (int(palette[index, index % 3]) + 1) % 256
        seen.add(tuple(palette[index]))
    return palette


def colorize(
    classes: np.ndarray,
    palette: np.ndarray | Sequence[Sequence[int]],
    *,
    nodata_value: int | None = None,
    nodata_color: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Map a class map (H, W) to RGB (H, W, 3) uint8 with ``palette[k]`` for class k."""
    classes = np.asarray(classes)
    palette = np.asarray(palette, dtype=np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must have shape (K, 3), got {palette.shape}.")
    nodata = classes == nodata_value if nodata_value is not None else np.zeros(classes.shape, dtype=bool)
    labelled = classes[~nodata]
    if labelled.size and (labelled.min() < 0 or labelled.max() >= len(palette)):
        raise ValueError(
            f"classes holds values {int(labelled.min())}..{int(labelled.max())} but the palette has "
            f"{len(palette)} colours; pass a longer palette or nodata_value."
        )
    rgb = palette[np.where(nodata, 0, classes)]
    rgb[nodata] = nodata_color
    return rgb


def save_color_png(
    path: str | os.PathLike[str],
    classes: np.ndarray,
    palette: np.ndarray | Sequence[Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
    legend: bool = True,
    *,
    nodata_value: int | None = None,
    title: str | None = None,
) -> Path:
    """Save a colourised class map as PNG, optionally with a legend beside the image.

    Without a legend the PNG has exactly the class map's pixels (one pixel per cell); with a legend
    the image is drawn at its native size by matplotlib (Agg backend) with the legend to its right.
    """
    classes = np.asarray(classes)
    if classes.ndim != 2:
        raise ValueError(f"classes must be (H, W), got shape {classes.shape}.")
    labelled = classes[classes != nodata_value] if nodata_value is not None else classes
    num_classes = (
        len(class_names) if class_names is not None else (int(labelled.max()) + 1 if labelled.size else 1)
    )
    palette = default_palette(num_classes) if palette is None else np.asarray(palette, dtype=np.uint8)
    names = (
        list(class_names) if class_names is not None else [f"class {index}" for index in range(len(palette))]
    )
    if len(names) > len(palette):
        raise ValueError(f"{len(names)} class_names but only {len(palette)} palette colours.")
    rgb = colorize(classes, palette, nodata_value=nodata_value)

    # The object-oriented Figure API renders with Agg without touching pyplot's global backend state.
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    with atomic_write(path) as temporary:
        if not legend:
            import matplotlib.image

            matplotlib.image.imsave(temporary, rgb, format="png")
        else:
            handles = [
                Patch(facecolor=palette[index] / 255.0, edgecolor="black", label=name)
                for index, name in enumerate(names)
            ]
            if nodata_value is not None and np.any(classes == nodata_value):
                handles.append(Patch(facecolor=(0, 0, 0), edgecolor="black", label="nodata"))
            dpi = 100
            height, width = classes.shape
            legend_inches = 0.6 + 0.08 * max(len(str(handle.get_label())) for handle in handles)
            image_inches = (max(width / dpi, 2.0), max(height / dpi, 0.25 * len(handles) + 0.5))
            title_inches = 0.35 if title else 0.0
            figure = Figure(figsize=(image_inches[0] + legend_inches, image_inches[1] + title_inches))
            axes = figure.add_axes(
                (0.0, 0.0, image_inches[0] / figure.get_figwidth(), image_inches[1] / figure.get_figheight())
            )
            axes.imshow(rgb, interpolation="nearest")
            axes.set_axis_off()
            if title:
                axes.set_title(title)
            figure.legend(handles=handles, loc="center right", frameon=False, fontsize=8)
            figure.savefig(temporary, dpi=dpi, format="png")
    return Path(path)
