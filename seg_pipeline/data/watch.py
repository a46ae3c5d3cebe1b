"""Cheap snapshots of a raw folder (names, sizes, mtimes) so a sensor can tell what changed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from seg_pipeline.data.raster_io import RASTER_EXTENSIONS
from seg_pipeline.data.spec import MASK_DIR_NAMES


@dataclass(frozen=True)
class RawSnapshot:
    """What a raw folder holds right now, without opening a single raster."""

    fingerprint: str
    n_files: int
    n_masks: int


def snapshot(folder: Path | str) -> RawSnapshot:
    """Fingerprint of every raster's relative path, size and mtime under ``folder``."""
    root = Path(folder)
    digest = hashlib.sha256()
    n_files = n_masks = 0
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() not in RASTER_EXTENSIONS or not path.is_file():
                continue
            stat = path.stat()
            relative = path.relative_to(root)
            digest.update(f"{relative}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
            n_files += 1
            n_masks += any(part.lower() in MASK_DIR_NAMES for part in relative.parts[:-1])
    return RawSnapshot(digest.hexdigest(), n_files, n_masks)
