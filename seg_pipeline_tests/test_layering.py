"""The layers import only downward, the library never imports Dagster, and the Definitions load plainly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "seg_pipeline"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
DAGSTER_LAYER = ("defs", "definitions.py")


def _library_modules() -> list[str]:
    return sorted(
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        for p in PACKAGE.rglob("*.py")
        if p.relative_to(PACKAGE).parts[0] not in DAGSTER_LAYER and p.name != "__main__.py"
    )


def test_library_modules_do_not_import_dagster_even_at_run_time() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {_library_modules()!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')]\n"
        "print('DAGSTER_IMPORTED' if bad else 'CLEAN')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("CLEAN"), done.stdout + done.stderr


def test_import_contracts_hold_including_imports_inside_functions() -> None:
    """``lint-imports`` (import-linter) reads every import statement, those inside functions too."""
    assert LINT_IMPORTS.exists() or shutil.which("lint-imports"), "install the dev extras (import-linter)"
    done = subprocess.run([str(LINT_IMPORTS)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_the_definitions_load_in_a_fresh_interpreter_without_import_tricks() -> None:
    code = (
        "import sys\n"
        "import seg_pipeline\n"
        "assert 'dagster' not in sys.modules and 'torch' not in sys.modules, 'the package import is light'\n"
        "from seg_pipeline.defs.definitions import defs\n"
        "defs.resolve_job_def('full_pipeline_job')\n"
        "from seg_pipeline.definitions import defs as same\n"
        "print(type(defs).__name__, same is defs, seg_pipeline.dagster_defs is defs)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "Definitions True True"


HEAVY = ("torch", "segmentation_models_pytorch", "timm", "mlflow")


def test_loading_the_code_location_imports_no_torch_smp_or_mlflow(tmp_path: Path) -> None:
    """Dagster loads the definitions in every step subprocess: the heavy stack loads in the steps
    that use it. Checked with a cold encoder-name cache (its first fill imports smp in a child) and
    then again with the cache in place.
    """
    code = (
        "import sys\n"
        "from seg_pipeline.definitions import defs\n"
        "defs.resolve_job_def('full_pipeline_job')\n"
        "import seg_pipeline.workflows.ingest\n"  # what the ingest steps and their checks run
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "SEG_PIPELINE_CACHE_DIR": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert list((tmp_path / "cache").glob("smp-*-encoders.json")), "the first load fills the cache"
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip() == "[]", again.stdout


def test_dagster_finds_the_jobs_with_the_package_name_alone(tmp_path: Path) -> None:
    """``dagster job execute -m seg_pipeline`` works as well as ``-m seg_pipeline.definitions``."""
    from seg_pipeline_tests.defs.cli_helpers import new_dagster_home

    dagster_cli = Path(sys.executable).with_name("dagster")
    env = {**os.environ, "DAGSTER_HOME": str(new_dagster_home(tmp_path / "home"))}  # a clean clone has none
    done = subprocess.run(
        [str(dagster_cli), "job", "list", "-m", "seg_pipeline"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "full_pipeline_job" in done.stdout and "train_job" in done.stdout


def test_dg_loads_the_same_definitions_from_pyproject() -> None:
    """``dg`` finds the project through ``[tool.dg]`` and loads ``seg_pipeline.definitions``."""
    import json

    dg_cli = Path(sys.executable).with_name("dg")
    done = subprocess.run([str(dg_cli), "list", "defs", "--json"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    listed = json.loads(done.stdout)
    assets = {asset["asset_key"] for asset in listed["assets"]}
    assert {"tile_headers", "pretrained_model", "champion_model"} <= assets
    assert {r["name"] for r in listed["resources"]} == {"storage", "mlflow", "io_manager"}
