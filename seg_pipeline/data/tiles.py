"""Reading one shard row: ``.npy`` decoding with cached headers, rasterio for the rest, and the
per-worker LRU cache of decoded tiles (``cache_mode="lru"`` of the shard datasets).

Tiles stay raw here (source dtype, no normalisation); :mod:`seg_pipeline.data.samples` turns
them into samples.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from seg_pipeline.data.normalization import invalid_pixels
from seg_pipeline.data.patching import PatchWindow, intersect
from seg_pipeline.data.raster_io import read_array
from seg_pipeline.data.shards import ShardError, ShardRow

CACHE_MODES = ("none", "lru")

#: One decoded tile: raw image ``(C, H, W)``, mask ``(H, W)`` or ``None``, nodata map or ``None``.
RawTile = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]


#: Parsed ``.npy`` headers by their raw bytes: a shard's tiles share a handful of headers, and
#: ``np.load`` re-parses each one with ``ast.literal_eval`` (about as slow as reading the pixels).
_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], np.dtype, bool]] = {}
_NPY_MAGIC = b"\x93NUMPY"


def load_npy(path: Path | str) -> np.ndarray:
    """Read an ``.npy`` file like ``np.load`` (writable array), caching parsed headers.

    Raises:
        ShardError: the file is not a complete ``.npy`` array.
    """
    with open(path, "rb", buffering=0) as fh:
        prefix = fh.read(12)
        if prefix[:6] != _NPY_MAGIC:
            raise ShardError(f"{path}: not an .npy file (bad magic); rebuild the shard")
        major = prefix[6]
        if major == 1:
            header_len, start = int.from_bytes(prefix[8:10], "little"), 10
        else:
            header_len, start = int.from_bytes(prefix[8:12], "little"), 12
        header = prefix[start:] + fh.read(header_len - (len(prefix) - start))
        parsed = _NPY_HEADERS.get(header)
        if parsed is None:
            fh.seek(0)
            version = np.lib.format.read_magic(fh)
            reader = (
                np.lib.format.read_array_header_1_0
                if version[0] == 1
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = reader(fh)
            parsed = (tuple(shape), dtype, bool(fortran))
            if len(_NPY_HEADERS) < 1024:
                _NPY_HEADERS[header] = parsed
        shape, dtype, fortran = parsed
        if fortran or dtype.hasobject:
            return np.load(path, allow_pickle=False)
        array = np.empty(shape, dtype=dtype)
        # numpy's stubs give ndarray __buffer__ only for Python >= 3.12; it is a buffer on every version
        view = memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        got = fh.readinto(view)
        if got != array.nbytes:
            raise ShardError(
                f"{path}: truncated .npy ({got} of {array.nbytes} data bytes); rebuild the shard"
            )
        return array


def decoded_bytes(row: ShardRow) -> int:
    """Memory a decoded tile of ``row`` takes in the cache: image, mask (counted at 2 bytes a pixel,
    the widest mask dtype) and, where the tile has a nodata value, its nodata map.
    """
    height, width = int(row.extra["height"]), int(row.extra["width"])
    bands = int(row.extra.get("bands") or 1)
    itemsize = np.dtype(row.extra.get("dtype") or "float64").itemsize
    mask = 2 if row.target_path is not None else 0
    nodata = 1 if row.extra.get("nodata") is not None else 0
    return height * width * (bands * itemsize + mask + nodata)


def read_raw_tile(row: ShardRow) -> RawTile:
    """Decode one shard row: ``.npy`` with :func:`load_npy`, anything else with rasterio."""

    def load(path: Path) -> np.ndarray:
        return load_npy(path) if path.suffix == ".npy" else read_array(path)

    image = load(row.input_path)
    if image.ndim == 2:
        image = image[np.newaxis]
    mask = None
    if row.target_path is not None:
        mask = load(row.target_path)
        mask = mask[0] if mask.ndim == 3 else mask
    nodata = row.extra.get("nodata")
    return image, mask, invalid_pixels(image, None if nodata is None else float(nodata))


def _read_part(path: Path, rows: slice, cols: slice) -> np.ndarray:
    """Rows and columns of a shard file without decoding the rest (npy: memory map; else rasterio)."""
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        part = array[..., rows, cols] if array.ndim == 3 else array[rows, cols]
        return np.array(part)
    window = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
    return read_array(path, window=window)


def cut_window(tile: RawTile, window: PatchWindow, ignore_index: int) -> RawTile:
    """The part of a decoded tile under ``window``, padded where the window leaves the tile."""
    image, mask, invalid = tile
    height, width = image.shape[-2:]
    mask_part = None if mask is None else lambda r, c: mask[r, c]
    invalid_part = None if invalid is None else lambda r, c: invalid[r, c]
    return _assemble(
        window, height, width, ignore_index, lambda r, c: image[:, r, c], mask_part, invalid_part
    )


def read_raw_window(row: ShardRow, window: PatchWindow, ignore_index: int) -> RawTile:
    """One window of a shard tile read from disk (windowed reads: memory follows the window).

    Pixels outside the tile are padded: image 0 and marked invalid, mask ``ignore_index``.
    """
    height, width = int(row.extra["height"]), int(row.extra["width"])
    target = row.target_path

    def image_part(rows: slice, cols: slice) -> np.ndarray:
        part = _read_part(row.input_path, rows, cols)
        return part[np.newaxis] if part.ndim == 2 else part

    def mask_part(rows: slice, cols: slice) -> np.ndarray:
        assert target is not None
        part = _read_part(target, rows, cols)
        return part[0] if part.ndim == 3 else part

    nodata = row.extra.get("nodata")
    nodata_value = None if nodata is None else float(nodata)
    masks = mask_part if target else None
    return _assemble(window, height, width, ignore_index, image_part, masks, None, nodata=nodata_value)


def _assemble(
    window: PatchWindow,
    height: int,
    width: int,
    ignore_index: int,
    image_part: Callable[[slice, slice], np.ndarray],
    mask_part: Callable[[slice, slice], np.ndarray] | None,
    invalid_part: Callable[[slice, slice], np.ndarray] | None,
    nodata: float | None = None,
) -> RawTile:
    """A window's image, mask and invalid map from readers of the tile region it covers."""
    inside = intersect(window, height, width)
    if inside is None:
        raise ValueError(f"window {window} lies outside the {width}x{height} tile")
    tile_rows, tile_cols, win_rows, win_cols = inside
    source = image_part(tile_rows, tile_cols)
    full = window.height == source.shape[-2] and window.width == source.shape[-1]
    if full:
        image = np.ascontiguousarray(source)
        mask = None if mask_part is None else np.ascontiguousarray(mask_part(tile_rows, tile_cols))
        invalid = invalid_part(tile_rows, tile_cols) if invalid_part else invalid_pixels(image, nodata)
        return image, mask, invalid
    image = np.zeros((source.shape[0], window.height, window.width), dtype=source.dtype)
    image[:, win_rows, win_cols] = source
    invalid = np.ones((window.height, window.width), dtype=bool)
    own = invalid_part(tile_rows, tile_cols) if invalid_part else invalid_pixels(source, nodata)
    invalid[win_rows, win_cols] = False if own is None else own
    mask = None
    if mask_part is not None:
        part = mask_part(tile_rows, tile_cols)
        mask = np.full(
            (window.height, window.width),
            ignore_index,
            dtype=np.result_type(part.dtype, np.min_scalar_type(ignore_index)),
        )
        mask[win_rows, win_cols] = part
    return image, mask, invalid


class TileCache:
    """A least-recently-used cache of decoded tiles, private to one process (one worker).

    Args:
        max_items: Capacity; 0 means unbounded (every tile the worker sees stays in memory).
    """

    def __init__(self, max_items: int = 0) -> None:
        if max_items < 0:
            raise ValueError(f"cache_max_items={max_items}: must be >= 0 (0 = unbounded)")
        self.max_items = max_items
        self._items: OrderedDict[str, RawTile] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> RawTile | None:
        """The cached tile (marked most recently used) or ``None``."""
        tile = self._items.get(key)
        if tile is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return tile

    def put(self, key: str, tile: RawTile) -> None:
        """Store ``tile``, evicting the least recently used one beyond capacity."""
        self._items[key] = tile
        self._items.move_to_end(key)
        if self.max_items and len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def clear(self) -> None:
        """Drop every cached tile."""
        self._items.clear()
