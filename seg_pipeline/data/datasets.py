"""Torch datasets over shards and large GeoTIFFs (F7 in docs/architecture.md): the public names in one place.

The code lives in modules with one job each:

- :mod:`~seg_pipeline.data.tiles`: decoding one shard row, the per-worker tile cache.
- :mod:`~seg_pipeline.data.partition`: rows across DDP ranks x DataLoader workers.
- :mod:`~seg_pipeline.data.samples`: raw tile -> sample or batch (the sample format, epochs).
- :mod:`~seg_pipeline.data.shard_datasets`: :class:`ShardIterableDataset`, :class:`ShardMapDataset`.
- :mod:`~seg_pipeline.data.patches`: :class:`GeoPatchDataset`, :class:`PatchSizeBatchSampler`.
"""

from seg_pipeline.data.partition import partition_rows
from seg_pipeline.data.patches import PATCH_SIZE_SAMPLING, GeoPatchDataset, PatchSizeBatchSampler
from seg_pipeline.data.shard_datasets import ShardIterableDataset, ShardMapDataset
from seg_pipeline.data.tiles import CACHE_MODES, RawTile, TileCache, load_npy, read_raw_tile

__all__ = [
    "CACHE_MODES",
    "PATCH_SIZE_SAMPLING",
    "GeoPatchDataset",
    "PatchSizeBatchSampler",
    "RawTile",
    "ShardIterableDataset",
    "ShardMapDataset",
    "TileCache",
    "load_npy",
    "partition_rows",
    "read_raw_tile",
]
