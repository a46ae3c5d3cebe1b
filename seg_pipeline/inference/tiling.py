"""Sliding-window inference over rasters of any size with bounded memory.

Windows (:mod:`~seg_pipeline.inference.windows`) are read once, predicted once, and blended into a
running buffer per prediction set that holds only the rows still being touched: windows are
processed one horizontal strip (one window row) at a time and finished rows are written with
windowed writes. Several prediction sets (each model of an ensemble and the ensemble itself) share
every read and every forward pass. Peak memory is about
``sets * (num_classes + 2) * 4 bytes * (window_height + 256) * raster_width`` plus one batch of
windows, independent of the raster's height.

Optional post-processing (:class:`~seg_pipeline.settings.inference.PostprocessSettings`) cleans each
finished class map in place, strip by strip with rows of context (:func:`clean_in_strips`), ordering
the classes by the whole raster's areas, so the result is that of cleaning the whole map at once
while memory stays bounded; probabilities are written raw. The settings used are recorded in the
class map's ``postprocess`` tag (JSON) and in the summary.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from seg_pipeline.inference.gis import ClassStyle, describe_class_band, to_cog, write_qml
from seg_pipeline.inference.palette import class_palette
from seg_pipeline.inference.postprocess import Cleanup, clean_in_strips
from seg_pipeline.inference.strips import (
    StripBuffer,
    band_nodata,
    check_probabilities,
    read_window,
    resolve_class_dtype,
)
from seg_pipeline.inference.windows import blend_weights, window_grid
from seg_pipeline.inference.writers import geotiff_profile, scale_probabilities
from seg_pipeline.io import atomic_write, temp_name
from seg_pipeline.progress import ItemProgress
from seg_pipeline.settings.inference import PostprocessSettings, WindowSettings

__all__ = ["SetTarget", "blend_weights", "predict_raster", "predict_raster_sets", "window_grid"]

#: The window defaults of the settings schema, so the library functions and the configs agree.
DEFAULT_WINDOWS = WindowSettings()

#: Class-map pixels a post-processing strip holds with its context (4 Mpx, 2048 x 2048): smaller
#: rasters are cleaned whole, larger ones in strips of whole GeoTIFF block rows.
CLEANUP_STRIP_PIXELS = 1 << 22

logger = logging.getLogger(__name__)

PredictFn = Callable[[torch.Tensor], torch.Tensor]
SetsPredictFn = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
Normalize = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SetTarget:
    """Where one prediction set of a raster goes: the class map, and optionally probabilities."""

    class_path: Path
    probabilities_path: Path | None = None


@dataclass
class _SetWriter:
    """One prediction set while a raster is being predicted: its buffer, files and counts."""

    target: SetTarget
    class_dst: Any
    prob_dst: Any
    buffer: StripBuffer
    counts: np.ndarray
    nodata_pixels: int = 0
    probability_dtype: str = "float32"
    #: Per class, the highest blended probability of any valid pixel (seed 003's patch confidence).
    max_probability: np.ndarray | None = None

    def flush(self, bottom: int, width: int, dtype: str, nodata: int) -> None:
        """Write the finished rows ``buffer.top .. bottom``."""
        buffer = self.buffer
        if bottom <= buffer.top:
            return
        rows = Window(col_off=0, row_off=buffer.top, width=width, height=bottom - buffer.top)
        probabilities, valid = buffer.pop(bottom)
        classes = probabilities.argmax(axis=0).astype(dtype)
        classes[~valid] = nodata
        self.counts += np.bincount(classes[valid].ravel(), minlength=len(self.counts))[: len(self.counts)]
        if valid.any():
            strip_max = probabilities.max(axis=(1, 2), where=valid[None], initial=0.0)
            self.max_probability = (
                strip_max if self.max_probability is None else np.maximum(self.max_probability, strip_max)
            )
        self.nodata_pixels += int((~valid).sum())
        self.class_dst.write(classes, 1, window=rows)
        if self.prob_dst is not None:
            probabilities[:, ~valid] = np.nan
            self.prob_dst.write(scale_probabilities(probabilities, self.probability_dtype), window=rows)

    def clean(self, cleanup: Cleanup, settings: PostprocessSettings, nodata: int) -> None:
        """Post-process the finished class map in place, strip by strip; recount its classes.

        Classes are ordered by their areas in the whole raw map (``counts``), so every strip cleans
        like the whole map would; the settings go into the ``postprocess`` tag.
        """
        dst = self.class_dst
        height, width = dst.height, dst.width
        block_rows = dst.profile.get("blockysize", 1) or 1
        counts = np.zeros_like(self.counts)

        def read(start: int, stop: int) -> np.ndarray:
            return dst.read(1, window=Window(col_off=0, row_off=start, width=width, height=stop - start))

        def write(start: int, rows: np.ndarray) -> None:
            labelled = rows[rows != nodata]
            counts[:] += np.bincount(labelled.ravel(), minlength=len(counts))[: len(counts)]
            dst.write(rows, 1, window=Window(col_off=0, row_off=start, width=width, height=len(rows)))

        context = cleanup.context_rows(len(self.counts))
        if height * width <= CLEANUP_STRIP_PIXELS:
            strip_rows = height  # a small raster is cleaned whole
        else:
            fitting = CLEANUP_STRIP_PIXELS // width - 2 * context
            strip_rows = max(block_rows, fitting // block_rows * block_rows)
        clean_in_strips(read, write, height, cleanup, self.counts, strip_rows=strip_rows)
        self.counts = counts
        dst.update_tags(postprocess=json.dumps(settings.model_dump()))


@dataclass
class _Raster:
    """The open source raster and what every window read needs."""

    src: Any
    path: Path
    band_indexes: list[int]
    nodata_values: list
    windows: list[Window]
    weights: np.ndarray
    georeference: dict[str, Any] = field(default_factory=dict)


def _cog_staging(outputs: contextlib.ExitStack, final: Path, kind: str = "classes") -> Path:
    """Where to stream one output: a staging GeoTIFF that becomes ``final`` as a COG on success.

    Rows are written as windows finish (a COG cannot be written that way), so the staging file is
    copied with the COG driver into ``final``'s temp name when the stack closes without error, then
    renamed into place; on error neither file is left.
    """
    temporary = outputs.enter_context(atomic_write(final))
    staging = temp_name(final)  # a second temp of the same scheme: swept if a killed run leaves it

    def finish(exc_type: type[BaseException] | None, *_: object) -> bool:
        try:
            if exc_type is None:
                to_cog(staging, temporary, kind)
        finally:
            for leftover in (staging, Path(f"{staging}.aux.xml")):
                leftover.unlink(missing_ok=True)
        return False

    outputs.push(finish)
    return staging


def _open_writers(
    outputs: contextlib.ExitStack,
    raster: _Raster,
    targets: Mapping[str, SetTarget],
    num_classes: int,
    dtype: str,
    nodata: int,
    probability_dtype: str,
    style: ClassStyle,
    readable: bool = False,
) -> dict[str, _SetWriter]:
    height, width = raster.src.height, raster.src.width
    class_profile = geotiff_profile(height, width, 1, dtype, nodata=nodata, **raster.georeference)
    prob_nodata = float("nan") if probability_dtype == "float32" else None
    prob_profile = geotiff_profile(
        height, width, num_classes, probability_dtype, nodata=prob_nodata, **raster.georeference
    )
    writers = {}
    for name, target in targets.items():
        class_dst = outputs.enter_context(  # read back (w+) when it is post-processed in place
            rasterio.open(
                _cog_staging(outputs, target.class_path), "w+" if readable else "w", **class_profile
            )
        )
        describe_class_band(class_dst, style)
        prob_dst = None
        if target.probabilities_path is not None:
            prob_path = _cog_staging(outputs, target.probabilities_path, "probabilities")
            prob_dst = outputs.enter_context(rasterio.open(prob_path, "w", **prob_profile))
        gcps, gcp_crs = raster.src.gcps
        if gcps:  # georeferenced by ground control points (no transform): the outputs keep them
            for dst in (class_dst, prob_dst):
                if dst is not None:
                    dst.gcps = (gcps, gcp_crs)
        writers[name] = _SetWriter(
            target, class_dst, prob_dst, StripBuffer(num_classes, width), np.zeros(num_classes, np.int64),
            probability_dtype=probability_dtype,
        )  # fmt: skip
    return writers


def _predict_strips(
    raster: _Raster,
    writers: Mapping[str, _SetWriter],
    predict_fn: SetsPredictFn,
    normalize: Normalize | None,
    num_classes: int,
    batch_size: int,
    dtype: str,
    nodata: int,
    progress: ItemProgress,
) -> None:
    """Read, predict and blend every window strip by strip; write finished rows as they complete."""
    height, width = raster.src.height, raster.src.width
    block_rows = next(iter(writers.values())).class_dst.profile.get("blockysize", 1) or 1
    strips = [list(group) for _, group in itertools.groupby(raster.windows, key=lambda w: w.row_off)]
    with torch.inference_mode():
        for strip_index, strip in enumerate(strips):
            for writer in writers.values():
                writer.buffer.extend_to(strip[0].row_off + strip[0].height)
            for start in range(0, len(strip), batch_size):
                batch = strip[start : start + batch_size]
                reads = [
                    read_window(raster.src, w, raster.band_indexes, raster.nodata_values, normalize)
                    for w in batch
                ]
                inputs = torch.from_numpy(np.stack([data for data, _ in reads]))
                outputs = predict_fn(inputs)
                expected = (len(batch), num_classes, *inputs.shape[-2:])
                for name, writer in writers.items():
                    probabilities = check_probabilities(name, outputs[name], expected)
                    for win, probs, (_, valid) in zip(batch, probabilities, reads, strict=True):
                        writer.buffer.add(win, probs, raster.weights, valid)
                progress.advance(len(batch), detail=f"strip {strip_index + 1}/{len(strips)}")
            last = strip_index == len(strips) - 1
            finished = height if last else strips[strip_index + 1][0].row_off
            bottom = finished if last else finished - finished % block_rows  # whole GeoTIFF block rows
            for writer in writers.values():
                writer.flush(bottom, width, dtype, nodata)


def _open_raster(
    src: Any,
    path: Path,
    bands: Sequence[int] | None,
    input_nodata: float | None,
    window: int | Sequence[int],
    overlap: int,
    blend: str,
) -> _Raster:
    band_indexes = list(bands) if bands is not None else list(range(1, src.count + 1))
    if not band_indexes or any(not 1 <= index <= src.count for index in band_indexes):
        raise ValueError(f"bands={bands!r} must be 1-based indexes within 1..{src.count} of {path}.")
    windows = window_grid(src.height, src.width, window, overlap)
    return _Raster(
        src=src,
        path=path,
        band_indexes=band_indexes,
        nodata_values=band_nodata(src, band_indexes, input_nodata),
        windows=windows,
        weights=blend_weights(windows[0].height, windows[0].width, overlap, blend),
        georeference={"crs": src.crs, "transform": src.transform},
    )


def _style_parts(
    class_names: Sequence[str] | None, palette: np.ndarray | None, num_classes: int
) -> tuple[tuple[str, ...], np.ndarray]:
    names = tuple(class_names) if class_names is not None else tuple(f"class {i}" for i in range(num_classes))
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class_names for a predictor of {num_classes} classes")
    colours = class_palette(names) if palette is None else np.asarray(palette, dtype=np.uint8)
    if colours.shape != (num_classes, 3):
        raise ValueError(f"palette must be ({num_classes}, 3) RGB, got shape {colours.shape}")
    return names, colours


def _check_targets(src_path: Path, targets: Mapping[str, SetTarget]) -> None:
    if not src_path.is_file():
        raise FileNotFoundError(f"src_path {src_path} does not exist.")
    if not targets:
        raise ValueError("predict_raster_sets needs at least one target")
    outputs = [t.class_path for t in targets.values()] + [
        t.probabilities_path for t in targets.values() if t.probabilities_path
    ]
    for path in outputs:
        if Path(path).resolve() == src_path.resolve():
            raise ValueError(f"output {path} would overwrite the input raster; choose another path.")
    if len({Path(p).resolve() for p in outputs}) != len(outputs):
        raise ValueError(f"two prediction sets of {src_path} would write the same file: {outputs}")


def _cleanup(settings: PostprocessSettings | None, names: Sequence[str], nodata: int) -> Cleanup | None:
    """The library clean-up of ``settings`` (class names to values), or ``None`` when it is off."""
    if settings is None or not settings.enabled:
        return None
    unknown = [name for name in settings.classes if name not in names]
    if unknown:
        raise ValueError(
            f"postprocess.classes {unknown} are not classes of the model; choose among {list(names)}"
        )
    return Cleanup(
        open_radius=settings.open_radius,
        close_radius=settings.close_radius,
        order=settings.order,
        min_area=settings.min_area,
        connectivity=settings.connectivity,
        only=tuple(names.index(name) for name in settings.classes) or None,
        ignore_value=nodata,
    )


def predict_raster_sets(
    src_path: str | os.PathLike[str],
    targets: Mapping[str, SetTarget],
    predict_fn: SetsPredictFn,
    *,
    num_classes: int,
    window: int | Sequence[int] = DEFAULT_WINDOWS.window,
    overlap: int = DEFAULT_WINDOWS.overlap,
    batch_size: int = 4,
    bands: Sequence[int] | None = None,
    normalize: Normalize | None = None,
    input_nodata: float | None = None,
    blend: str = "cosine",
    probability_dtype: str = "float32",
    class_dtype: str = "auto",
    class_nodata: int | None = None,
    log_fn: Callable[[str], None] | None = None,
    progress_delay_s: float = 5.0,
    class_names: Sequence[str] | None = None,
    palette: np.ndarray | None = None,
    postprocess: PostprocessSettings | None = None,
) -> dict[str, dict[str, Any]]:
    """Predict a raster window by window into several prediction sets at once (one read, one forward).

    ``predict_fn`` maps a float32 batch (B, C, h, w) to ``{set name: probabilities (B, K, h, w)}``
    for every name in ``targets`` (an ``EnsemblePredictor.predict_sets``); each set is blended and
    written to its own class map, a Cloud-Optimized GeoTIFF (one band, the source's CRS, transform
    and size, DEFLATE, overviews; uint8 up to 255 classes else uint16) with a colour table from
    ``palette`` (``(K, 3)``; default: by ``class_names``), the class names in its tags and a QGIS
    ``.qml`` style beside it, and optionally probabilities. See :func:`predict_raster` for the
    other arguments. Returns one summary per set; outputs appear
    atomically, and on error nothing is left behind.
    """
    started = time.perf_counter()
    src_path = Path(src_path)
    _check_targets(src_path, targets)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if probability_dtype not in ("float32", "uint8"):
        raise ValueError(f"probability_dtype must be 'float32' or 'uint8', got {probability_dtype!r}.")
    dtype, nodata = resolve_class_dtype(class_dtype, class_nodata, num_classes)
    names, colours = _style_parts(class_names, palette, num_classes)
    cleanup = _cleanup(postprocess, names, nodata)
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # PNG/JPEG inputs are fine without CRS
        with rasterio.open(src_path) as src, contextlib.ExitStack() as outputs:
            raster = _open_raster(src, src_path, bands, input_nodata, window, overlap, blend)
            style = ClassStyle(names, colours, nodata=nodata)
            writers = _open_writers(
                outputs, raster, targets, num_classes, dtype, nodata, probability_dtype, style,
                readable=cleanup is not None,
            )  # fmt: skip
            progress = ItemProgress(
                f"predict {src_path.name}", len(raster.windows), unit="windows", log_fn=log_fn or logger.info,
                delay_s=progress_delay_s,
            )  # fmt: skip
            _predict_strips(
                raster, writers, predict_fn, normalize, num_classes, batch_size, dtype, nodata, progress
            )
            progress.done()
            if cleanup is not None and postprocess is not None:
                for writer in writers.values():
                    writer.clean(cleanup, postprocess, nodata)
    for target in targets.values():
        write_qml(target.class_path.with_suffix(".qml"), style)
    seconds = round(time.perf_counter() - started, 3)
    common = {
        "height": raster.src.height,
        "width": raster.src.width,
        "num_classes": num_classes,
        "num_windows": len(raster.windows),
        "window": [raster.windows[0].height, raster.windows[0].width],
        "overlap": overlap,
        "class_dtype": dtype,
        "class_nodata": nodata,
        "crs": str(raster.georeference["crs"]) if raster.georeference["crs"] else None,
        "seconds": seconds,
        "postprocess": None if cleanup is None or postprocess is None else postprocess.model_dump(),
    }
    return {
        name: {
            "dst_path": str(writer.target.class_path),
            "probabilities_path": None
            if writer.target.probabilities_path is None
            else str(writer.target.probabilities_path),
            "nodata_pixels": writer.nodata_pixels,
            "class_pixel_counts": writer.counts.tolist(),
            "class_max_probability": (
                [0.0] * num_classes
                if writer.max_probability is None
                else [round(float(p), 6) for p in writer.max_probability]
            ),
            **common,
        }
        for name, writer in writers.items()
    }


def predict_raster(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    predict_fn: PredictFn,
    *,
    num_classes: int,
    window: int | Sequence[int] = DEFAULT_WINDOWS.window,
    overlap: int = DEFAULT_WINDOWS.overlap,
    batch_size: int = 4,
    bands: Sequence[int] | None = None,
    normalize: Normalize | None = None,
    input_nodata: float | None = None,
    blend: str = "cosine",
    write_probabilities: str | os.PathLike[str] | None = None,
    probability_dtype: str = "float32",
    class_dtype: str = "auto",
    class_nodata: int | None = None,
    log_fn: Callable[[str], None] | None = None,
    progress_delay_s: float = 5.0,
    class_names: Sequence[str] | None = None,
    palette: np.ndarray | None = None,
    postprocess: PostprocessSettings | None = None,
) -> dict[str, Any]:
    """Predict a raster window by window and write a GeoTIFF class map (and optionally probabilities).

    Args:
        src_path: Any raster rasterio reads (GeoTIFF, PNG, ...).
        dst_path: Output class map, a Cloud-Optimized GeoTIFF: one band, the source's CRS,
            transform and size, DEFLATE, overviews, uint8 up to 255 classes else uint16, with a
            colour table, the class names in its tags and a QGIS ``.qml`` style beside it.
        predict_fn: Maps a float32 batch (B, C, h, w) to probabilities (B, num_classes, h, w),
            e.g. an ``EnsemblePredictor``.
        num_classes: Number of classes K the predictor returns.
        window: Window size (int or (height, width)); rasters smaller than it are one window.
        overlap: Pixels shared by neighbouring windows, blended with ``blend`` weights.
        batch_size: Windows per ``predict_fn`` call.
        bands: 1-based band indexes to read (default: all).
        normalize: Maps a window (C, h, w) float32 array to the model's input scale.
        input_nodata: Overrides the source's per-band nodata values.
        blend: ``"cosine"`` or ``"uniform"`` window weights.
        write_probabilities: Optional path of a K-band probability GeoTIFF.
        probability_dtype: ``"float32"`` (NaN at nodata) or ``"uint8"`` (round(p * 255)).
        class_dtype: ``"auto"``, ``"uint8"`` or ``"uint16"``.
        class_nodata: Value written where all input bands are nodata (default: the dtype's max).
        log_fn: Sink for per-window progress lines (default: the ``seg_pipeline.inference.tiling``
            logger at INFO), so a large raster shows throughput and ETA while it runs.
        progress_delay_s: Window progress starts only after this many seconds, so small rasters
            (most of them, predicted in a fraction of that) add no lines; 0 reports every raster.
        class_names: Names by class id for the tags and the style (default ``class 0`` ...).
        palette: ``(K, 3)`` RGB colours of the colour table (default: by ``class_names``).
        postprocess: Clean-up of the class map (opening/closing, small regions; off by default),
            in strips with context, so large rasters keep bounded memory and show no seams. The
            probabilities stay raw; the settings are written to the class map's ``postprocess``
            tag (JSON) and the summary.

    Returns:
        Summary dict (paths, size, windows, dtype, nodata, per-class pixel counts of the written
        map, seconds, ``postprocess`` settings or ``None``), small enough for Dagster metadata.
        Outputs appear atomically; on error nothing is left behind.
    """
    probabilities = None if write_probabilities is None else Path(write_probabilities)
    summaries = predict_raster_sets(
        src_path,
        {"prediction": SetTarget(Path(dst_path), probabilities)},
        lambda batch: {"prediction": predict_fn(batch)},
        num_classes=num_classes,
        window=window,
        overlap=overlap,
        batch_size=batch_size,
        bands=bands,
        normalize=normalize,
        input_nodata=input_nodata,
        blend=blend,
        probability_dtype=probability_dtype,
        class_dtype=class_dtype,
        class_nodata=class_nodata,
        class_names=class_names,
        palette=palette,
        log_fn=log_fn,
        progress_delay_s=progress_delay_s,
        postprocess=postprocess,
    )
    return summaries["prediction"]
