"""The ``seg-pipeline`` command: ingest, train, predict, evaluate, export and summary.

The pipeline itself runs through Dagster (``dagster job execute -m seg_pipeline.definitions -j ...``);
these commands call the same library functions with the same settings schema, for a terminal, a
notebook's shell or torchrun (``seg-pipeline train``), and for models outside a pipeline run.
``ingest`` is the exception: it runs ``ingest_job`` through Dagster, in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seg_pipeline.progress import LOGGER_NAME
from seg_pipeline.settings import PredictSettings, TTASettings, WindowSettings
from seg_pipeline.settings.inference import PostprocessSettings
from seg_pipeline.workflows.layout import DATA_ROOT_ENV, default_data_root

if TYPE_CHECKING:
    from seg_pipeline.workflows.experiment import ExperimentFolder, ExperimentRequest


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


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def predict_settings(args: argparse.Namespace, base: PredictSettings | None = None) -> PredictSettings:
    """The prediction settings of the command line (one schema: validated like a run config).

    Views and windows not given on the command line come from ``base`` (a registered bundle's own,
    so it predicts as it was scored), else from the schema's defaults.
    """
    start = base or PredictSettings()
    return PredictSettings.parse(
        {
            "tta": {
                **start.tta.model_dump(),
                **_given({"scales": args.scales, "flips": args.flips, "merge": args.merge}),
            },
            "windows": {
                **start.windows.model_dump(),
                **_given({"window": args.window, "overlap": args.overlap, "batch_size": args.batch_size}),
            },
            "device": args.device,
            "bf16": args.bf16,
            "channels_last": args.channels_last,
            "fold_batchnorm": args.fold_batchnorm,
            "write_probabilities": args.probabilities,
            "color_png": args.preview,
            "postprocess": {
                "open_radius": args.open_radius,
                "close_radius": args.close_radius,
                "order": args.morphology_order,
                "min_area": args.min_area,
                "connectivity": args.connectivity,
                "classes": args.clean_classes,
            },
        },
        "predict",
    )


def predict_command(args: argparse.Namespace) -> None:
    """Predict a folder of rasters with one or more models (ensemble when several)."""
    from seg_pipeline.hardware import resolve_device
    from seg_pipeline.inference.bundle import predict_bundle
    from seg_pipeline.inference.ensemble import ENSEMBLE
    from seg_pipeline.inference.predict import list_rasters, load_stage_model, predict_files
    from seg_pipeline.tracking import TrackingSettings
    from seg_pipeline.workflows.resolve import RegisteredSegmenter, resolve_model_reference

    resolve_device(args.device)  # a missing GPU is one line before any model is loaded
    tracking = TrackingSettings.from_data_root(args.data_root)
    resolved = [resolve_model_reference(m, tracking) for m in args.model]
    bundles = [r for r in resolved if isinstance(r, RegisteredSegmenter)]
    if bundles and len(resolved) > 1:
        raise ValueError(
            f"{args.model}: a registered segmenter is a whole model (with its own members and views): "
            "give it as the only --model"
        )
    inputs = [(path.stem, path) for path in list_rasters(args.input)]
    if bundles:
        segmenter = bundles[0]
        settings = predict_settings(args, base=segmenter.bundle.predict)
        models = segmenter.members
        run = predict_bundle(segmenter.bundle, inputs, args.output, settings, members=models)
    else:
        settings = predict_settings(args)
        paths = [path for path in resolved if isinstance(path, Path)]
        models = [load_stage_model(path, f"model_{i}") for i, path in enumerate(paths)]
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
    positive = [
        names.index(name) if name in names else int(name) if name.isdigit() else -1
        for name in args.positive_classes or []
    ]
    if any(not 0 <= index < len(names) for index in positive):
        raise ValueError(
            f"--positive-classes {args.positive_classes}: name classes of {names} (or their ids)"
        )
    evaluation = evaluate_folders(
        args.pred_dir,
        args.gt_dir,
        len(names),
        args.ignore_index,
        args.ignore_nonpositive,
        args.allow_missing,
        positive_classes=positive,
        detection_min_pixels=args.detection_min_pixels,
    )
    row = comparison_rows({"predictions": evaluation.metrics}, names)[0]
    row.update({f"pooled/{k}": round(v, 4) for k, v in evaluation.pooled().items()})
    if evaluation.detection is not None:
        row.update({f"detection/{k}": round(v, 4) for k, v in evaluation.detection.to_dict().items()})
    for key, value in row.items():
        print(f"{key:>24}: {value}")
    if evaluation.missing_predictions:
        missing = evaluation.missing_predictions
        print(f"skipped {len(missing)} ground-truth mask(s) without a prediction: {missing[:10]}")
        row["missing_predictions"] = list(missing)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "metrics.json", row)
        write_confusion_csv(args.out / "confusion.csv", evaluation.matrix.matrix, names)
        print(f"wrote {args.out / 'metrics.json'} and {args.out / 'confusion.csv'}")


#: The asset whose run-config section holds each stage's settings (``ops.<asset>.config``).
STAGE_ASSETS = {"pretrain": "pretrained_model", "kd": "kd_student_model"}
#: Keys of a stage's run-config section that only the Dagster step reads.
DAGSTER_ONLY_KEYS = ("nproc_per_node", "register_as")


def stage_request(args: argparse.Namespace) -> ExperimentRequest:
    """The validated request of ``seg-pipeline train``: config files merged, overrides applied, one schema."""
    from seg_pipeline.settings import KDStageSettings, PretrainSettings
    from seg_pipeline.settings.compose import apply_overrides, compose, section
    from seg_pipeline.workflows.experiment import ExperimentRequest

    config = compose(args.config)
    stage = section(config, STAGE_ASSETS[args.stage])
    dagster_only = {key: stage.pop(key) for key in DAGSTER_ONLY_KEYS if key in stage}
    stage = apply_overrides(stage, args.overrides)
    settings_cls = KDStageSettings if args.stage == "kd" else PretrainSettings
    settings = settings_cls.parse(stage, args.stage)
    dataset = args.dataset
    auxiliary = (
        args.aux
        if args.aux is not None
        else [d["dataset_id"] for d in section(config, "auxiliary_sources").get("datasets") or []]
    )
    return ExperimentRequest(
        stage=args.stage,
        settings=settings,
        dataset=dataset,
        auxiliary=tuple(auxiliary),
        teacher=args.teacher,
        resume=None if args.resume is None else str(args.resume),
        nproc_per_node=args.nproc_per_node or int(dagster_only.get("nproc_per_node", 1)),
        command=" ".join(["seg-pipeline", *sys.argv[1:]]),
    )


def experiment_folder(args: argparse.Namespace, name: str) -> ExperimentFolder:
    """Where the run writes: ``--experiment-dir``, the run folder of a ``--resume``d checkpoint, or a new
    ``{timestamp}-{name}`` under ``--output``. Under torchrun every rank gets rank 0's folder.
    """
    from seg_pipeline.training.distributed import broadcast_object, init_distributed, is_initialized
    from seg_pipeline.workflows.experiment import ExperimentFolder

    if args.experiment_dir is not None:
        return ExperimentFolder(args.experiment_dir)
    resumed = args.resume
    if (
        resumed is not None
        and resumed.parent.name == "checkpoints"
        and (resumed.parent.parent / "config.json").is_file()
    ):
        return ExperimentFolder(resumed.parent.parent)  # continue the run in its own folder
    folder = ExperimentFolder.new(args.output, name)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: one folder for all ranks
        if not is_initialized():
            init_distributed()
        folder = ExperimentFolder(Path(broadcast_object(str(folder.root))))
    return folder


def train_command(args: argparse.Namespace) -> None:
    """Train one stage into an experiment folder (seed 004's layout), tracked in MLflow like the assets."""
    from seg_pipeline.tracking import TrackingSettings
    from seg_pipeline.workflows.experiment import file_logger, run_experiment
    from seg_pipeline.workflows.layout import DataLayout

    request = stage_request(args)
    name = args.name or (Path(args.config[-1]).stem if args.config else request.stage)
    folder = experiment_folder(args, f"{name}-{request.stage}" if args.name is None else name)
    main_process = int(os.environ.get("RANK", "0")) == 0
    log = (
        file_logger(folder.logs / "train.log", logging.getLogger(LOGGER_NAME).info)
        if main_process
        else (lambda _line: None)
    )
    tracking = None if args.no_tracking else TrackingSettings.from_data_root(args.data_root)
    model = run_experiment(
        request, folder, DataLayout.at(args.data_root), tracking, log, main_process=main_process
    )
    if main_process:
        score = "n/a" if model.best_score is None else f"{model.best_score:.4f}"
        print(
            f"{request.stage}: best {model.monitor} {score} at epoch {model.best_epoch} -> {model.checkpoint}"
        )
        print(f"experiment folder: {folder.root}")


def ingest_command(args: argparse.Namespace) -> int:
    """Run ``ingest_job`` through Dagster on the ingest sections of any run config (a subprocess:
    the CLI never imports Dagster). The run lands in the Dagster instance like any other.
    """
    command = [sys.executable, "-m", "seg_pipeline.defs.job_config", "--job", "ingest_job", "--execute"]
    command += ["--dataset", args.dataset]
    for path in args.config:
        command += ["-c", str(path)]
    env = {**os.environ, DATA_ROOT_ENV: str(args.data_root)}
    return subprocess.call(command, env=env)


def export_command(args: argparse.Namespace) -> int:
    """Export a checkpoint (or ``models:/name@alias``) to TorchScript and ONNX with a model card."""
    from seg_pipeline.export.cli import run
    from seg_pipeline.tracking import TrackingSettings
    from seg_pipeline.workflows.resolve import resolve_model_checkpoint

    reference = str(args.checkpoint)
    if reference.startswith("models:/"):
        args.checkpoint = resolve_model_checkpoint(reference, TrackingSettings.from_data_root(args.data_root))
    return run(args)


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
        help="stage checkpoint or models:/name@alias; repeat for an ensemble of checkpoints. A "
        "registered segmenter (models:/<dataset>_segmenter@champion) is a whole model: its members, "
        "weights, class offsets and TTA views as the champion gate scored them",
    )
    p_predict.add_argument("--input", type=Path, required=True)
    p_predict.add_argument("--output", type=Path, required=True)
    tta, windows, predict = TTASettings(), WindowSettings(), PredictSettings()
    own = " (default: a registered segmenter's own, else {})"
    p_predict.add_argument("--scales", type=float, nargs="+", help="TTA scales" + own.format(tta.scales))
    p_predict.add_argument("--flips", nargs="+", help="TTA flips" + own.format(tta.flips))
    p_predict.add_argument(
        "--merge", choices=["mean_prob", "mean_logit"], help="view merge" + own.format(tta.merge)
    )
    p_predict.add_argument("--window", type=int, help="window side" + own.format(windows.window))
    p_predict.add_argument("--overlap", type=int, help="window overlap" + own.format(windows.overlap))
    p_predict.add_argument("--batch-size", type=int, help="windows per pass (default: 4 on CUDA, 1 else)")
    p_predict.add_argument("--device", default=predict.device)
    p_predict.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=predict.bf16,
        help="bf16 autocast (default: chosen by the device: AMX CPUs and bf16 GPUs)",
    )
    p_predict.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=predict.channels_last,
        help="channels-last (NHWC) forward passes (default: on for CPU and CUDA, off for MPS)",
    )
    p_predict.add_argument(
        "--fold-batchnorm",
        action=argparse.BooleanOptionalAction,
        default=predict.fold_batchnorm,
        help="fold BatchNorm into the convolutions before the forward passes (default: on)",
    )
    p_predict.add_argument("--probabilities", action="store_true", help="also write probability GeoTIFFs")
    p_predict.add_argument(
        "--preview",
        "--save-rgb",
        action=argparse.BooleanOptionalAction,
        default=predict.color_png,
        help="colour PNG quick look beside each class map (decimated to 1024 px)",
    )

    post = PostprocessSettings()
    p_predict.add_argument(
        "--open-radius",
        type=int,
        default=post.open_radius,
        help="post-process the class maps: per-class opening radius in px, removes specks (0 = off)",
    )
    p_predict.add_argument(
        "--close-radius",
        type=int,
        default=post.close_radius,
        help="post-process the class maps: per-class closing radius in px, fills gaps (0 = off)",
    )
    p_predict.add_argument(
        "--morphology-order",
        choices=["open_close", "close_open"],
        default=post.order,
        help="which runs first when both radii are set",
    )
    p_predict.add_argument(
        "--min-area",
        type=int,
        default=post.min_area,
        help="post-process: regions of fewer px take the class around them (1 = off)",
    )
    p_predict.add_argument(
        "--connectivity", type=int, choices=[4, 8], default=post.connectivity, help="for --min-area"
    )
    p_predict.add_argument(
        "--clean-classes",
        nargs="+",
        default=list(post.classes),
        metavar="CLASS",
        help="class names the post-processing cleans (default: all); probabilities always stay raw",
    )

    p_ingest = sub.add_parser(
        "ingest",
        help="catalogue, split and shard the datasets of a run config (ingest_job; other sections ignored)",
    )
    p_ingest.add_argument(
        "--config", action="append", type=Path, default=[], help="YAML run config; repeat to compose groups"
    )
    p_ingest.add_argument(
        "--dataset", default="demo", help="the target dataset: the run's Dagster partition (data/raw/NAME)"
    )

    p_train = sub.add_parser(
        "train",
        help="train one stage into an experiment folder (config files + key=value overrides)",
        description="Train stage 1 (pretrain) or stage 2 (kd) from the same settings the Dagster assets "
        "take: --config files (a Dagster run config or a stage's settings; later files win), then "
        "key=value overrides of the stage's settings (loop.epochs=3 optimizer.lr=1e-4). The dataset "
        "must be ingested first (seg-pipeline ingest --config run.yaml). Under torchrun every rank "
        "runs this command.",
    )
    p_train.add_argument("--stage", choices=sorted(STAGE_ASSETS), required=True)
    p_train.add_argument(
        "--config", action="append", type=Path, default=[], help="YAML run config; repeat to compose groups"
    )
    p_train.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. loop.epochs=3"
    )
    p_train.add_argument(
        "--dataset", default="demo", help="the ingested target dataset (its Dagster partition)"
    )
    p_train.add_argument(
        "--aux", action="append", help="auxiliary dataset for pretrain; repeat (default: the config's)"
    )
    p_train.add_argument("--teacher", help="kd: the teacher, a stage-1 checkpoint or models:/name@alias")
    p_train.add_argument(
        "--resume", type=Path, help="continue from this checkpoint (last.pt holds the optimizer state)"
    )
    p_train.add_argument(
        "--output", type=Path, default=Path("outputs/experiments"), help="parent of the experiment folders"
    )
    p_train.add_argument("--name", help="experiment name (default: <config file stem>-<stage>)")
    p_train.add_argument("--experiment-dir", type=Path, help="write into exactly this folder")
    p_train.add_argument(
        "--nproc-per-node", type=int, default=0, help="DDP ranks started with torchrun from here (default 1)"
    )
    p_train.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")

    p_export = sub.add_parser(
        "export", help="export a checkpoint or models:/name@alias to TorchScript + ONNX with a model card"
    )
    from seg_pipeline.export.cli import add_arguments as add_export_arguments

    add_export_arguments(p_export)

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
    p_eval.add_argument(
        "--positive-classes",
        nargs="+",
        metavar="CLASS",
        help="pool these classes (names with --classes, else ids) into one foreground: pooled IoU and tile "
        "detection (seed 003's fire IoU)",
    )
    p_eval.add_argument(
        "--detection-min-pixels", type=int, default=1, help="positive pixels that make a tile positive"
    )
    p_eval.add_argument("--out", type=Path, help="write metrics.json and confusion.csv here")
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # key=value overrides may follow options (argparse stops at the first)
        args.overrides += [item for item in extra if "=" in item and not item.startswith("-")]
        extra = [item for item in extra if item not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging()
    try:
        if args.command == "summary":
            print(summary(args.data_root, args.dataset))
        elif args.command == "predict":
            predict_command(args)
        elif args.command == "ingest":
            code = ingest_command(args)
            if code:
                raise SystemExit(code)
        elif args.command == "train":
            train_command(args)
        elif args.command == "export":
            code = export_command(args)
            if code:
                raise SystemExit(code)
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
