"""Whole-pipeline wall time and the share spent outside asset/check compute (orchestration overhead).

Runs ``dagster job execute -m seg_pipeline.definitions -j full_pipeline_job -c configs/demo.yaml`` as a user
would (fresh temp DAGSTER_HOME and data root holding the demo raw tiles), then reads the run's
step statistics from the Dagster instance: overhead = process wall time - sum of step durations
(interpreter start, imports, run/event bookkeeping between steps).

    .venv/bin/python bench/bench_pipeline.py            # runs the job (minutes)
    .venv/bin/python bench/bench_pipeline.py --analyze-home .dagster --wall 0   # latest run only
    .venv/bin/python bench/bench_pipeline.py --tree /tmp/old_checkout   # another commit's code, same data

After the run it prints the demo's test-split scores (``seg-pipeline summary``), so that settings
which trade speed for quality (``amp``, ``bf16``) are judged on both in one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATS_CODE = """
import json, dagster as dg
inst = dg.DagsterInstance.get()
run = inst.get_runs(limit=1)[0]
stats = inst.get_run_stats(run.run_id)
steps = [(s.step_key, s.end_time - s.start_time) for s in inst.get_run_step_stats(run.run_id)
         if s.end_time and s.start_time]
print(json.dumps({"run_id": run.run_id, "job": run.job_name, "status": str(run.status),
                  "run_seconds": stats.end_time - stats.start_time, "steps": steps}))
"""


def run_stats(home: Path) -> dict:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-c", STATS_CODE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="run config (default: the tree's configs/demo.yaml)")
    parser.add_argument("--analyze-home", type=Path, help="only analyse the latest run of this DAGSTER_HOME")
    parser.add_argument("--wall", type=float, default=0.0, help="process wall time of that run, if known")
    parser.add_argument("--keep", action="store_true", help="keep the temp DAGSTER_HOME and data root")
    parser.add_argument(
        "--tree", type=Path, default=REPO, help="checkout to run (e.g. a worktree of an old commit)"
    )
    args = parser.parse_args()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} | {platform.platform()} | cpus={os.cpu_count()}")
    if args.analyze_home:
        stats, wall = run_stats(args.analyze_home.resolve()), args.wall
    else:
        work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
        try:
            home, data = work / "home", work / "data"
            home.mkdir()
            shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
            for name in ("demo", "demo_aux"):
                shutil.copytree(REPO / "data" / "raw" / name, data / "raw" / name)
            tree = args.tree.resolve()
            env = {
                **os.environ,
                "PYTHONPATH": str(tree),  # ahead of the editable install of this checkout
                "DAGSTER_HOME": str(home),
                "SEG_PIPELINE_DATA_ROOT": str(data),
                "MLFLOW_DISABLE_TELEMETRY": "true",
            }
            start = time.perf_counter()
            done = subprocess.run(
                [
                    str(Path(sys.executable).with_name("dagster")),
                    "job",
                    "execute",
                    "-m",
                    "seg_pipeline",
                    "-j",
                    "full_pipeline_job",
                    "-c",
                    args.config or str(tree / "configs" / "demo.yaml"),
                    # datasets are partitions since this tree; older trees take no partition
                    *(
                        ["--tags", json.dumps({"dagster/partition": "demo"})]
                        if (tree / "seg_pipeline" / "defs" / "partitions.py").is_file()
                        else []
                    ),
                ],
                cwd=tree,
                env=env,
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - start
            if done.returncode != 0:
                sys.exit(f"job failed:\n{done.stderr[-3000:]}")
            stats = run_stats(home)
            for line in done.stderr.splitlines():
                if "training on " in line or "inference precision" in line:
                    print("log:", line.strip()[-160:])
            cli = [sys.executable, "-m", "seg_pipeline.cli", "--data-root", str(data)]
            summary = subprocess.run(
                [*cli, "summary", "--dataset", "demo"], cwd=tree, env=env, capture_output=True, text=True
            )
            print(summary.stdout.strip() or summary.stderr.strip()[-2000:])
            for report in sorted((data / "reports").glob("*/metrics.json")):
                scores = json.loads(report.read_text())["scores"]
                print("test mIoU:", ", ".join(f"{name} {s['miou']:.4f}" for name, s in scores.items()))
        finally:
            if args.keep:
                print(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    step_total = sum(seconds for _, seconds in stats["steps"])
    print(f"run {stats['run_id']} ({stats['job']}, {stats['status']})")
    print(f"{'step':<52}{'seconds':>9}")
    for key, seconds in stats["steps"]:
        print(f"{key:<52}{seconds:>9.1f}")
    print(f"{'sum of steps':<52}{step_total:>9.1f}")
    print(f"{'run (first to last event)':<52}{stats['run_seconds']:>9.1f}")
    if wall:
        overhead = wall - step_total
        print(f"{'process wall time':<52}{wall:>9.1f}")
        print(
            f"orchestration overhead: {overhead:.1f}s = {overhead / wall:.1%} of wall time "
            f"(steps {step_total / wall:.1%})"
        )


if __name__ == "__main__":
    main()
