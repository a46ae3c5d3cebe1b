"""Does the three-stage recipe pay off? ``full_pipeline_job`` beside a bare SMP loop on real data.

Runs ``dagster job execute -m seg_pipeline.definitions -j full_pipeline_job -c configs/kampala.yaml
--tags '{"dagster/partition": "kampala"}'``
(Kampala target, Nairobi auxiliary source; fresh DAGSTER_HOME and data root) and times it, then
trains a plain segmentation-models-pytorch loop, written out below, on the *same* train split the
pipeline used (Unet-resnet18, CE + Dice, AdamW, cosine, h/v flips, fp32, the pipeline's patch size
and batch size) and scores it on the same evaluation split with the same confusion matrix:

- at equal epochs (pretrain epochs + KD epochs of the config), with and without flip TTA;
- at equal wall time (the loop keeps training until it has used the pipeline's whole wall time).

    .venv/bin/python bench/bench_quality.py                       # about 30 minutes on 2 CPU cores
    .venv/bin/python bench/bench_quality.py --reuse /tmp/run      # score a finished pipeline run again
    .venv/bin/python bench/bench_quality.py --seed 1              # another seed for both sides
    .venv/bin/python bench/bench_quality.py --reuse /tmp/run --bare-bf16   # bare loop in bf16 + NHWC

``--seed`` sets ``loop.seed`` of both training stages and of ``extra_members`` (written to a copy of
the config in the work folder) and the bare loop's ``torch.manual_seed``; the split stays the
config's, so seeds differ only in initialisation, patch positions, augmentation and batch order.

The pipeline's figures come from its own evaluation report (``evaluation_report`` asset).
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

import numpy as np
import pandas as pd
import rasterio
import segmentation_models_pytorch as smp
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DAGSTER = Path(sys.executable).with_name("dagster")


def cpu_line() -> str:
    """CPU model, cores and the flags that decide precision choices."""
    text = Path("/proc/cpuinfo").read_text()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?"
    )
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return f"{model}, {os.cpu_count()} cores, flags {' '.join(wanted) or 'none'}, torch {torch.__version__}"


def run_pipeline(work: Path, config: Path) -> float:
    """The pipeline as a user runs it; returns its wall time in seconds."""
    (work / "home").mkdir(parents=True)
    (work / "home" / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    env = {**os.environ, "DAGSTER_HOME": str(work / "home"), "SEG_PIPELINE_DATA_ROOT": str(work / "data")}
    started = time.perf_counter()
    done = subprocess.run(
        [str(DAGSTER), "job", "execute", "-m", "seg_pipeline.definitions", "-j", "full_pipeline_job", "-c",
         str(config), "--tags", json.dumps({"dagster/partition": "kampala"})],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    log = done.stdout + done.stderr
    (work / "pipeline.log").write_text(log)
    (work / "wall.json").write_text(json.dumps({"seconds": seconds, "returncode": done.returncode}))
    if done.returncode != 0:
        # A blocking check (ensemble not worse than the best single, mIoU floor) fails the run after
        # the report is written: the scores are still the pipeline's, so the table is still printed.
        failed = sorted({ln.split(" - ")[6] for ln in log.splitlines() if "STEP_FAILURE" in ln})
        if not any(p.name.startswith("evaluation_report") for p in (work / "home" / "storage").rglob("*")):
            raise SystemExit(f"the pipeline failed before its report; see {work / 'pipeline.log'}")
        print(f"note: the pipeline run failed at {failed}; its report exists and is scored below")
    return seconds


def stored(work: Path, asset: str) -> dict:
    """An asset value as the JSON IO manager stored it."""
    # <storage>/<asset>/<dataset>.json (datasets are partitions); <storage>/<asset>.json before that
    (path,) = [p for p in (work / "home" / "storage").rglob("*.json") if asset in (p.stem, p.parent.name)]
    return json.loads(path.read_text())["value"]


def read_tiles(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, H, W) uint8 and masks (N, H, W) of the catalog rows (Kampala chips are 256 px)."""
    images, masks = [], []
    for row in rows.itertuples():
        with rasterio.open(row.image_path) as src:
            images.append(src.read())
        with rasterio.open(row.mask_path) as src:
            masks.append(src.read(1))
    return np.stack(images), np.stack(masks).astype(np.int64)


def bare_model() -> torch.nn.Module:
    return smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=2)


