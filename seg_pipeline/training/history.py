"""The per-epoch history as a CSV file (seed 004's ``metrics/`` folder): one row per epoch, one column
per logged key, readable by pandas, a spreadsheet or ``column -s, -t``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from seg_pipeline.io import atomic_write

#: Columns that lead every row; the other keys follow in sorted order.
LEADING = ("epoch", "train/loss", "val/loss", "val/miou", "lr", "epoch_time_s")


def write_history_csv(history: Sequence[Mapping[str, float]], path: Path | str) -> Path:
    """Write ``history`` to ``path`` atomically (rewritten each epoch: a key first logged later
    gets its column; earlier epochs leave it empty).
    """
    keys = sorted({key for row in history for key in row})
    columns = [key for key in LEADING if key in keys] + [key for key in keys if key not in LEADING]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({key: int(value) if key == "epoch" else value for key, value in row.items()})
    target = Path(path)
    with atomic_write(target) as tmp:
        Path(tmp).write_text(buffer.getvalue())
    return target
