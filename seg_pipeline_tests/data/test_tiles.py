"""Tile decoding (``load_npy``) and the per-worker LRU tile cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from seg_pipeline.data.shards import ShardError
from seg_pipeline.data.tiles import TileCache, load_npy


def test_tile_cache_is_lru() -> None:
    cache = TileCache(max_items=2)
    tiles = {k: (np.full((1, 2, 2), i), None, None) for i, k in enumerate("abc")}
    cache.put("a", tiles["a"])
    cache.put("b", tiles["b"])
    assert cache.get("a") is tiles["a"]  # a is now the most recent
    cache.put("c", tiles["c"])  # evicts b
    assert cache.get("b") is None and cache.get("a") is tiles["a"] and len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 1)


def test_truncated_npy_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.arange(100, dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match="truncated"):
        load_npy(path)
    np.save(path, np.arange(6, dtype=np.uint16).reshape(2, 3))
    np.testing.assert_array_equal(load_npy(path), np.arange(6).reshape(2, 3))
