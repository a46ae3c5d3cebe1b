"""Thin helpers over ``torch.distributed`` for DDP training launched with torchrun (F16).

Every helper also works in a plain single process (rank 0 of 1), so library code can call them
unconditionally. Data partitioning across ranks is the data loader's job (it reads :func:`rank`
and :func:`world_size`); the loop only averages losses, broadcasts validation metrics from rank 0
and lets rank 0 alone log and write checkpoints.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    backend: str | None
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        """Whether more than one rank trains."""
        return self.world_size > 1


def is_initialized() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 logs, evaluates and writes checkpoints."""
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as error:
        raise ValueError(
            f"environment variable {name}={raw!r} must be an integer (set by torchrun)."
        ) from error


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistributedInfo:
    """Join the process group described by torchrun's env vars, or stay single-process.

    Args:
        backend: ``nccl`` or ``gloo``; default NCCL when CUDA is available, else gloo.
        timeout_s: collective timeout.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and rank 0 of 1 is
    returned. On CUDA the process binds to ``cuda:LOCAL_RANK``.
    """
    world = _env_int("WORLD_SIZE", 1)
    global_rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available()
    chosen = backend or ("nccl" if use_cuda else "gloo")
    if chosen not in ("nccl", "gloo", "mpi", "ucc"):
        raise ValueError(f"backend={backend!r} is unknown; use 'nccl' (GPU) or 'gloo' (CPU).")
    if chosen == "nccl" and not use_cuda:
        raise ValueError("backend='nccl' needs CUDA, which is not available here; use backend='gloo'.")
    device = torch.device("cuda", local_rank) if use_cuda and chosen == "nccl" else torch.device("cpu")
    if world <= 1 and not is_initialized():
        return DistributedInfo(0, 0, 1, None, device if use_cuda else torch.device("cpu"))
    if not 0 <= global_rank < world:
        raise ValueError(f"RANK={global_rank} is outside [0, WORLD_SIZE={world}).")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing and not is_initialized():
        raise ValueError(f"WORLD_SIZE={world} but {missing} are not set; launch with torchrun or set them.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not is_initialized():
        dist.init_process_group(
            backend=chosen,
            init_method="env://",
            rank=global_rank,
            world_size=world,
            timeout=_dt.timedelta(seconds=timeout_s),
        )
    return DistributedInfo(dist.get_rank(), local_rank, dist.get_world_size(), dist.get_backend(), device)


def barrier() -> None:
    """Wait for all ranks (no-op single-process)."""
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, device: torch.device | None = None, **ddp_kwargs: Any) -> nn.Module:
    """Wrap ``model`` in DDP when running distributed; returns it unchanged otherwise.

    ``device`` is the model's device; CUDA models get ``device_ids=[index]`` as DDP requires.
    """
    if world_size() <= 1 or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[index], output_device=index, **ddp_kwargs
        )
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP/DataParallel wrapper (its state_dict has no ``module.`` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel) else model


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op single-process); returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def min_across_ranks(value: int, device: torch.device | None = None) -> int:
    """The smallest ``value`` of all ranks (itself single-process); every rank must call it."""
    if world_size() <= 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def in_lockstep(batches: Iterable[Any], device: torch.device | None = None) -> Iterator[Any]:
    """Yield batches only while every rank still has one, so all ranks run the same number of steps.

    Shards split across ranks by whole shards can leave one rank a few batches more than another;
    that rank's extra backward pass would wait forever for gradients the others never send. One
    tiny all-reduce per batch ends the epoch on every rank as soon as any rank runs out (the
    surplus is dropped for this epoch, as ``DistributedSampler(drop_last=True)`` would).
    """
    if world_size() <= 1:
        yield from batches
        return
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if min_across_ranks(0 if batch is None else 1, device) == 0:
            return
        yield batch


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to every rank (e.g. rank 0's validation metrics)."""
    if world_size() <= 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(value: Any) -> list[Any]:
    """Collect one picklable object per rank, ordered by rank (``[value]`` single-process)."""
    if world_size() <= 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered
