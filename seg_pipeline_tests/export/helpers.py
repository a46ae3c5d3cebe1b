"""Constants and small helpers shared by the export tests (fixtures live in ``conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EXAMPLE_SIZE = 32  # one encoder stride; parity also runs 37x43 (off-stride, padded in the graph)
LINEAGE = {"mlflow_run_id": "run-123", "model_uri": "models:/demo@champion", "git_commit": "abc1234"}


def eager_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())