def predict(model: torch.nn.Module, images: torch.Tensor, flips: bool) -> np.ndarray:
    """Class maps of normalised images, optionally averaged over none/h/v flips."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 8):
            x = images[start : start + 8]
            probs = model(x).softmax(1)
            if flips:
                probs = probs + model(x.flip(-1)).softmax(1).flip(-1) + model(x.flip(-2)).softmax(1).flip(-2)
            out.append(probs.argmax(1).numpy())
    model.train()
    return np.concatenate(out)


def scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    from seg_pipeline.metrics import ConfusionMatrix

    matrix = ConfusionMatrix(2, ignore_index=255)
    matrix.update(predicted, truth)
    metrics = matrix.compute().to_dict(["background", "building"])
    return {
        "miou": metrics["miou"],
        "background": metrics["iou/background"],
        "building": metrics["iou/building"],
    }


def _row(name: str, epoch: int, seconds: float, model: torch.nn.Module, x: torch.Tensor, truth: np.ndarray,
         flips: bool) -> dict:  # fmt: skip
    label = name + (", flip TTA" if flips else "")
    return {"run": label, "epochs": epoch, "seconds": seconds, **scores(predict(model, x, flips), truth)}


def points(a: dict, b: dict) -> str:
    """``a`` minus ``b`` in mIoU points."""
    return f"{100 * (a['miou'] - b['miou']):+.2f} mIoU points"


def bare_loop(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    epochs: int,
    budget_s: float,
    batch: int,
    seed: int = 0,
    bf16: bool = False,
) -> list[dict]:
    """A plain SMP loop; evaluated after ``epochs`` and again when ``budget_s`` is spent.

    ``bf16``: what a user who knows the CPU has AMX would write: bf16 autocast for the forward pass
    and loss, model and batches channels-last (scoring stays fp32).
    """
    torch.manual_seed(seed)
    label = "bare loop bf16" if bf16 else "bare loop"
    layout = torch.channels_last if bf16 else torch.contiguous_format
    x = torch.from_numpy(train[0]).float()
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x, y = (x - mean) / std, torch.from_numpy(train[1])
    x_test = (torch.from_numpy(test[0]).float() - mean) / std
    model = bare_model().to(memory_format=layout)
    steps_per_epoch = -(-len(x) // batch)
    total_epochs = max(epochs, 200)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    dice, ce = smp.losses.DiceLoss("multiclass"), torch.nn.CrossEntropyLoss()
    results, started, epoch = [], time.perf_counter(), 0
    schedule_epochs = epochs  # first the equal-epoch run's cosine, then a new cosine over the budget
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, schedule_epochs * steps_per_epoch)
    while epoch < total_epochs:
        order = torch.randperm(len(x))
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            xb, yb = x[idx], y[idx]
            if torch.rand(()) < 0.5:
                xb, yb = xb.flip(-1), yb.flip(-1)
            if torch.rand(()) < 0.5:
                xb, yb = xb.flip(-2), yb.flip(-2)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(xb.contiguous(memory_format=layout)).float()
                loss = 0.5 * ce(logits, yb) + 0.5 * dice(logits, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        epoch += 1
        elapsed = time.perf_counter() - started
        if epoch == epochs:
            for flips in (False, True):
                results.append(
                    _row(f"{label}, {epochs} epochs", epoch, elapsed, model, x_test, test[1], flips)
                )
            # Equal wall time: restart the schedule over the epochs the remaining budget allows.
            per_epoch = elapsed / epoch
            remaining = max(int((budget_s - elapsed) / per_epoch), 0)
            if remaining == 0:
                break
            total_epochs = epoch + remaining
            for group in optimizer.param_groups:
                group["lr"] = 1e-3
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, remaining * steps_per_epoch)
    elapsed = time.perf_counter() - started
    name = f"{label}, equal wall time ({epoch} epochs)"
    for flips in (False, True):
        results.append(_row(name, epoch, elapsed, model, x_test, test[1], flips))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "kampala.yaml")
    parser.add_argument("--reuse", type=Path, help="a work folder of an earlier run: skip the pipeline")
    parser.add_argument("--seed", type=int, default=None, help="loop.seed of both stages and the bare loop's")
    parser.add_argument("--bare-bf16", action="store_true", help="the bare loop in bf16 + channels-last")
    parser.add_argument(
        "--keep-models",
        action="store_true",
        help="keep the pipeline's checkpoints and MLflow store (about 1.5 GB); --reuse needs neither",
    )
    parser.add_argument(
        "--pipeline-only",
        action="store_true",
        help="score the pipeline and stop (no bare loop): for trying a lever on several seeds, whose "
        "equal-epoch bare rows do not change; keeps the models for a later --reuse",
    )
    args = parser.parse_args()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} | {platform.platform()} | {cpu_line()}")
    work = args.reuse or Path(tempfile.mkdtemp(prefix="bench_quality_"))
    config_path = args.config
    if args.seed is not None and not args.reuse:
        seeded = yaml.safe_load(args.config.read_text())
        for stage in ("pretrained_model", "kd_student_model", "extra_members"):
            if stage in seeded["ops"]:  # extra members then take --seed + their position + 1
                seeded["ops"][stage]["config"].setdefault("loop", {})["seed"] = args.seed
        config_path = work / "config.yaml"
        config_path.write_text(yaml.safe_dump(seeded, sort_keys=False))
    wall = (
        json.loads((work / "wall.json").read_text())["seconds"]
        if args.reuse
        else run_pipeline(work, config_path)
    )
    config = yaml.safe_load(config_path.read_text())["ops"]
    epochs = (
        config["pretrained_model"]["config"]["loop"]["epochs"]
        + config["kd_student_model"]["config"]["loop"]["epochs"]
    )
    batch = config["pretrained_model"]["config"]["loader"]["batch_size"]

    report, predictions = stored(work, "evaluation_report"), stored(work, "ensemble_predictions")
    catalog = pd.read_parquet(next((work / "data" / "processed").glob("*/headers.parquet")))
    splits = pd.read_parquet(next((work / "data" / "processed").glob("*/splits.parquet")))
    rows = catalog.merge(splits[["item_id", "split"]], on="item_id")
    train = read_tiles(rows[rows["split"] == "train"])
    test = read_tiles(rows[rows["split"] == predictions["split"]])
    if not args.keep_models and not args.pipeline_only:
        # What --reuse reads (asset values, catalogs, wall time) stays; the checkpoints go.
        for heavy in ("models", "mlflow"):
            shutil.rmtree(work / "data" / heavy, ignore_errors=True)
    print(f"work folder {work}; pipeline wall time {wall:.0f} s; train {len(train[0])} tiles, "
          f"{predictions['split']} {len(test[0])} tiles; bare loop: {epochs} epochs, "
          f"batch {batch}, seed {args.seed or 0}")  # fmt: skip

    table = [
        {"run": f"pipeline: {s['name']}", "epochs": "", "seconds": wall if s["name"] == "ensemble" else "",
         "miou": s["miou"], "background": s["iou"]["background"], "building": s["iou"]["building"]}
        for s in report["scores"]
    ]  # fmt: skip
    if args.pipeline_only:
        for r in table:
            print(f"{r['run']}: mIoU {r['miou']:.4f} (background {r['background']:.4f}, "
                  f"building {r['building']:.4f})")  # fmt: skip
        print(f"pipeline wall time {wall:.0f} s (bare loop not run: --pipeline-only)")
        return
    table += bare_loop(train, test, epochs, wall, batch, seed=args.seed or 0, bf16=args.bare_bf16)
    label = "bare loop bf16" if args.bare_bf16 else "bare loop"
    print("\n| run | epochs | wall s | mIoU | IoU background | IoU building |\n|---|---|---|---|---|---|")
    for r in table:
        seconds = f"{r['seconds']:.0f}" if r["seconds"] != "" else ""
        print(
            f"| {r['run']} | {r['epochs']} | {seconds} | {r['miou']:.4f} | {r['background']:.4f} "
            f"| {r['building']:.4f} |"
        )
    ensemble = next(r for r in table if r["run"] == "pipeline: ensemble")
    equal_epochs = next(r for r in table if r["run"] == f"{label}, {epochs} epochs")
    equal_wall = next(
        r for r in table if r["run"].startswith(f"{label}, equal wall time") and "flip" not in r["run"]
    )
    singles = [r for r in table if r["run"].startswith("pipeline:") and r is not ensemble]
    print(f"\nensemble - bare loop at equal epochs: {points(ensemble, equal_epochs)}")
    print(f"ensemble - bare loop at equal wall time: {points(ensemble, equal_wall)}")
    if singles:
        best = max(singles, key=lambda r: r["miou"])
        print(f"ensemble - best single ({best['run']}): {points(ensemble, best)}")


if __name__ == "__main__":
    main()
