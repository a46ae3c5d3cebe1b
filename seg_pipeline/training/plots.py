"""Training curves as a PNG: the loss and the monitored metric per epoch (logged with every stage)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from seg_pipeline.io import atomic_write


def plot_training_curves(history: Sequence[Mapping[str, float]], path: Path, monitor: str) -> Path | None:
    """Training curves PNG (loss and the monitored metric per epoch)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot(epochs, [h.get("train/loss", np.nan) for h in history], marker="o", label="train/loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("training loss")
    ax_metric.plot(epochs, [h.get(monitor, np.nan) for h in history], marker="o", color="tab:green")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_title(monitor)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
