"""Command line helpers that need no Dagster: ``seg-pipeline summary``, ``demo-data``.

The pipeline itself runs through Dagster (``dagster job execute -m seg_pipeline.definitions -j ...``);
these commands cover what a user wants from a terminal around it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from seg_pipeline.progress import LOGGER_NAME
from seg_pipeline.settings import PredictSettings, TTASettings, WindowSettings
from seg_pipeline.workflows.layout import DATA_ROOT_ENV, default_data_root


def summary(data_root: Path, dataset: str) -> str:
    """Where the outputs of a dataset are, with their sizes, as printable text."""
    processed = data_root / "processed" / dataset
    lines = [f"seg_pipeline outputs for dataset {dataset!r} under {data_root.resolve()}:"]
    catalog = processed / "headers.parquet"
    if catalog.exists():
        from seg_pipeline.data.headers import read_catalog

        frame = read_catalog(catalog)
        counts = frame["status"].value_counts().to_dict()
        lines.append(f"  header catalog : {catalog} ({len(frame)} tiles, {counts})")
    quarantine = processed / "quarantine.json"
    if quarantine.exists():
        lines.append(f"  quarantine list: {quarantine} ({len(json.loads(quarantine.read_text()))} tiles)")
    splits = processed / "splits.parquet"
    if splits.exists():
        from seg_pipeline.data.splits import read_split_table, split_counts

        lines.append(f"  split table    : {splits} {split_counts(read_split_table(splits))}")
    manifest = processed / "manifest.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        n_shards = sum(len(s) for s in data["splits"].values())
        lines.append(
            f"  shards         : {processed}/<split>/shard-xxxxx ({n_shards} shards, manifest {manifest})"
        )
    for kind in ("models", "predictions", "reports"):
        folder = data_root / kind
        entries = sorted(p for p in folder.glob("*") if not p.name.startswith("."))
        if entries:
            lines.append(f"  {kind:<15}: " + ", ".join(str(p) for p in entries))
    if len(lines) == 1:
        lines.append("  nothing yet: run `make run`")
    return "\n".join(lines)


def predict_settings(args: argparse.Namespace) -> PredictSettings:
    """The prediction settings of the command line (one schema: validated like a run config)."""
    return PredictSettings.parse(
        {
            "tta": {"scales": args.scales, "flips": args.flips, "merge": args.merge},
            "windows": {"window": args.window, "overlap": args.overlap, "batch_size": args.batch_size},
            "device": args.device,
            "bf16": args.bf16,
            "write_probabilities": args.probabilities,
            "color_png": args.preview,
        },
        "predict",
    )


def predict_command(args: argparse.Namespace) -> None:
    """Predict a folder of rasters with one or more models (ensemble when several)."""
    from seg_pipeline.hardware import resolve_device
    from seg_pipeline.inference.ensemble import ENSEMBLE
    from seg_pipeline.inference.predict import list_rasters, load_stage_model, predict_files
    from seg_pipeline.tracking import TrackingSettings
    from seg_pipeline.workflows.resolve import resolve_model_checkpoint

    settings = predict_settings(args)
    resolve_device(settings.device)  # a missing GPU is one line before any model is loaded
    tracking = TrackingSettings.from_data_root(args.data_root)
    models = [
        load_stage_model(resolve_model_checkpoint(m, tracking), f"model_{i}")
        for i, m in enumerate(args.model)
    ]
    inputs = [(path.stem, path) for path in list_rasters(args.input)]
    run = predict_files(models, inputs, {ENSEMBLE: args.output}, settings)
    print(
        f"predicted {len(inputs)} rasters with {len(models)} model(s) x "
        f"{run.views_per_input // len(models)} views in {run.seconds:.1f}s -> {args.output}"
    )


def evaluate_command(args: argparse.Namespace) -> None:
    """Evaluate a prediction folder against a ground-truth folder (pairs by file stem)."""
    from seg_pipeline.data.spec import read_class_names
    from seg_pipeline.evaluation.report import (
        comparison_rows,
        evaluate_folders,
        write_confusion_csv,
        write_json,
    )

    names = (
        list(read_class_names(args.classes))
        if args.classes
        else [f"class_{i}" for i in range(args.num_classes)]
    )
    evaluation = evaluate_folders(
        args.pred_dir, args.gt_dir, len(names), args.ignore_index, args.ignore_nonpositive, args.allow_missing
    )
    row = comparison_rows({"predictions": evaluation.metrics}, names)[0]
    for key, value in row.items():
        print(f"{key:>24}: {value}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "metrics.json", row)
        write_confusion_csv(args.out / "confusion.csv", evaluation.matrix.matrix, names)
        print(f"wrote {args.out / 'metrics.json'} and {args.out / 'confusion.csv'}")


def configure_logging() -> None:
    """Show the library's progress lines (``seg_pipeline`` logger, INFO) on stderr, bare.

    Only when nothing configured logging yet; other libraries stay at WARNING so their INFO
    chatter does not bury the progress lines.
    """
    if logging.getLogger().handlers:
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    package_logger = logging.getLogger(LOGGER_NAME)
    if package_logger.level == logging.NOTSET:
        package_logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``seg-pipeline`` / ``python -m seg_pipeline.cli``."""
    parser = argparse.ArgumentParser(prog="seg-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root",
        type=Path,
        default=default_data_root(),
        help=f"data root (default: ${DATA_ROOT_ENV} or ./data); models:/ URIs resolve in its MLflow store",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p_summary = sub.add_parser("summary", help="print where the pipeline's outputs are")
    p_summary.add_argument("--dataset", default="demo")

    p_predict = sub.add_parser("predict", help="predict a folder of rasters (GeoTIFF class maps + PNGs)")
    p_predict.add_argument(
        "--model",
        action="append",
        required=True,
        help="stage checkpoint or models:/name@alias; repeat for an ensemble",
    )
    p_predict.add_argument("--input", type=Path, required=True)
    p_predict.add_argument("--output", type=Path, required=True)
    tta, windows, predict = TTASettings(), WindowSettings(), PredictSettings()
    p_predict.add_argument("--scales", type=float, nargs="+", default=tta.scales)
    p_predict.add_argument("--flips", nargs="+", default=tta.flips)
    p_predict.add_argument("--merge", choices=["mean_prob", "mean_logit"], default=tta.merge)
    p_predict.add_argument("--window", type=int, default=windows.window)
    p_predict.add_argument("--overlap", type=int, default=windows.overlap)
    p_predict.add_argument(
        "--batch-size",
        type=int,
        default=windows.batch_size,
        help="windows per pass (default: 4 on CUDA, 1 else)",
    )
    p_predict.add_argument("--device", default=predict.device)
    p_predict.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=predict.bf16,
        help="bf16 autocast (default: chosen by the device: AMX CPUs and bf16 GPUs)",
    )
    p_predict.add_argument("--probabilities", action="store_true", help="also write probability GeoTIFFs")
    p_predict.add_argument(
        "--preview",
        action=argparse.BooleanOptionalAction,
        default=predict.color_png,
        help="colour PNG quick look beside each class map (decimated to 1024 px)",
    )

    p_eval = sub.add_parser("evaluate", help="evaluate a prediction folder against a ground-truth folder")
    p_eval.add_argument("--pred-dir", type=Path, required=True)
    p_eval.add_argument("--gt-dir", type=Path, required=True)
    p_eval.add_argument("--num-classes", type=int, default=0)
    p_eval.add_argument("--classes", type=Path, help="classes.txt (overrides --num-classes)")
    p_eval.add_argument("--ignore-index", type=int, default=255)
    p_eval.add_argument(
        "--ignore-nonpositive", action="store_true", help="seed-000 rule: labels <= 0 not scored"
    )
    p_eval.add_argument("--allow-missing", action="store_true")
    p_eval.add_argument("--out", type=Path, help="write metrics.json and confusion.csv here")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        if args.command == "summary":
            print(summary(args.data_root, args.dataset))
        elif args.command == "predict":
            predict_command(args)
        elif args.command == "evaluate":
            if not args.classes and args.num_classes < 1:
                parser.error("evaluate needs --classes classes.txt or --num-classes K")
            evaluate_command(args)
    except (ValueError, OSError, RuntimeError) as exc:
        # Bad input or settings: one line a user can act on; --debug shows where it came from.
        if args.debug:
            raise
        print(f"seg-pipeline {args.command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
