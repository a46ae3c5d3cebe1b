"""Report pictures: confusion matrix heat map and prediction overlays (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from seg_pipeline.io import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


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

    rgb = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    rgb = rgb.astype(np.float32).transpose(1, 2, 0)
    low, high = np.percentile(rgb, 2), np.percentile(rgb, 98)
    rgb = np.clip((rgb - low) / max(float(high - low), 1e-6), 0, 1)

    def colour(classes: np.ndarray) -> np.ndarray:
        out = np.zeros((*classes.shape, 3), dtype=np.uint8)
        valid = classes < len(palette)
        out[valid] = palette[classes[valid]]
        return out

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
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
