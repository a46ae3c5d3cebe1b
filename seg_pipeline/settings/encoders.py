"""The encoder names segmentation-models-pytorch knows, without importing it on every validation.

Validating ``model.encoder`` needs smp's encoder table, and importing smp costs torch + timm +
torchvision (about 5 s on 2 CPU cores). Settings are validated wherever a run config is read: when
Dagster loads the code location (the job presets), and in every step subprocess of a run. The table
is therefore kept in a small JSON file per installed smp version, written the first time it is needed.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
from pathlib import Path

from seg_pipeline.io import atomic_write

CACHE_ENV = "SEG_PIPELINE_CACHE_DIR"


def cache_dir() -> Path:
    """``$SEG_PIPELINE_CACHE_DIR``, else ``$XDG_CACHE_HOME/seg_pipeline``, else ``~/.cache/seg_pipeline``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seg_pipeline"


def smp_encoder_names() -> frozenset[str]:
    """Smp's built-in encoder names (not the ``tu-`` timm ones), from the cache file of this smp version."""
    version = importlib.metadata.version("segmentation-models-pytorch")
    path = cache_dir() / f"smp-{version}-encoders.json"
    with contextlib.suppress(OSError, ValueError, TypeError):
        return frozenset(json.loads(path.read_text()))
    import segmentation_models_pytorch as smp  # heavy: torch, timm, torchvision

    names = sorted(smp.encoders.get_encoder_names())
    with contextlib.suppress(OSError), atomic_write(path) as tmp:  # read-only home: import next time
        tmp.write_text(json.dumps(names))
    return frozenset(names)
