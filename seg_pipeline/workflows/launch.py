"""Run a training stage in this process or on N torchrun ranks, with one call (F16 in docs/architecture.md).

:func:`launch_stage` is what the Dagster training assets call: with ``nproc_per_node=1`` it is
:func:`~seg_pipeline.workflows.stage.run_stage` in the step's own process; with more it writes the
:class:`~seg_pipeline.workflows.stage.StageJob` as JSON and starts ``torchrun --standalone
--nproc_per_node N -m seg_pipeline.workflows.launch JOB RESULT``. Every rank runs the same
``run_stage``, which joins the process group from torchrun's environment (NCCL on GPU, gloo on
CPU), splits the shards across ranks and lets rank 0 alone write checkpoints, talk to MLflow and
write the result file. The children's output is streamed to ``log_fn`` line by line, so progress
lines reach the Dagster log. Both paths return the same :class:`~seg_pipeline.contracts.TrainedModel`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from seg_pipeline.contracts import TrainedModel
from seg_pipeline.io import write_text
from seg_pipeline.progress import default_log_fn
from seg_pipeline.workflows.stage import StageJob, run_stage

LogFn = Callable[[str], None]
#: Lines of the children's output kept for the error message when torchrun fails.
_TAIL_LINES = 40
_RANK_ERROR = re.compile(r"^\[rank\d+\]: [\w.]*(Error|Exception)\b")


def check_nproc(nproc_per_node: int, device: str) -> None:
    """Refuse impossible rank counts before any process starts."""
    if not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise ValueError(f"nproc_per_node={nproc_per_node!r}: must be an integer >= 1 (1 = no torchrun)")
    if nproc_per_node > 1 and device.startswith("cuda"):
        import torch

        available = torch.cuda.device_count()
        if nproc_per_node > available:
            raise ValueError(
                f"nproc_per_node={nproc_per_node} but only {available} CUDA device(s) are visible: "
                "one process per GPU; lower nproc_per_node or use device='cpu' (gloo)"
            )


def _torchrun(job_path: Path, result_path: Path, nproc_per_node: int, stage: str, log: LogFn) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
        "-m", "seg_pipeline.workflows.launch", str(job_path), str(result_path),
    ]  # fmt: skip
    log(f"{stage}: starting {nproc_per_node} DDP ranks (torchrun --standalone)")
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    rank_errors: list[str] = []  # "[rankN]: SomeError: ..." lines: the cause, above torchrun's report
    # One intra-op thread per rank unless the user chose otherwise (torchrun's own default).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if _RANK_ERROR.match(line):
                rank_errors.append(line)
            log(line)
    if proc.returncode != 0 or not result_path.exists():
        cause = "\n".join(rank_errors[:4]) or "no rank error line (see the output above)"
        raise RuntimeError(
            f"{stage}: torchrun with {nproc_per_node} ranks failed (exit {proc.returncode}): "
            f"{cause}\nlast output:\n" + "\n".join(tail)
        )


def launch_stage(job: StageJob, nproc_per_node: int = 1, log_fn: LogFn | None = None) -> TrainedModel:
    """Train ``job`` in this process (``nproc_per_node=1``) or on ``nproc_per_node`` torchrun ranks.

    Raises:
        ValueError: ``nproc_per_node`` is impossible (below 1, or more CUDA ranks than GPUs).
        RuntimeError: a torchrun rank failed; the message holds the tail of its output.
    """
    check_nproc(nproc_per_node, job.settings.loop.device)
    if nproc_per_node == 1:
        return run_stage(job, log_fn=log_fn)
    log = log_fn or default_log_fn()
    with tempfile.TemporaryDirectory(prefix="seg-pipeline-torchrun-") as folder:
        job_path, result_path = Path(folder) / "job.json", Path(folder) / "result.json"
        write_text(job_path, job.to_json())
        _torchrun(job_path, result_path, nproc_per_node, job.stage, log)
        return TrainedModel.from_json(result_path.read_text())


def _run_rank(job_path: Path, result_path: Path) -> None:
    """One rank's share of a job file (every rank trains; rank 0 writes the result)."""
    from seg_pipeline.training import distributed

    job = StageJob.from_json(job_path.read_text())
    prefix = f"[rank {os.environ.get('RANK', '0')}] "
    try:
        result = run_stage(job, log_fn=lambda line: print(prefix + line, flush=True))
        if distributed.is_main_process():
            write_text(result_path, result.to_json())
    finally:
        distributed.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m seg_pipeline.workflows.launch JOB RESULT`` (started by torchrun, one per rank)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        raise SystemExit("usage: torchrun ... -m seg_pipeline.workflows.launch JOB.json RESULT.json")
    _run_rank(Path(args[0]), Path(args[1]))


if __name__ == "__main__":
    main()
