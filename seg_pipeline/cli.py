"""Command line helpers that need no Dagster: ``seg-pipeline summary``, ``demo-data``.

The pipeline itself runs through Dagster (``dagster job execute -m seg_pipeline -j ...``);
these commands cover what a user wants from a terminal around it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


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


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``seg-pipeline`` / ``python -m seg_pipeline.cli``."""
    parser = argparse.ArgumentParser(prog="seg-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_summary = sub.add_parser("summary", help="print where the pipeline's outputs are")
    p_summary.add_argument("--data-root", type=Path, default=Path("data"))
    p_summary.add_argument("--dataset", default="demo")
    args = parser.parse_args(argv)
    if args.command == "summary":
        print(summary(args.data_root, args.dataset))


if __name__ == "__main__":
    main()
