"""What this machine can do fast, detected rather than assumed (machines differ between sessions)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

#: The CPU flag that makes bf16 autocast pay off (Intel AMX tiles with bf16 support).
AMX_FLAG = "amx_bf16"


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where there is no ``/proc/cpuinfo``)."""
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU has AMX bf16 tiles (bf16 autocast then beats fp32; without them it does not)."""
    return AMX_FLAG in cpu_flags()


def describe_precision(
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    note: str = "",
    *,
    loss_scaling: bool = False,
) -> str:
    """One line for logs, run params and metadata, e.g. ``cpu bf16-autocast channels_last (why)``.

    Training and inference both describe their precision with it, so the two read alike.
    """
    fp16 = "fp16-autocast+gradscaler" if loss_scaling else "fp16-autocast"
    names: dict[torch.dtype | None, str] = {torch.bfloat16: "bf16-autocast", torch.float16: fp16}
    layout = "channels_last" if channels_last else "contiguous"
    text = f"{device} {names.get(amp_dtype, 'fp32')} {layout}"
    return f"{text} ({note})" if note else text


DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def mps_available() -> bool:
    """Whether Apple's MPS backend exists in this torch build and can run here."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn ``auto|cuda|mps|cpu`` (or ``cuda:1``) into a usable :class:`torch.device`.

    ``auto`` prefers CUDA, then MPS, then CPU. Asking for an accelerator that is not there raises
    instead of silently training on the CPU for hours.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str) or name.split(":")[0] not in DEVICE_CHOICES:
        raise ValueError(f"device={name!r} is not one of {DEVICE_CHOICES} (optionally 'cuda:<index>').")
    kind = name.split(":")[0]
    if kind == "auto":
        if ":" in name:
            raise ValueError(f"device={name!r}: 'auto' takes no index; use 'cuda:<index>' instead.")
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={name!r} but torch.cuda.is_available() is False (torch {torch.__version__}); "
            "use device='auto' or 'cpu', or install a CUDA build of torch on a GPU machine."
        )
    if kind == "mps" and not mps_available():
        raise ValueError(f"device={name!r} but the MPS backend is not available; use 'auto' or 'cpu'.")
    device = torch.device(name)
    if kind == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible.")
    return device


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads, restoring the previous count.

    Main-process work beside busy DataLoader workers wants one: torch's default threads spin
    against the workers (bench/RESULTS.md, 2026-12-07).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes of memory available to new allocations now (``MemAvailable``; free pages where the
    kernel has no such line), or ``None`` where neither can be read.
    """
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
