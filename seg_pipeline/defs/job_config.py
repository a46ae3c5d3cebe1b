"""One run config for every job: the part of a (composed) run config that a given job takes.

Dagster refuses config for ops a job does not run, so a full-pipeline file such as
``configs/kampala.yaml`` cannot be passed to ``ingest_job`` as it is. This module keeps the
sections of the job's own assets and runs ``dagster job execute`` on them, so one file serves
every job::

    python -m seg_pipeline.defs.job_config --job ingest_job -c configs/kampala.yaml --execute \
        --dataset kampala
    seg-pipeline ingest --config configs/kampala.yaml --dataset kampala   # the same, from the package CLI
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from seg_pipeline.defs.partitions import PARTITION_TAG
from seg_pipeline.defs.pipeline.jobs import PRESET_CONFIGS
from seg_pipeline.settings.compose import compose


def job_sections(job: str, config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The run config of ``job`` within ``config`` and the names of the op sections left out."""
    if job not in PRESET_CONFIGS:
        raise ValueError(f"job={job!r} is not one of {sorted(PRESET_CONFIGS)}")
    own = set(PRESET_CONFIGS[job]["ops"])
    ops = dict(config.get("ops") or {})
    kept = {name: section for name, section in ops.items() if name in own}
    dropped = sorted(set(ops) - own)
    result: dict[str, Any] = {key: value for key, value in config.items() if key not in ("ops",)}
    if kept:
        result["ops"] = kept
    return result, dropped


def execute(job: str, configs: Sequence[Path], dataset: str, module: str = "seg_pipeline.definitions") -> int:
    """Run ``dagster job execute`` for ``job`` on its sections of the composed ``configs``, for the
    ``dataset`` partition (registered when the run starts if its raw folder exists).
    """
    sections, dropped = job_sections(job, compose(configs))
    if dropped:
        print(f"{job}: leaving out the sections of other jobs' assets: {', '.join(dropped)}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="seg-pipeline-run-config-") as folder:
        path = Path(folder) / f"{job}.yaml"
        path.write_text(yaml.safe_dump(sections, sort_keys=False))
        tags = json.dumps({PARTITION_TAG: dataset})
        command = ["dagster", "job", "execute", "-m", module, "-j", job, "-c", str(path), "--tags", tags]
        dagster = Path(sys.executable).with_name("dagster")
        if dagster.is_file():
            command[0] = str(dagster)
        return subprocess.call(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Print (or ``--execute``) one job's part of the run config composed from ``-c`` files."""
    parser = argparse.ArgumentParser(
        prog="python -m seg_pipeline.defs.job_config", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--job", required=True, help=f"one of {', '.join(sorted(PRESET_CONFIGS))}")
    parser.add_argument(
        "-c", "--config", action="append", type=Path, default=[], help="run config YAML; repeat to compose"
    )
    parser.add_argument("--execute", action="store_true", help="run the job on it with dagster job execute")
    parser.add_argument("--dataset", default="demo", help="with --execute: the dataset partition to run")
    args = parser.parse_args(argv)
    try:
        if args.execute:
            return execute(args.job, args.config, args.dataset)
        sections, _dropped = job_sections(args.job, compose(args.config))
    except (ValueError, OSError) as error:
        print(f"job_config: error: {error}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(sections, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
