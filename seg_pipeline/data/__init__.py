"""Data layer: raster I/O, dataset discovery, headers, splits, shards, loaders (no Dagster)."""
