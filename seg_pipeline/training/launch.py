"""Run a training stage in this process or under torchrun, with one call (DESIGN F16).

:func:`train_stage` is what the Dagster training assets call: with ``nproc_per_node=1`` it is
:func:`~seg_pipeline.training.stages.run_stage` in the step's own process; with more it writes the
call to a JSON job file and starts ``torchrun --standalone --nproc_per_node N -m
seg_pipeline.training.launch JOB RESULT``. Every rank runs the same ``run_stage``, which joins the
process group from torchrun's environment (NCCL on GPU, gloo on CPU), splits the shards across
ranks and lets rank 0 alone write checkpoints, talk to MLflow and write the result file. The
children's output is streamed to ``log_fn`` line by line, so progress lines reach the Dagster log.
Both paths return the same plain value (``StageResult.to_value()``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import types
import typing
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from seg_pipeline.io import atomic_write
from seg_pipeline.progress import default_log_fn

LogFn = Callable[[str], None]
#: Lines of the children's output kept for the error message when torchrun fails.
_TAIL_LINES = 40
_RANK_ERROR = re.compile(r"^\[rank\d+\]: [\w.]*(Error|Exception)\b")


def dataclass_to_json(value: Any) -> Any:
    """Dataclasses, paths and tuples as JSON-ready data (the job file handed to every rank)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: dataclass_to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): dataclass_to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [dataclass_to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _from_annotation(annotation: Any, data: Any) -> Any:
    """Rebuild ``data`` as ``annotation`` (dataclass, Path, tuple, optional of those)."""
    if data is None:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        structured = [a for a in options if dataclasses.is_dataclass(a) or a is Path]
        return _from_annotation(structured[0] if structured else options[0], data)
    if dataclasses.is_dataclass(annotation):
        return dataclass_from_json(annotation, data)
    if annotation is Path:
        return Path(data)
    if origin is tuple:
        return tuple(data)
    return data


def dataclass_from_json(cls: type, data: Mapping[str, Any]) -> Any:
    """Inverse of :func:`dataclass_to_json` for a dataclass type (nested dataclasses, paths, tuples)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} got unknown keys {unknown}; valid keys are {sorted(known)}")
    return cls(**{name: _from_annotation(hints[name], value) for name, value in data.items()})


def _check_nproc(nproc_per_node: int, device: str) -> None:
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


def train_stage(
    stage: str,
    config: Any,
    sources: Sequence[Any],
    target: Any,
    checkpoint_dir: Path | str,
    *,
    nproc_per_node: int = 1,
    log_fn: LogFn | None = None,
    **run_stage_kwargs: Any,
) -> dict[str, Any]:
    """Train one stage in this process (``nproc_per_node=1``) or on ``nproc_per_node`` torchrun ranks.

    ``run_stage_kwargs`` are those of :func:`~seg_pipeline.training.stages.run_stage`
    (``init_checkpoint``, ``teacher_checkpoints``, ``tracking``, ``run_tags``, ``register_as``,
    ``resume``). Returns ``StageResult.to_value()`` either way.

    Raises:
        ValueError: ``nproc_per_node`` is impossible (below 1, or more CUDA ranks than GPUs).
        RuntimeError: a torchrun rank failed; the message holds the tail of its output.
    """
    _check_nproc(nproc_per_node, config.train.device)
    if nproc_per_node == 1:
        from seg_pipeline.training.stages import run_stage

        return run_stage(
            stage, config, sources, target, checkpoint_dir, log_fn=log_fn, **run_stage_kwargs
        ).to_value()
    config.validate()  # bad values fail here, before any process starts
    log = log_fn or default_log_fn()
    job = {
        "stage": stage,
        "config": dataclass_to_json(config),
        "sources": [dataclass_to_json(s) for s in sources],
        "target": dataclass_to_json(target),
        "checkpoint_dir": str(checkpoint_dir),
        "kwargs": {k: dataclass_to_json(v) for k, v in run_stage_kwargs.items()},
    }
    with tempfile.TemporaryDirectory(prefix="seg-pipeline-torchrun-") as folder:
        job_path, result_path = Path(folder) / "job.json", Path(folder) / "result.json"
        job_path.write_text(json.dumps(job))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc_per_node}",
            "-m", "seg_pipeline.training.launch", str(job_path), str(result_path),
        ]  # fmt: skip
        log(f"{stage}: starting {nproc_per_node} DDP ranks (torchrun --standalone)")
        tail: deque[str] = deque(maxlen=_TAIL_LINES)
        rank_errors: list[str] = []  # "[rankN]: SomeError: ..." lines: the cause, above torchrun's report
        # One intra-op thread per rank unless the user chose otherwise (torchrun's own default).
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                if _RANK_ERROR.match(line):
                    rank_errors.append(line)
                log(line)
        if process.returncode != 0 or not result_path.exists():
            cause = "\n".join(rank_errors[:4]) or "no rank error line (see the output above)"
            raise RuntimeError(
                f"{stage}: torchrun with {nproc_per_node} ranks failed (exit {process.returncode}): "
                f"{cause}\nlast output:\n" + "\n".join(tail)
            )
        return json.loads(result_path.read_text())


def _run_job(job: Mapping[str, Any], result_path: Path) -> None:
    """One rank's share of a job file (every rank trains; rank 0 writes the result)."""
    from seg_pipeline.training import distributed
    from seg_pipeline.training.stages import SourceSpec, StageConfig, run_stage

    kwargs = dict(job["kwargs"])
    if kwargs.get("tracking") is not None:
        from seg_pipeline.tracking import TrackingSettings

        kwargs["tracking"] = dataclass_from_json(TrackingSettings, kwargs["tracking"])
    config = dataclass_from_json(StageConfig, job["config"])
    sources = [dataclass_from_json(SourceSpec, s) for s in job["sources"]]
    target = dataclass_from_json(SourceSpec, job["target"])
    rank_prefix = f"[rank {os.environ.get('RANK', '0')}] "
    try:
        result = run_stage(
            job["stage"],
            config,
            sources,
            target,
            Path(job["checkpoint_dir"]),
            log_fn=lambda line: print(rank_prefix + line, flush=True),
            **kwargs,
        )
        if distributed.is_main_process():
            with atomic_write(result_path) as tmp:
                tmp.write_text(json.dumps(result.to_value()))
    finally:
        distributed.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m seg_pipeline.training.launch JOB RESULT`` (started by torchrun, one per rank)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        raise SystemExit("usage: torchrun ... -m seg_pipeline.training.launch JOB.json RESULT.json")
    _run_job(json.loads(Path(args[0]).read_text()), Path(args[1]))


if __name__ == "__main__":
    main()
