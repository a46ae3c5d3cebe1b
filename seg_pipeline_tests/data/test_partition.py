"""Splitting shard rows across parts (DDP ranks x DataLoader workers)."""

from __future__ import annotations

from seg_pipeline.data.partition import partition_rows


def test_shard_assignment_is_balanced() -> None:
    shards = [[f"s{s}_{i}" for i in range(n)] for s, n in enumerate([5, 5, 2, 2, 1, 1])]
    sizes = [
        len(partition_rows(shards, p, 2, shuffle=False, assignment_seed=0, order_seed=0)) for p in range(2)
    ]
    assert sorted(sizes) == [8, 8]
