"""Training curves as a PNG: loss and the monitored metric per epoch (logged with every stage).

A KD stage draws its teacher's epochs first, in grey, then its own, with the point where stage 2
starts and the point where the distillation term comes in after the CE-only warmup marked: one
picture then shows what pretraining reached and what distillation added to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from seg_pipeline.figures import pyplot, save_png

History = Sequence[Mapping[str, float]]


def _series(history: History, key: str) -> list[float]:
    return [float(h.get(key, np.nan)) for h in history]


def plot_training_curves(
    history: History,
    path: Path,
    monitor: str,
    before: History = (),
    kd_warmup_epochs: int = 0,
) -> Path | None:
    """Training loss and ``monitor`` per epoch; ``before`` (the teacher's history) is drawn first.

    Args:
        history: This stage's per-epoch logs (``train/loss``, ``monitor``, ...).
        path: Where the PNG goes.
        monitor: The validation key the stage selects checkpoints by.
        before: The previous stage's per-epoch logs: with them the x axis runs over both stages and
            the start of this one is marked ("KD starts").
        kd_warmup_epochs: CE-only epochs at the start of a KD stage; the epoch after them is marked
            ("KD term on").
    """
    if not history:
        return None
    plt = pyplot()
    offset = len(before)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key, title in zip(axes, ("train/loss", monitor), ("training loss", monitor), strict=True):
        if before:
            ax.plot(range(1, offset + 1), _series(before, key), marker="o", color="0.6", label="stage 1")
        own = range(offset + 1, offset + len(history) + 1)
        ax.plot(own, _series(history, key), marker="o", color="tab:blue", label="stage 2" if before else None)
        if before:
            ax.axvline(offset + 0.5, color="tab:red", linestyle="--", label="KD starts")
            if 0 < kd_warmup_epochs < len(history):
                ax.axvline(
                    offset + kd_warmup_epochs + 0.5, color="tab:orange", linestyle=":", label="KD term on"
                )
        ax.set_xlabel("epoch (both stages)" if before else "epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if before:
        axes[1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_png(fig, path, dpi=100)
