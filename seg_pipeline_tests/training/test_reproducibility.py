"""Tests for seeding, RNG snapshots, DataLoader worker seeds and the run manifest."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from seg_pipeline.models.checkpoint import load_checkpoint, save_checkpoint
from seg_pipeline.training.reproducibility import (
    capture_rng_state,
    restore_rng_state,
    run_manifest,
    seed_everything,
    worker_init_fn,
)


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_same_seed_same_draws_different_seed_different_draws() -> None:
    seed_everything(123)
    first = _draws()
    seed_everything(123)
    assert _draws() == first
    seed_everything(124)
    assert _draws() != first
    assert os.environ["PYTHONHASHSEED"] == "124"


def test_seed_validation_and_deterministic_flag() -> None:
    with pytest.raises(ValueError, match="seed=-1"):
        seed_everything(-1)
    try:
        seed_everything(1, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    seed_everything(7)
    np.random.randn()  # puts numpy into the cached-gaussian state
    state = capture_rng_state()
    expected = _draws()
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    seed_everything(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert _draws() == expected


class _RandomPerItem(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(
            [random.random(), float(np.random.rand()), torch.rand(()).item()], dtype=torch.float64
        )


def _worker_values(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    loader = DataLoader(
        _RandomPerItem(),
        batch_size=1,
        num_workers=2,
        worker_init_fn=worker_init_fn,
        multiprocessing_context="fork",
    )
    return torch.cat(list(loader))


def test_worker_seeds_are_distinct_per_worker_and_reproducible() -> None:
    first = _worker_values(5)
    # items 0 and 1 are the first item of worker 0 and worker 1: different python/numpy/torch draws
    assert torch.all(first[0] != first[1])
    assert torch.equal(first, _worker_values(5))
    assert not torch.equal(first, _worker_values(6))


def test_run_manifest_content_is_json_ready() -> None:
    manifest = run_manifest({"lr": 3e-4, "epochs": 2})
    assert manifest["config"] == {"lr": 3e-4, "epochs": 2}
    assert manifest["packages"]["torch"] == torch.__version__.split("+")[0]
    assert manifest["torch_build"] == torch.__version__
    assert set(manifest["packages"]) >= {
        "torchvision",
        "segmentation-models-pytorch",
        "timm",
        "numpy",
        "dagster",
    }
    assert manifest["python"] == sys.version.split()[0]
    json.dumps(manifest)


def test_run_manifest_does_not_import_dagster() -> None:
    code = (
        "import sys; from seg_pipeline.training.reproducibility import run_manifest; "
        "run_manifest({}); print('dagster' in sys.modules)"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "False"
