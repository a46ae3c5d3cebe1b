"""Pictures of a split: where each split's tiles lie on the ground, and which classes each holds.

Both answer the questions a split table raises before anyone trains on it: do validation and test
sit in other places than train (spatial leakage shows as interleaved colours), and does every split
see the rare classes (a test split without buildings scores buildings as NaN)?
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from seg_pipeline.figures import pyplot, save_png

#: Colours of the usual split names (matplotlib's tab10), others take the next free ones.
SPLIT_COLORS = {
    "train": "#1f77b4",
    "val": "#ff7f0e",
    "test": "#2ca02c",
    "metrics_train": "#9467bd",
    "unlabeled": "#7f7f7f",
}
_SPARE_COLORS = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#d62728")


def ordered_splits(splits: Iterable[str]) -> list[str]:
    """Split names in reading order: train, val, test, metrics_train, unlabeled, then the rest."""
    known = list(SPLIT_COLORS)
    return sorted(set(splits), key=lambda s: (known.index(s) if s in known else len(known), s))


def split_colors(splits: Sequence[str]) -> dict[str, str]:
    """A colour per split name: the usual ones fixed, others from a spare list."""
    spare = iter(c for c in _SPARE_COLORS if c not in SPLIT_COLORS.values())
    return {split: SPLIT_COLORS.get(split) or next(spare, "#000000") for split in splits}


def _footprints_lonlat(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Bounds in one CRS: the tiles' own when they share one, else longitude/latitude."""
    crs_values = rows["crs"].dropna().unique()
    if len(crs_values) == 1:
        return rows, str(crs_values[0])
    from rasterio.warp import transform_bounds

    out = rows.copy()
    for index, row in rows.iterrows():
        bounds = transform_bounds(row["crs"], "EPSG:4326", row["minx"], row["miny"], row["maxx"], row["maxy"])
        out.loc[index, ["minx", "miny", "maxx", "maxy"]] = bounds
    return out, "EPSG:4326"


def plot_split_footprints(path: Path, tiles: pd.DataFrame, title: str) -> Path | None:
    """Each georeferenced tile's footprint, filled with its split's colour (None: nothing to map).

    ``tiles`` needs the catalog's ``crs``, ``georeferenced``, ``minx``/``miny``/``maxx``/``maxy``
    and the split table's ``split``.
    """
    mapped = tiles[tiles["georeferenced"].astype(bool) & tiles["crs"].notna()]
    if mapped.empty:
        return None
    mapped, crs = _footprints_lonlat(mapped)
    plt = pyplot()
    from matplotlib.patches import Patch, Rectangle

    colors = split_colors(ordered_splits(mapped["split"].unique()))
    fig, ax = plt.subplots(figsize=(7.4, 5.2))
    # larger footprints first, so small (high-zoom) chips stay visible on top of coarse ones
    area = (mapped["maxx"] - mapped["minx"]) * (mapped["maxy"] - mapped["miny"])
    for _, row in mapped.loc[area.sort_values(ascending=False).index].iterrows():
        ax.add_patch(
            Rectangle(
                (row["minx"], row["miny"]),
                row["maxx"] - row["minx"],
                row["maxy"] - row["miny"],
                facecolor=colors[row["split"]],
                edgecolor="white",
                linewidth=0.4,
                alpha=0.75,
            )
        )
    ax.set_xlim(mapped["minx"].min(), mapped["maxx"].max())
    ax.set_ylim(mapped["miny"].min(), mapped["maxy"].max())
    ax.set_aspect("equal" if crs != "EPSG:4326" else 1 / np.cos(np.radians(mapped["miny"].mean())))
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.tick_params(labelsize=7)
    ax.set_xlabel(crs, fontsize=8)
    counts = mapped["split"].value_counts()
    handles = [Patch(color=colors[s], label=f"{s} ({counts[s]})") for s in colors]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    left_out = len(tiles) - len(mapped)
    ax.set_title(title + (f"\n({left_out} tiles without georeferencing not drawn)" if left_out else ""))
    fig.tight_layout()
    return save_png(fig, path, dpi=100)


def class_shares(tiles: pd.DataFrame, class_names: Sequence[str]) -> pd.DataFrame:
    """Share of each split's labelled pixels in each class (rows: splits in reading order).

    ``tiles`` needs the catalog's ``class_counts`` (pixels per class id) and ``has_label`` and the
    split table's ``split``.
    """
    labeled = tiles[tiles["has_label"].astype(bool)]
    splits = ordered_splits(labeled["split"].unique())
    pixels = np.zeros((len(splits), len(class_names)), dtype=np.float64)
    for row_index, split in enumerate(splits):
        for counts in labeled.loc[labeled["split"] == split, "class_counts"]:
            values = np.asarray(counts if counts is not None else [], dtype=np.float64)[: len(class_names)]
            pixels[row_index, : len(values)] += values
    shares = pixels / np.maximum(pixels.sum(axis=1, keepdims=True), 1.0)
    return pd.DataFrame(shares, index=pd.Index(splits, name="split"), columns=list(class_names))


def plot_class_shares(
    path: Path, tiles: pd.DataFrame, class_names: Sequence[str], palette: np.ndarray, title: str
) -> Path | None:
    """One bar per split: the share of its labelled pixels in each class (:func:`class_shares`),
    with the labelled tiles each split holds.
    """
    shares = class_shares(tiles, class_names).iloc[::-1]  # barh draws bottom-up
    if shares.empty:
        return None
    splits = list(shares.index)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.55 * len(splits)))
    left = np.zeros(len(splits))
    for class_id, name in enumerate(class_names):
        column = shares[name].to_numpy()
        ax.barh(splits, column, left=left, color=palette[class_id] / 255, label=name)
        for row_index, share in enumerate(column):
            if share >= 0.06:  # label segments wide enough to hold the number
                light = palette[class_id].mean() < 110
                ax.text(
                    left[row_index] + share / 2, row_index, f"{share:.0%}", ha="center", va="center",
                    fontsize=7, color="white" if light else "black",
                )  # fmt: skip
        left += column
    tiles_per_split = tiles[tiles["has_label"].astype(bool)]["split"].value_counts()
    ax.set_yticks(range(len(splits)), [f"{s} ({tiles_per_split[s]} tiles)" for s in splits])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of labelled pixels")
    ax.set_title(title, pad=24)
    ax.legend(fontsize=7, ncol=min(len(class_names), 6), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return save_png(fig, path, dpi=100)
