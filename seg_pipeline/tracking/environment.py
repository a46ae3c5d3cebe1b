"""Log the software environment of a run (Python, packages, git, CUDA) as params, tags and a JSON artefact."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

from seg_pipeline.provenance import PACKAGES, git_info, package_version
from seg_pipeline.tracking.runs import TrackedRun
from seg_pipeline.tracking.tags import TAG_GIT_COMMIT, TAG_GIT_DIRTY

#: Distribution names whose versions describe a run's environment (importlib.metadata names).
ENVIRONMENT_PACKAGES: tuple[str, ...] = PACKAGES


def environment_info(repo_dir: Path | None = None) -> dict[str, Any]:
    """Describe the software environment: Python, platform, package versions, git and (if loaded) CUDA.

    Reads versions with ``importlib.metadata`` so nothing heavy (dagster, torch) gets imported here.
    """
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in ENVIRONMENT_PACKAGES},
    }
    git = git_info(repo_dir if repo_dir is not None else Path.cwd())
    info["git_commit"] = git.commit if git else None
    info["git_dirty"] = git.dirty if git else None
    torch_module = sys.modules.get("torch")
    if torch_module is not None:  # only describe CUDA when the caller already paid for the torch import
        cuda_available = bool(torch_module.cuda.is_available())
        info["cuda"] = {
            "available": cuda_available,
            "version": torch_module.version.cuda,
            "device": torch_module.cuda.get_device_name(0) if cuda_available else None,
        }
    return info


def log_environment(run: TrackedRun, repo_dir: Path | None = None) -> dict[str, Any]:
    """Log the environment as ``env.*`` params, the git commit as tags, and an ``environment.json`` artefact.

    Returns the environment description that was logged.
    """
    info = environment_info(repo_dir)
    params: dict[str, Any] = {"env.python": info["python"], "env.platform": info["platform"]}
    params.update(
        {f"env.{name}": version for name, version in info["packages"].items() if version is not None}
    )
    run.log_params(params)
    if info["git_commit"] is not None:
        run.set_tags({TAG_GIT_COMMIT: info["git_commit"], TAG_GIT_DIRTY: str(info["git_dirty"]).lower()})
    run.log_dict(info, "environment.json")
    return info
