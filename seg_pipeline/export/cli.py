"""The command line: ``python -m seg_pipeline.export --checkpoint best.pt --out exports/v1``.

Argument parsing only; the work is :func:`seg_pipeline.export.api.export_model`. Bad arguments and
refused exports print ``export failed: ...`` to stderr and return 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from seg_pipeline.export.names import FORMATS
from seg_pipeline.settings.export import ExportSettings


def _help(name: str) -> str:
    return ExportSettings.model_fields[name].description or name


def _description() -> str | None:
    """The package docstring's first line: the summary ``--help`` shows."""
    doc = sys.modules[__package__].__doc__
    return doc.splitlines()[0] if doc else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export options (shared by ``python -m seg_pipeline.export`` and ``seg-pipeline export``)."""
    parser.add_argument("--checkpoint", required=True, type=Path, help="stage checkpoint (best.pt)")
    parser.add_argument("--out", required=True, type=Path, help="export folder to create or replace")
    defaults = ExportSettings()
    parser.add_argument(
        "--formats", nargs="+", default=list(defaults.formats), choices=FORMATS, help=_help("formats")
    )
    parser.add_argument("--example-size", type=int, default=defaults.example_size, help=_help("example_size"))
    parser.add_argument("--opset", type=int, default=defaults.opset, help=_help("opset"))
    parser.add_argument(
        "--lineage", type=json.loads, default=None, help='JSON object, e.g. \'{"git_commit": "abc123"}\''
    )


def run(args: argparse.Namespace) -> int:
    """Export as ``args`` say; print the JSON summary (0) or ``export failed: ...`` on stderr (2)."""
    from seg_pipeline.export.api import export_model  # torch: only when exporting
    from seg_pipeline.export.errors import ExportParityError

    try:
        settings = ExportSettings.parse(
            {"formats": args.formats, "example_size": args.example_size, "opset": args.opset}, "export"
        )
        result = export_model(
            args.checkpoint,
            args.out,
            formats=settings.formats,
            example_size=settings.example_size,
            opset=settings.opset,
            lineage=args.lineage,
        )
    except (ValueError, ExportParityError) as error:
        print(f"export failed: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_value(), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m seg_pipeline.export --checkpoint best.pt --out exports/v1``: prints a JSON summary."""
    parser = argparse.ArgumentParser(prog="python -m seg_pipeline.export", description=_description())
    add_arguments(parser)
    return run(parser.parse_args(argv))
