"""The library never imports Dagster; the Dagster layer is the only place that does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "seg_pipeline"


def test_library_modules_do_not_import_dagster() -> None:
    modules = sorted(
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        for p in PACKAGE.rglob("*.py")
        if "defs" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')]\n"
        "print('DAGSTER_IMPORTED' if bad else 'CLEAN')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("CLEAN"), done.stdout + done.stderr


def test_package_exposes_definitions_when_loaded_by_dagster() -> None:
    code = "import dagster, seg_pipeline; print(type(seg_pipeline.defs).__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "Definitions"
