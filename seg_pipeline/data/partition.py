"""How a split's rows are divided across DDP ranks x DataLoader workers, and where this process
stands in the process group.

Every part computes the same assignment from shared seeds, so no coordination is needed: each
item is read exactly once per epoch across all parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from seg_pipeline.data.shards import ShardRow


def _balanced_assignment(sizes: Sequence[int], order: Sequence[int], num_parts: int) -> list[list[int]]:
    """Assign shards (by index) to parts: largest first to the least-loaded part (ties: lowest)."""
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    loads = [0] * num_parts
    rank_in_order = {shard: pos for pos, shard in enumerate(order)}
    for shard in sorted(order, key=lambda s: (-sizes[s], rank_in_order[s])):
        target = min(range(num_parts), key=lambda p: (loads[p], p))
        parts[target].append(shard)
        loads[target] += sizes[shard]
    return parts


def partition_rows(
    shards: Sequence[Sequence[ShardRow]],
    part: int,
    num_parts: int,
    *,
    shuffle: bool,
    assignment_seed: int,
    order_seed: int,
) -> list[ShardRow]:
    """Rows of one part (``rank * num_workers + worker_id``), in iteration order.

    With at least ``num_parts`` shards, whole shards are assigned (largest first to the least
    loaded part, so parts differ by at most one shard's size). With fewer shards than parts,
    items are dealt round-robin instead, so no part is idle and nothing is lost or duplicated.
    Every part computes the same assignment from ``assignment_seed``; ``order_seed`` shuffles
    the shard order and the items inside each shard.
    """
    if not 0 <= part < num_parts:
        raise ValueError(f"part={part}: must be within [0, {num_parts})")
    n_shards = len(shards)
    assign_rng = np.random.default_rng(assignment_seed)
    order_rng = np.random.default_rng(order_seed)
    if n_shards >= num_parts:
        order = assign_rng.permutation(n_shards).tolist() if shuffle else list(range(n_shards))
        mine = _balanced_assignment([len(s) for s in shards], order, num_parts)[part]
        mine = sorted(mine)
        if shuffle:
            mine = [mine[i] for i in order_rng.permutation(len(mine))]
        rows: list[ShardRow] = []
        for shard_index in mine:
            shard_rows = list(shards[shard_index])
            if shuffle:
                shard_rows = [shard_rows[i] for i in order_rng.permutation(len(shard_rows))]
            rows.extend(shard_rows)
        return rows
    flat = [row for shard in shards for row in shard]
    if shuffle:
        flat = [flat[i] for i in assign_rng.permutation(len(flat))]
    rows = flat[part::num_parts]
    if shuffle:
        rows = [rows[i] for i in order_rng.permutation(len(rows))]
    return rows


def _distributed_position(default: tuple[int, int] = (0, 1)) -> tuple[int, int]:
    """``(rank, world_size)`` of the live process group, else ``default``.

    Workers started with ``spawn``/``forkserver`` have no process group, so datasets remember the
    position seen at construction and pass it as ``default``.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return default
