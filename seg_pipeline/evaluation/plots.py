"""Report pictures: confusion matrix, per-class IoU by model, prediction overlays and a gallery."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seg_pipeline.figures import pyplot as _pyplot
from seg_pipeline.figures import save_png


def plot_confusion_matrix(path: Path, matrix: np.ndarray, class_names: Sequence[str], title: str) -> Path:
    """Row-normalised confusion matrix (recall per true class) with the raw counts annotated."""
    plt = _pyplot()
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros_like(matrix, dtype=float), where=totals > 0)
    size = 1.2 + 0.7 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(
                j,
                i,
                f"{normalised[i, j]:.2f}",
                ha="center",
                va="center",
                color="white" if normalised[i, j] > 0.5 else "black",
                fontsize=7,
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def plot_overlay(
    path: Path,
    image: np.ndarray,
    truth: np.ndarray,
    prediction: np.ndarray,
    palette: np.ndarray,
    class_names: Sequence[str],
    title: str,
    ignore_index: int = 255,
) -> Path:
    """Image | ground truth | prediction | errors, side by side, with a legend."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    rgb = display_rgb(image)

    def colour(classes: np.ndarray) -> np.ndarray:
        return colour_classes(classes, palette)

    errors = (prediction != truth) & (truth != ignore_index)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, picture, caption in zip(
        axes,
        (rgb, colour(truth), colour(prediction), errors),
        ("image", "ground truth", "prediction", f"errors ({errors.mean():.1%})"),
        strict=True,
    ):
        ax.imshow(picture, cmap="Reds" if picture is errors else None, interpolation="nearest")
        ax.set_title(caption)
        ax.axis("off")
    handles = [Patch(color=palette[i] / 255, label=name) for i, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save_png(fig, path, dpi=90)


def display_rgb(image: np.ndarray) -> np.ndarray:
    """The first three bands (or the first, greyed) of a ``(bands, H, W)`` image as ``(H, W, 3)`` floats
    in [0, 1], stretched between the 2nd and 98th percentiles (what a GIS shows by default).
    """
    rgb = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    rgb = rgb.astype(np.float32).transpose(1, 2, 0)
    low, high = np.percentile(rgb, 2), np.percentile(rgb, 98)
    return np.clip((rgb - low) / max(float(high - low), 1e-6), 0, 1)


def colour_classes(classes: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """A class map in the dataset's colours; ids outside the palette (ignore, nodata) stay black."""
    out = np.zeros((*classes.shape, 3), dtype=np.uint8)
    valid = classes < len(palette)
    out[valid] = palette[classes[valid]]
    return out


def plot_per_class_iou(
    path: Path,
    iou: Mapping[str, Mapping[str, float]],
    class_names: Sequence[str],
    ensemble: str,
    best_single: str,
    title: str,
) -> Path:
    """Grouped bars: each class's IoU for every model, the ensemble's gain over the best single
    model written above each group (green when it gains, red when it loses).
    """
    plt = _pyplot()
    models = list(iou)
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(class_names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(class_names) + 2), 3.8))
    colors = plt.get_cmap("tab10")
    for index, model in enumerate(models):
        values = [iou[model].get(name, np.nan) for name in class_names]
        ax.bar(
            x - 0.4 + width * (index + 0.5),
            np.nan_to_num(values),
            width,
            label=model,
            color="black" if model == ensemble else colors(index),
            alpha=0.85,
        )
    for position, name in zip(x, class_names, strict=True):
        delta = iou[ensemble].get(name, np.nan) - iou[best_single].get(name, np.nan)
        if np.isfinite(delta):
            ax.text(
                position, 1.02, f"{delta:+.3f}", ha="center", fontsize=8,
                color="tab:green" if delta > 0 else ("tab:red" if delta < 0 else "0.3"),
            )  # fmt: skip
    ax.set_xticks(
        x,
        class_names,
        rotation=30 if len(class_names) > 5 else 0,
        ha="right" if len(class_names) > 5 else "center",
    )
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("IoU")
    ax.set_title(f"{title}\n(above each class: {ensemble} - {best_single})", fontsize=10)
    ax.legend(fontsize=8, ncol=min(len(models), 4), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)


@dataclass(frozen=True)
class GalleryTile:
    """One row of the gallery: an image and its class maps (``truth`` None when unlabeled)."""

    name: str
    image: np.ndarray
    prediction: np.ndarray
    truth: np.ndarray | None = None


def plot_gallery(
    path: Path, tiles: Sequence[GalleryTile], palette: np.ndarray, class_names: Sequence[str], title: str
) -> Path | None:
    """Image | ground truth | prediction for a few tiles, one row each, with one legend."""
    if not tiles:
        return None
    plt = _pyplot()
    from matplotlib.patches import Patch

    with_truth = any(tile.truth is not None for tile in tiles)
    columns = 3 if with_truth else 2
    height = 2.8 * len(tiles) + 0.8
    fig, axes = plt.subplots(len(tiles), columns, figsize=(3.0 * columns, height))
    axes = np.atleast_2d(axes)
    for row, tile in zip(axes, tiles, strict=True):
        panels: list[tuple[np.ndarray | None, str]] = [(display_rgb(tile.image), tile.name)]
        if with_truth:
            truth = colour_classes(tile.truth, palette) if tile.truth is not None else None
            panels.append((truth, "ground truth" if truth is not None else "no label"))
        panels.append((colour_classes(tile.prediction, palette), "prediction"))
        for ax, (picture, caption) in zip(row, panels, strict=True):
            if picture is not None:
                ax.imshow(picture, interpolation="nearest")
            ax.set_title(caption, fontsize=8)
            ax.axis("off")
    handles = [Patch(color=palette[i] / 255, label=name) for i, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.55 / height, 1, 1 - 0.3 / height))
    return save_png(fig, path, dpi=80)
