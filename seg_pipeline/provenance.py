"""Where a run's code came from: the git commit (and whether it was dirty), package versions, the machine.

One implementation for checkpoints' run manifests, MLflow tags and export model cards. Versions come
from ``importlib.metadata``, so nothing heavy (dagster, torch) is imported just to name a version.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

#: Distributions whose versions describe a run (importlib.metadata names).
PACKAGES: tuple[str, ...] = (
    "seg_pipeline",
    "torch",
    "torchvision",
    "segmentation-models-pytorch",
    "timm",
    "dagster",
    "mlflow",
    "rasterio",
    "numpy",
    "pandas",
    "pyarrow",
)
#: This package's folder: the default place to ask git about.
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class GitInfo:
    """The commit a run's code came from and whether tracked files had uncommitted changes."""

    commit: str
    dirty: bool


def _git(args: list[str], folder: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_info(folder: Path | str | None = None) -> GitInfo | None:
    """HEAD commit and dirty flag of the repository holding ``folder`` (default: this package)."""
    where = Path(folder) if folder is not None else PACKAGE_DIR
    commit = (_git(["rev-parse", "HEAD"], where) or "").strip()
    if not commit:
        return None
    status = _git(["status", "--porcelain", "--untracked-files=no"], where)
    return GitInfo(commit=commit, dirty=bool(status and status.strip()))


def git_commit(folder: Path | str | None = None) -> str | None:
    """``git rev-parse HEAD`` for ``folder``, or None outside a repository or without git."""
    info = git_info(folder)
    return info.commit if info else None


def package_version(distribution: str) -> str | None:
    """Installed version of ``distribution``, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None for those missing)."""
    return {name: package_version(name) for name in names}


@cache
def cpu_flags() -> tuple[str, ...]:
    """CPU feature flags that decide speed choices (AMX, AVX-512 BF16, AVX2...), from /proc/cpuinfo."""
    wanted = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx2", "fma")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return tuple(flag for flag in wanted if flag in present)
    return ()


def machine_info() -> dict[str, Any]:
    """Python, platform, CPU model and flags, core count; CUDA only when torch is already imported."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": list(cpu_flags()),
    }
    torch_module = sys.modules.get("torch")
    if torch_module is not None:  # describe torch only when the caller already paid for its import
        cuda = bool(torch_module.cuda.is_available())
        info["torch_build"] = torch_module.__version__  # keeps the local tag (+cu130) metadata drops
        info["torch_threads"] = torch_module.get_num_threads()
        info["cuda"] = {
            "available": cuda,
            "version": torch_module.version.cuda,
            "device": torch_module.cuda.get_device_name(0) if cuda else None,
        }
    return info


def run_provenance(folder: Path | str | None = None) -> dict[str, Any]:
    """Everything needed to trace a run back: git, package versions, machine, a UTC timestamp."""
    git = git_info(folder)
    return {
        "git_commit": git.commit if git else None,
        "git_dirty": git.dirty if git else None,
        "packages": package_versions(),
        **machine_info(),
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
