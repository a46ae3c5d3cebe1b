"""Seeding, RNG snapshots and the run manifest (F15 in docs/architecture.md).

RNG snapshots are stored as tensors and plain numbers so checkpoints load with
``torch.load(weights_only=True)``; the manifest records what is needed to re-run a training:
the resolved config, package versions, interpreter/platform and the git commit.
"""

from __future__ import annotations

import os
import random
from typing import Any, cast

import numpy as np
import torch

from seg_pipeline.provenance import run_provenance


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy, torch (CPU and all CUDA devices) and ``PYTHONHASHSEED``.

    Args:
        seed: any non-negative integer below 2**32.
        deterministic: also ask cuDNN/torch for deterministic kernels (slower); ops without a
            deterministic implementation warn instead of failing (``warn_only=True``).

    ``PYTHONHASHSEED`` only affects subprocesses (hash randomisation of the running interpreter is
    fixed at start-up), e.g. DataLoader workers started with ``spawn``.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} is invalid: it must be an integer in [0, 2**32).")
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.deterministic = False
        torch.use_deterministic_algorithms(False)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker (and each DDP rank) its own python/numpy seed.

    torch already seeds worker ``i`` with ``base_seed + i``, where ``base_seed`` is drawn from the
    main process's (seeded) torch RNG, so ``torch.initial_seed()`` is distinct per worker and
    reproducible. Python's ``random`` and numpy are *not* reseeded by torch (with ``fork`` every
    worker would produce the same augmentations), so they are derived from it here, mixed with the
    DDP rank so that ranks do not draw identical augmentations either.
    """
    from seg_pipeline.training.distributed import rank

    sequence = np.random.SeedSequence([torch.initial_seed(), rank(), worker_id])
    python_seed, numpy_seed = (int(v) for v in sequence.generate_state(2, dtype=np.uint32))
    random.seed(python_seed)
    np.random.seed(numpy_seed)
    torch.manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF)


def capture_rng_state() -> dict[str, Any]:
    """Snapshot python/numpy/torch(/cuda) RNG states as tensors and numbers (``weights_only``-safe)."""
    version, python_internal, gauss_next = random.getstate()
    # cast: numpy's stub returns dict | tuple whatever `legacy` is; legacy=True always gives the tuple
    legacy_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_cached_gaussian = legacy_state
    state: dict[str, Any] = {
        "python_version": int(version),
        "python": torch.tensor(python_internal, dtype=torch.int64),
        "python_gauss_next": gauss_next,
        "numpy_keys": torch.from_numpy(numpy_keys.astype(np.int64)),
        "numpy_pos": int(numpy_pos),
        "numpy_has_gauss": int(numpy_has_gauss),
        "numpy_cached_gaussian": float(numpy_cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states are restored only when device counts match."""
    internal = tuple(int(v) for v in state["python"].tolist())
    random.setstate((int(state["python_version"]), internal, state["python_gauss_next"]))
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            int(state["numpy_pos"]),
            int(state["numpy_has_gauss"]),
            float(state["numpy_cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def run_manifest(config: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to trace a run: resolved config, versions, platform, git commit.

    The loop writes it as ``run_manifest.json`` next to the checkpoints.
    """
    return {
        "config": config,
        **run_provenance(),
        "torch_build": torch.__version__,  # includes the local tag (e.g. +cu130) that metadata drops
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
