"""Spatial groups by ground footprint: tiles whose bounds overlap belong to one group.

Public chip sets cut the same ground at several zoom levels (Kampala: zoom 19, 20 and 21 over one
site) and with overlapping chips; splitting them tile by tile puts the same roofs in train and
val. A grid block (``group_block_size``) cannot fix that, since a zoom-19 tile spans many blocks.
Grouping by footprint overlap does, in any CRS units (degrees included): overlapping bounding boxes
are joined with a union-find, one sweep over the tiles sorted by ``minx``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Overlaps thinner than this share of the smaller tile's side are shared edges, not shared ground.
EDGE_TOLERANCE = 1e-3


class _UnionFind:
    def __init__(self, keys: Sequence[str]) -> None:
        self.parent = {key: key for key in keys}

    def find(self, key: str) -> str:
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            low, high = sorted((ra, rb))  # the smallest key names the group: independent of order
            self.parent[high] = low


def _overlap(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    width = min(a["maxx"], b["maxx"]) - max(a["minx"], b["minx"])
    height = min(a["maxy"], b["maxy"]) - max(a["miny"], b["miny"])
    side = min(a["maxx"] - a["minx"], b["maxx"] - b["minx"], a["maxy"] - a["miny"], b["maxy"] - b["miny"])
    return width > EDGE_TOLERANCE * side and height > EDGE_TOLERANCE * side


def footprint_groups(rows: Sequence[Mapping[str, Any]], initial: Mapping[str, str]) -> dict[str, str]:
    """Item id -> group key: ``initial`` groups (item ids or grid blocks) joined where footprints overlap.

    Rows need ``item_id``, ``crs``, ``georeferenced`` and bounds; tiles without georeferencing keep
    their initial group. A joined group is named by the smallest initial key in it.
    """
    finder = _UnionFind(sorted(set(initial.values())))
    geo = sorted(
        (r for r in rows if r.get("georeferenced") and r.get("crs")), key=lambda r: (str(r["crs"]), r["minx"])
    )
    active: list[Mapping[str, Any]] = []
    for row in geo:
        active = [a for a in active if a["crs"] == row["crs"] and a["maxx"] > row["minx"]]
        for other in active:
            if _overlap(row, other):
                finder.union(initial[str(row["item_id"])], initial[str(other["item_id"])])
        active.append(row)
    return {item: finder.find(group) for item, group in initial.items()}
