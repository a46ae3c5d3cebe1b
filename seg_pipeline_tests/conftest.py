"""Shared fixtures: tiny seeded GeoTIFF datasets written into tmp dirs (TorchGeo style, no blobs)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from seg_pipeline.contracts import ShardSet
from seg_pipeline.data.synthetic import SyntheticSpec, write_synthetic_dataset
from seg_pipeline.settings import DatasetSettings, ShardSettings, SplitSettings
from seg_pipeline.workflows import ingest
from seg_pipeline.workflows.layout import DataLayout

#: Grid of the synthetic scenes (``SyntheticSpec`` defaults), so hand-written tiles can line up.
TEST_CRS = "EPSG:32633"
TEST_ORIGIN = (500_000.0, 5_000_000.0)
TEST_PIXEL_SIZE = 0.5

MakeDataset = Callable[..., Path]
WriteRaster = Callable[..., Path]


def pytest_configure(config: pytest.Config) -> None:
    """Under ``pytest -n N`` (``make test``), give each of the N workers its share of the cores.

    torch sizes its thread pool to all cores in every worker, and N pools spinning on the same
    cores are slower than one pool each; subprocesses the tests start inherit ``OMP_NUM_THREADS``.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with end-to-end (``slow``) tests run first, in collection order otherwise.

    ``make test`` hands whole modules to its pytest-xdist workers in this order
    (``--no-loadscope-reorder``): starting with the long ones lets the short ones fill the gaps
    at the end, instead of one worker running a job of minutes while the other has finished.
    """
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_modules)


def scratch_dir(request: pytest.FixtureRequest, factory: pytest.TempPathFactory, name: str) -> Path:
    """A temp folder for a module- or package-scoped fixture, removed when that scope ends.

    pytest keeps every ``tmp_path_factory`` folder until the session ends, and the trained
    checkpoints and MLflow stores of these fixtures would add up to several GB on the CI disk. The
    folder stays when a test failed meanwhile, like pytest's own ``tmp_path_retention_policy``.
    """
    path = factory.mktemp(name)
    failures_before = request.session.testsfailed

    def remove() -> None:
        if request.session.testsfailed == failures_before:
            shutil.rmtree(path, ignore_errors=True)

    request.addfinalizer(remove)
    return path


def write_raster(
    path: Path | str,
    array: np.ndarray,
    *,
    crs: str | None = TEST_CRS,
    transform: Affine | None = None,
    nodata: float | None = None,
    driver: str = "GTiff",
    **creation_options: Any,
) -> Path:
    """Write a ``(bands, H, W)`` or ``(H, W)`` array with rasterio directly (independent of the library).

    ``transform`` defaults to the synthetic grid's origin; PNG/JPEG drivers get no CRS or transform.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array[np.newaxis] if array.ndim == 2 else array
    profile: dict[str, Any] = {
        "driver": driver,
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        **creation_options,
    }
    if driver == "GTiff":
        profile.update(
            crs=crs,
            transform=transform
            or Affine(TEST_PIXEL_SIZE, 0.0, TEST_ORIGIN[0], 0.0, -TEST_PIXEL_SIZE, TEST_ORIGIN[1]),
            nodata=nodata,
        )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _make_dataset(
    root: Path | str,
    rows: int = 2,
    cols: int = 3,
    tile_size: int = 32,
    bands: str = "rgb",
    labeled_fraction: float = 1.0,
    seed: int = 0,
    nodata_tile_fraction: float = 0.0,
    **spec_fields: Any,
) -> Path:
    """Write a synthetic dataset (``images/``, ``masks/``, ``classes.txt``) under ``root``."""
    spec = SyntheticSpec(
        grid_rows=rows,
        grid_cols=cols,
        tile_size=tile_size,
        bands=bands,
        labeled_fraction=labeled_fraction,
        nodata_tile_fraction=nodata_tile_fraction,
        **spec_fields,
    )
    return write_synthetic_dataset(root, spec, seed=seed)


@pytest.fixture
def make_dataset() -> MakeDataset:
    """Factory: ``make_dataset(root, rows, cols, tile_size=32, bands="rgb", labeled_fraction=1.0, seed=0)``.

    Defaults give 6 fully labelled 32x32 RGB tiles without nodata, so tests start from clean data.
    """
    return _make_dataset


@pytest.fixture
def write_tif() -> WriteRaster:
    """Factory: ``write_tif(path, array, crs=..., transform=..., nodata=..., driver="GTiff")``."""
    return write_raster


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only 3x4 grid of 32x32 RGB tiles, 75% labelled: copy it before changing anything."""
    return _make_dataset(
        tmp_path_factory.mktemp("demo") / "demo", rows=3, cols=4, labeled_fraction=0.75, seed=7
    )


def ingest_synthetic(
    data_root: Path,
    name: str,
    spec: SyntheticSpec | None = None,
    *,
    seed: int = 0,
    split: SplitSettings | None = None,
    **dataset_fields: Any,
) -> ShardSet:
    """Write a synthetic dataset under ``data_root/raw/name`` and ingest it with the library's own
    catalogue, split and shard steps: the :class:`ShardSet` a training stage receives."""
    spec = spec or SyntheticSpec(grid_rows=3, grid_cols=4, tile_size=32)
    write_synthetic_dataset(data_root / "raw" / name, spec, seed=seed)
    layout = DataLayout.at(data_root)
    catalog = ingest.catalogue(
        DatasetSettings(dataset_id=name, **dataset_fields), layout, log_fn=lambda _: None
    ).catalog
    split = split or SplitSettings(
        policy="supervised", train_fraction=0.6, val_fraction=0.4, test_fraction=0.0
    )
    table = ingest.split(split, catalog, log_fn=lambda _: None)
    return ingest.shard(ShardSettings(), catalog, table, log_fn=lambda _: None).shards


def tiny_stage(**changes: Any) -> dict[str, Any]:
    """Stage settings (as a dict) small enough for a test: Unet-mobilenet_v2 (26 MB checkpoints),
    1 epoch of 2 steps, no EMA."""
    settings: dict[str, Any] = {
        "model": {"architecture": "unet", "encoder": "mobilenet_v2"},
        "loop": {"epochs": 1, "max_steps_per_epoch": 2, "ema_decay": None, "log_every_n_steps": 0,
                 "early_stopping_patience": None},
        "scheduler": {"warmup_epochs": 0.0},
        "loader": {"batch_size": 4},
    }  # fmt: skip
    for key, value in changes.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    return settings


#: Unmodified subsets of the real Kampala and Nairobi datasets (see fixtures/real/README.md).
REAL_TILES = Path(__file__).parent / "fixtures" / "real"


def copy_real(name: str, destination: Path) -> Path:
    """A private copy of a real fixture dataset (``kampala`` or ``nairobi``); the originals stay untouched."""
    target = destination / name
    shutil.copytree(REAL_TILES / name, target)
    for path in target.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return target
