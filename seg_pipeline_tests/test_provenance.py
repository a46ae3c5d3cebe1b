"""Provenance: the git commit and dirty flag, package versions and machine facts every run records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from seg_pipeline.provenance import (
    cpu_flags,
    git_commit,
    git_info,
    machine_info,
    package_versions,
    run_provenance,
)


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@x"
    return subprocess.run(["git", *args], cwd=cwd, check=True, env=env, capture_output=True, text=True).stdout


def test_git_commit_inside_and_outside_a_repository(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None
    _git(tmp_path, "init", "-q")
    (tmp_path / "f.txt").write_text("x")
    _git(tmp_path, "add", "f.txt")
    _git(tmp_path, "commit", "-q", "-m", "init")
    head = _git(tmp_path, "log", "-1", "--format=%H").strip()
    assert git_commit(tmp_path) == head
    assert git_info(tmp_path).dirty is False
    (tmp_path / "f.txt").write_text("changed")
    assert git_info(tmp_path).dirty is True


def test_package_versions_name_missing_packages_as_none() -> None:
    versions = package_versions(("numpy", "no-such-distribution-xyz"))
    assert versions["numpy"] and versions["no-such-distribution-xyz"] is None


def test_cpu_flags_are_a_subset_of_proc_cpuinfo() -> None:
    flags = set(cpu_flags())
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        line = next(ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags"))
        assert flags <= set(line.split(":", 1)[1].split())


def test_run_provenance_is_json_ready_and_never_imports_torch_itself() -> None:
    code = (
        "import sys, json; from seg_pipeline.provenance import run_provenance; "
        "json.dumps(run_provenance()); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    assert "cpu_flags" in machine_info() and run_provenance()["packages"]["numpy"]
