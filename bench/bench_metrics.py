"""Benchmark: ConfusionMatrix (one bincount per tile) vs scikit-learn confusion_matrix.

Both sides get the same random predictions and targets and produce the same per-class IoU,
Dice, precision, recall, pixel accuracy and kappa. Ours streams tile by tile, as evaluation
does; scikit-learn gets all pixels in one call (its most favourable setting) and the same
formulas written by hand on its matrix. Best of ``--repeats`` runs each.

    .venv/bin/python bench/bench_metrics.py --tiles 64 --size 512 --classes 6 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np

from seg_pipeline.metrics import ConfusionMatrix

IGNORE_VALUE = 255


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=64, help="number of tiles (default 64)")
    parser.add_argument("--size", type=int, default=512, help="tile height and width (default 512)")
    parser.add_argument("--classes", type=int, default=6, help="number of classes (default 6)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, best is kept (default 3)")
    parser.add_argument(
        "--dtype",
        choices=["int64", "uint8"],
        default="int64",
        help="label dtype: int64 is what torch argmax returns, uint8 what PNG masks hold (default int64)",
    )
    parser.add_argument(
        "--ignored-fraction",
        type=float,
        default=0.0,
        help=f"fraction of target pixels set to {IGNORE_VALUE} and ignored by both sides (default 0)",
    )
    args = parser.parse_args(argv)
    for name in ("tiles", "size", "classes", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.classes > IGNORE_VALUE and (args.dtype == "uint8" or args.ignored_fraction > 0):
        parser.error(
            f"--classes {args.classes} collides with uint8 labels or the ignore value {IGNORE_VALUE}"
        )
    if not 0.0 <= args.ignored_fraction < 1.0:
        parser.error(f"--ignored-fraction must be in [0, 1), got {args.ignored_fraction}")
    return args


def best_seconds(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time over ``repeats`` calls, and the last result (to check both sides agree)."""
    best = float("inf")
    result: object = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def hand_formulas(matrix: np.ndarray) -> dict[str, np.ndarray | float]:
    """The textbook formulas on a confusion matrix, as a scikit-learn user would write them."""
    with np.errstate(divide="ignore", invalid="ignore"):
        tp = np.diag(matrix).astype(np.float64)
        fp = matrix.sum(axis=0) - tp
        fn = matrix.sum(axis=1) - tp
        total = matrix.sum()
        po = tp.sum() / total
        pe = float(np.dot(matrix.sum(axis=1).astype(np.float64), matrix.sum(axis=0))) / total**2
        return {
            "iou": tp / (tp + fp + fn),
            "dice": 2 * tp / (2 * tp + fp + fn),
            "precision": tp / (tp + fp),
            "recall": tp / (tp + fn),
            "pixel_accuracy": po,
            "kappa": (po - pe) / (1 - pe),
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from sklearn import __version__ as sklearn_version
        from sklearn.metrics import confusion_matrix
    except ImportError:
        print(
            "scikit-learn is missing: install it with `.venv/bin/pip install -c constraints.txt scikit-learn`"
        )
        return 1

    rng = np.random.default_rng(0)
    shape = (args.tiles, args.size, args.size)
    targets = rng.integers(0, args.classes, size=shape).astype(args.dtype)
    preds = rng.integers(0, args.classes, size=shape).astype(args.dtype)
    ignore_index = None
    if args.ignored_fraction > 0:
        ignore_index = IGNORE_VALUE
        targets[rng.random(shape) < args.ignored_fraction] = IGNORE_VALUE
    labels = np.arange(args.classes)

    def ours() -> np.ndarray:
        accumulator = ConfusionMatrix(args.classes, ignore_index=ignore_index)
        for pred_tile, target_tile in zip(preds, targets, strict=True):
            accumulator.update(pred_tile, target_tile)
        metrics = accumulator.compute()
        return metrics.matrix

    def scikit_learn() -> np.ndarray:
        y_true, y_pred = targets.ravel(), preds.ravel()
        if ignore_index is not None:
            keep = y_true != ignore_index
            y_true, y_pred = y_true[keep], y_pred[keep]
        matrix = confusion_matrix(y_true, y_pred, labels=labels)
        hand_formulas(matrix)
        return matrix

    ours_s, ours_matrix = best_seconds(ours, args.repeats)
    sklearn_s, sklearn_matrix = best_seconds(scikit_learn, args.repeats)
    if not np.array_equal(ours_matrix, sklearn_matrix):
        print("ERROR: the two confusion matrices differ")
        return 2

    pixels = args.tiles * args.size * args.size
    print(f"date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    cpu = platform.processor() or platform.machine()
    print(f"machine: {platform.platform()} | {cpu} | cpus={os.cpu_count()}")
    print(f"python {platform.python_version()} | numpy {np.__version__} | scikit-learn {sklearn_version}")
    print(
        f"data: {args.tiles} x {args.size}x{args.size} ({pixels / 1e6:.1f} Mpx), {args.classes} classes, "
        f"dtype {args.dtype}, ignored fraction {args.ignored_fraction}, best of {args.repeats}"
    )
    print()
    print(f"| {'method':<44} | {'seconds':>8} | {'Mpx/s':>8} | {'speed-up':>8} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    rows = [
        ("scikit-learn confusion_matrix + formulas", sklearn_s),
        ("ConfusionMatrix.update per tile + compute", ours_s),
    ]
    for name, seconds in rows:
        throughput = pixels / 1e6 / seconds
        print(f"| {name:<44} | {seconds:>8.4f} | {throughput:>8.1f} | {sklearn_s / seconds:>7.1f}x |")
    print()
    ratio = sklearn_s / ours_s
    print(
        f"ours is {ratio:.1f}x faster than scikit-learn (goal >= 15x: {'met' if ratio >= 15 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
