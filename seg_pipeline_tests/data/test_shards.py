"""Tests for shards (F5 in docs/architecture.md).

Layout, index rows, size bounds, reuse, data version, atomicity.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from seg_pipeline.data.headers import HeaderResult, build_headers
from seg_pipeline.data.shards import (
    MANIFEST_NAME,
    ShardError,
    ShardSettings,
    read_manifest,
    read_shard_index,
    shard_dirs,
    write_shards,
)
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.data.splits import assign_splits
from seg_pipeline.io import is_temp
from seg_pipeline.settings import SplitSettings

MakeDataset = Callable[..., Path]
WriteRaster = Callable[..., Path]
REPO_ROOT = Path(__file__).resolve().parents[2]
#: A v0 seed under which the 12-tile demo dataset fills all three v0 splits.
DEMO_SPLIT_SEED = 1


def _read(path: Path | str) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and inode (a rewrite gets a new inode)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_ino)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_split(headers: HeaderResult, split: str = "train") -> pd.DataFrame:
    """A split table that puts every valid tile into ``split`` (write_shards needs item_id and split)."""
    return pd.DataFrame({"item_id": sorted(headers.ok["item_id"]), "split": split})


@pytest.fixture(scope="module")
def demo(demo_dataset: Path) -> tuple[HeaderResult, pd.DataFrame]:
    result = build_headers(DatasetSpec(dataset_id="demo", root=demo_dataset))
    return result, assign_splits(result.catalog, SplitSettings(policy="v0", seed=DEMO_SPLIT_SEED))


def test_layout_and_manifest(demo: tuple[HeaderResult, pd.DataFrame], tmp_path: Path) -> None:
    headers, splits = demo
    manifest = write_shards(headers.catalog, splits, tmp_path / "demo")

    expected_splits = set(splits["split"])
    assert expected_splits == {"metrics_train", "val", "train"}  # 9 labeled + 3 unlabeled tiles
    assert {p.name for p in (tmp_path / "demo").iterdir()} == expected_splits | {MANIFEST_NAME}
    for split in expected_splits:
        shard = tmp_path / "demo" / split / "shard-00000"
        assert {p.name for p in shard.iterdir()} == {"inputs", "targets", "index.jsonl"}
        assert shard_dirs(tmp_path / "demo", split) == [shard]
    assert read_manifest(tmp_path / "demo") == {k: v for k, v in manifest.items() if k != "stats"}
    assert manifest["tile_format"] == "tif"
    assert sum(s["items"] for shards in manifest["splits"].values() for s in shards) == 12
    assert len(manifest["data_version"]) == 64


def test_index_rows_point_inside_the_shard(demo: tuple[HeaderResult, pd.DataFrame], tmp_path: Path) -> None:
    headers, splits = demo
    write_shards(headers.catalog, splits, tmp_path / "demo")
    catalog = headers.catalog.set_index("item_id")
    for split, expected_ids in splits.groupby("split")["item_id"]:
        shard = tmp_path / "demo" / split / "shard-00000"
        raw_rows = [json.loads(line) for line in (shard / "index.jsonl").read_text().splitlines()]
        assert [r["item_id"] for r in raw_rows] == sorted(expected_ids)
        for raw in raw_rows:
            assert {"item_id", "input", "target", "split"} <= set(raw)
            assert raw["split"] == split
            source = catalog.loc[raw["item_id"]]
            assert not Path(raw["input"]).is_absolute()
            input_path = (shard / raw["input"]).resolve()
            assert input_path.is_relative_to(shard.resolve())
            assert input_path.read_bytes() == Path(source["image_path"]).read_bytes()  # GeoTIFFs copied as-is
            if source["has_label"]:
                target_path = (shard / raw["target"]).resolve()
                assert target_path.is_relative_to(shard.resolve())
                assert target_path.read_bytes() == Path(source["mask_path"]).read_bytes()
            else:
                assert raw["target"] is None
        parsed = read_shard_index(shard)
        assert [r.input_path for r in parsed] == [(shard / r["input"]).resolve() for r in raw_rows]
        assert all(r.split == split for r in parsed)


def test_unlabeled_tiles_have_a_null_target(demo: tuple[HeaderResult, pd.DataFrame], tmp_path: Path) -> None:
    headers, splits = demo
    write_shards(headers.catalog, splits, tmp_path / "demo")
    rows = read_shard_index(
        tmp_path / "demo" / "train" / "shard-00000"
    )  # v0: unlabeled tiles and some labeled
    unlabeled = set(headers.catalog.loc[~headers.catalog["has_label"], "item_id"])
    assert unlabeled and unlabeled <= {r.item_id for r in rows}
    for row in rows:
        if row.item_id in unlabeled:
            assert row.target_path is None and row.extra["has_label"] is False
        else:
            assert row.target_path is not None and row.target_path.exists()
    targets = {p.stem for p in (tmp_path / "demo" / "train" / "shard-00000" / "targets").iterdir()}
    assert targets == {r.item_id for r in rows} - unlabeled


def test_max_items_per_shard_bounds_shard_sizes(
    demo: tuple[HeaderResult, pd.DataFrame], tmp_path: Path
) -> None:
    headers, _ = demo
    manifest = write_shards(
        headers.catalog, _one_split(headers), tmp_path / "d", ShardSettings(max_items_per_shard=5)
    )
    assert [s["items"] for s in manifest["splits"]["train"]] == [5, 5, 2]
    dirs = shard_dirs(tmp_path / "d", "train")
    assert [d.name for d in dirs] == ["shard-00000", "shard-00001", "shard-00002"]
    ids = [r.item_id for d in dirs for r in read_shard_index(d)]
    assert ids == sorted(headers.catalog["item_id"])  # every tile exactly once, in order


def test_max_shard_bytes_bounds_shard_sizes(demo: tuple[HeaderResult, pd.DataFrame], tmp_path: Path) -> None:
    headers, _ = demo
    smallest_tile = int(headers.catalog["image_size"].min())
    config = ShardSettings(max_shard_bytes=smallest_tile)  # each tile exceeds it with its mask: one per shard
    manifest = write_shards(headers.catalog, _one_split(headers), tmp_path / "d", config)
    assert [s["items"] for s in manifest["splits"]["train"]] == [1] * 12


def test_same_input_gives_a_byte_identical_manifest(
    demo: tuple[HeaderResult, pd.DataFrame], tmp_path: Path
) -> None:
    headers, splits = demo
    again = assign_splits(headers.catalog, SplitSettings(policy="v0", seed=DEMO_SPLIT_SEED))
    write_shards(headers.catalog, splits, tmp_path / "first" / "demo")
    write_shards(headers.catalog, again, tmp_path / "second" / "demo")
    first = (tmp_path / "first" / "demo" / MANIFEST_NAME).read_bytes()
    assert first == (tmp_path / "second" / "demo" / MANIFEST_NAME).read_bytes()
    other_seed = assign_splits(headers.catalog, SplitSettings(policy="v0", seed=DEMO_SPLIT_SEED + 1))
    write_shards(headers.catalog, other_seed, tmp_path / "third" / "demo")
    assert (tmp_path / "third" / "demo" / MANIFEST_NAME).read_bytes() != first


def test_rerun_rewrites_nothing_and_keeps_the_data_version(
    demo: tuple[HeaderResult, pd.DataFrame], tmp_path: Path
) -> None:
    headers, splits = demo
    config = ShardSettings(max_items_per_shard=3)
    first = write_shards(headers.catalog, splits, tmp_path / "d", config)
    n_shards = sum(len(s) for s in first["splits"].values())
    assert first["stats"] == {"shards_written": n_shards, "shards_reused": 0}
    before = _snapshot(tmp_path / "d")

    second = write_shards(headers.catalog, splits, tmp_path / "d", config)

    assert second["stats"] == {"shards_written": 0, "shards_reused": n_shards}
    assert second["data_version"] == first["data_version"]
    after = _snapshot(tmp_path / "d")
    after.pop(MANIFEST_NAME), before.pop(MANIFEST_NAME)
    assert after == before  # same bytes and same inodes: no shard file was rewritten


def _pipeline(root: Path, out: Path, previous: Path | None = None, **shard_fields: object) -> dict:
    headers = build_headers(DatasetSpec(dataset_id="d", root=root), previous_catalog=previous)
    return write_shards(headers.catalog, _one_split(headers), out, ShardSettings(**shard_fields))  # type: ignore[arg-type]


def test_changing_one_tile_rewrites_only_its_shard(
    tmp_path: Path, make_dataset: MakeDataset, write_tif: WriteRaster
) -> None:
    root = make_dataset(tmp_path / "src", rows=2, cols=3)
    out = tmp_path / "out"
    first = _pipeline(root, out, max_items_per_shard=2)
    before = _snapshot(out)
    changed = root / "images" / "tile_001_000.tif"  # 4th of 6 sorted ids -> shard-00001
    with rasterio.open(changed) as src:
        transform, nodata = src.transform, src.nodata
    new_pixels = np.full((3, 32, 32), 77, np.uint8)
    write_tif(changed, new_pixels, transform=transform, nodata=nodata)

    second = _pipeline(root, out, max_items_per_shard=2)

    assert second["data_version"] != first["data_version"]
    assert second["stats"] == {"shards_written": 1, "shards_reused": 2}
    after = _snapshot(out)
    for name in after:
        if name.startswith("train/shard-00001/") or name == MANIFEST_NAME:
            continue
        assert after[name] == before[name], name
    assert after["train/shard-00001/index.jsonl"] != before["train/shard-00001/index.jsonl"]
    np.testing.assert_array_equal(
        _read(out / "train" / "shard-00001" / "inputs" / "tile_001_000.tif"), new_pixels
    )


def test_stale_shards_and_splits_are_removed(demo: tuple[HeaderResult, pd.DataFrame], tmp_path: Path) -> None:
    headers, splits = demo
    out = tmp_path / "d"
    write_shards(headers.catalog, splits, out, ShardSettings(max_items_per_shard=2))
    assert len(list((out / "train").glob("shard-*"))) >= 2  # several shards per split to remove
    assert (out / "metrics_train").is_dir()
    supervised = assign_splits(headers.catalog, SplitSettings(policy="supervised"))

    manifest = write_shards(headers.catalog, supervised, out, ShardSettings(max_items_per_shard=100))

    assert not (out / "metrics_train").exists()  # a split the new policy does not have
    on_disk = sorted(str(p.relative_to(out)) for p in out.glob("*/shard-*"))
    in_manifest = sorted(s["path"] for shards in manifest["splits"].values() for s in shards)
    assert on_disk == in_manifest
    assert all(path.endswith("shard-00000") for path in on_disk)


def test_npy_tiles_hold_the_same_arrays_as_the_geotiffs(
    demo: tuple[HeaderResult, pd.DataFrame], tmp_path: Path
) -> None:
    headers, splits = demo
    manifest = write_shards(headers.catalog, splits, tmp_path / "npy", ShardSettings(tile_format="npy"))
    assert manifest["tile_format"] == "npy"
    catalog = headers.catalog.set_index("item_id")
    n_checked = 0
    for split in manifest["splits"]:
        for row in read_shard_index(shard_dirs(tmp_path / "npy", split)[0]):
            assert row.input_path.suffix == ".npy"
            source = catalog.loc[row.item_id]
            np.testing.assert_array_equal(np.load(row.input_path), _read(source["image_path"]))
            if row.target_path is not None:
                np.testing.assert_array_equal(np.load(row.target_path), _read(source["mask_path"]))
            n_checked += 1
    assert n_checked == 12


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_png_tiles_are_stored_as_geotiffs(tmp_path: Path, write_tif: WriteRaster) -> None:
    image = np.random.default_rng(0).integers(0, 255, (3, 16, 16), dtype=np.uint8)
    mask = np.random.default_rng(1).integers(0, 3, (16, 16), dtype=np.uint8)
    write_tif(tmp_path / "src" / "images_png" / "p1.png", image, driver="PNG")
    write_tif(tmp_path / "src" / "masks_png" / "p1.png", mask, driver="PNG")
    _pipeline(tmp_path / "src", tmp_path / "out")
    (row,) = read_shard_index(tmp_path / "out" / "train" / "shard-00000")
    assert row.input_path.name == "p1.tif" and row.target_path is not None
    with rasterio.open(row.input_path) as src:
        assert src.driver == "GTiff"
        np.testing.assert_array_equal(src.read(), image)
    np.testing.assert_array_equal(_read(row.target_path)[0], mask)


def test_failed_write_leaves_the_previous_shard_intact(
    tmp_path: Path, make_dataset: MakeDataset, write_tif: WriteRaster
) -> None:
    root = make_dataset(tmp_path / "src", rows=2, cols=3)
    out = tmp_path / "out"
    first = build_headers(DatasetSpec(dataset_id="d", root=root))
    write_shards(first.catalog, _one_split(first), out)
    before = _snapshot(out)
    # The shard must be rebuilt (its first tile changed), then a later tile of it vanishes mid-way.
    changed = root / "masks" / "tile_000_000.tif"
    with rasterio.open(changed) as src:
        transform = src.transform
    write_tif(changed, np.full((32, 32), 2, np.uint8), transform=transform)
    second = build_headers(DatasetSpec(dataset_id="d", root=root))
    (root / "images" / "tile_001_002.tif").unlink()  # deleted after the headers were built

    with pytest.raises(OSError, match="tile_001_002"):
        write_shards(second.catalog, _one_split(second), out)

    assert _snapshot(out) == before  # old shard and old manifest untouched
    assert [p.name for p in out.rglob(".*")] == []  # no .tmp-* or .old-* folder left behind
    assert len(read_shard_index(shard_dirs(out, "train")[0])) == 6


_KILLED_WRITER = """
import sys, time
from pathlib import Path
import pandas as pd
from seg_pipeline.data import shards
from seg_pipeline.data.headers import read_catalog

catalog = read_catalog(sys.argv[1])
real_store = shards._store
def slow_store(src, dst_stem, tile_format):
    path = real_store(src, dst_stem, tile_format)
    Path(sys.argv[3]).touch()  # tell the parent a half shard exists now
    time.sleep(60)
    return path
shards._store = slow_store
splits = pd.DataFrame({"item_id": sorted(catalog["item_id"]), "split": "train"})
shards.write_shards(catalog, splits, sys.argv[2])
"""


def test_process_killed_during_shard_writing_leaves_no_half_shard(
    tmp_path: Path, make_dataset: MakeDataset
) -> None:
    from seg_pipeline.data.headers import write_catalog

    root = make_dataset(tmp_path / "src", rows=1, cols=3)
    out = tmp_path / "out"
    headers = build_headers(DatasetSpec(dataset_id="d", root=root))
    write_shards(headers.catalog, _one_split(headers), out)
    before = _snapshot(out)
    changed = headers.catalog.copy()
    changed.loc[0, "image_sha256"] = "f" * 64  # forces a rewrite of the one shard
    write_catalog(changed, tmp_path / "catalog.parquet", headers.class_names)
    started = tmp_path / "started"

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "catalog.parquet"), str(out), str(started)]
    child = subprocess.Popen(args, env=env)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the writer never started its shard"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    leftovers = [p.name for p in (out / "train").iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".shard-00000.tmp-")  # hidden, half written
    visible = {k: v for k, v in _snapshot(out).items() if not k.startswith("train/.")}
    assert visible == before
    assert len(read_shard_index(shard_dirs(out, "train")[0])) == 3
    # The next successful run sweeps the dead writer's temp folder.
    write_shards(changed, _one_split(headers), out)
    assert [p.name for p in out.rglob(".*")] == []


def test_missing_manifest_or_split_is_a_clear_error(
    demo: tuple[HeaderResult, pd.DataFrame], tmp_path: Path
) -> None:
    with pytest.raises(ShardError, match="materialize the shards"):
        read_manifest(tmp_path / "nothing")
    headers, splits = demo
    write_shards(headers.catalog, splits, tmp_path / "demo")
    with pytest.raises(ShardError, match=r"'test'.*available.*metrics_train"):
        shard_dirs(tmp_path / "demo", "test")
    with pytest.raises(ShardError, match="not a shard folder"):
        read_shard_index(tmp_path / "demo")


_REAL_WRITER = """
import sys
import pandas as pd
from seg_pipeline.data import shards
from seg_pipeline.data.headers import read_catalog

catalog = read_catalog(sys.argv[1])
splits = pd.DataFrame({"item_id": sorted(catalog["item_id"]), "split": "train"})
config = shards.ShardSettings(max_items_per_shard=8, tile_format="npy")
print("START", flush=True)
shards.write_shards(catalog, splits, sys.argv[2], config, log_fn=lambda line: print(line, flush=True))
print("DONE", flush=True)
"""
#: kill -9 right after the writer's N-th progress line (one about every 10% of the tiles), then after a
#: short extra delay: the kills land in different shards and at different points of a shard.
_SHARD_KILL_AFTER_LINE = (1, 2, 4, 5, 7)
_SHARD_KILL_DELAY_S = (0.0, 0.01, 0.0, 0.02, 0.0)


def _shard_contents(split_dir: Path) -> dict[str, dict[str, bytes]]:
    """Visible shards of a split folder: name -> {relative file: bytes}."""
    return {
        shard.name: {
            str(p.relative_to(shard)): p.read_bytes() for p in sorted(shard.rglob("*")) if p.is_file()
        }
        for shard in sorted(split_dir.iterdir())
        if not shard.name.startswith(".")
    }


def test_five_kills_during_shard_writing_never_show_a_half_shard_and_the_rerun_completes(
    tmp_path: Path, make_dataset: MakeDataset
) -> None:
    """kill -9 a real (un-slowed) writer five times while it replaces every shard of a dataset.

    After each kill every visible shard is whole, either the old version or the new one; the manifest
    is the old one; a shard can be missing only in the instant between its two renames, with its old
    copy kept aside. Rerunning the write gives exactly what an uninterrupted write gives.
    """
    from seg_pipeline.data.headers import write_catalog

    root = make_dataset(tmp_path / "src", rows=8, cols=8)
    headers = build_headers(DatasetSpec(dataset_id="d", root=root))
    new_catalog = headers.catalog
    old_catalog = new_catalog.copy()
    old_catalog["image_sha256"] = "0" * 64  # every old shard index differs: the writer replaces them all
    config = ShardSettings(max_items_per_shard=8, tile_format="npy")
    write_catalog(new_catalog, tmp_path / "catalog.parquet", headers.class_names)
    splits = _one_split(headers)
    write_shards(old_catalog, splits, tmp_path / "old", config)
    write_shards(new_catalog, splits, tmp_path / "new", config)
    old, new = _shard_contents(tmp_path / "old" / "train"), _shard_contents(tmp_path / "new" / "train")
    assert len(old) == 8 and old.keys() == new.keys() and all(old[k] != new[k] for k in old)
    old_manifest = (tmp_path / "old" / MANIFEST_NAME).read_bytes()

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    outcomes = []
    for attempt, (after_line, delay_s) in enumerate(
        zip(_SHARD_KILL_AFTER_LINE, _SHARD_KILL_DELAY_S, strict=True)
    ):
        out = tmp_path / f"try{attempt}"
        write_shards(old_catalog, splits, out, config)
        args = [sys.executable, "-c", _REAL_WRITER, str(tmp_path / "catalog.parquet"), str(out)]
        child = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "START", "the writer died while importing"
            for _ in range(after_line):
                assert child.stdout.readline().startswith("shards "), f"try {attempt}: writer ended early"
            time.sleep(delay_s)
            child.send_signal(signal.SIGKILL)
            rest = child.stdout.read()
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        assert "DONE" not in rest, f"try {attempt}: the writer finished before the kill"

        split_dir = out / "train"
        hidden = sorted(p.name for p in split_dir.iterdir() if p.name.startswith("."))
        assert all(name.startswith(".shard-") and is_temp(Path(name)) for name in hidden), hidden
        visible = _shard_contents(split_dir)
        for name, files in visible.items():
            assert files in (old[name], new[name]), (
                f"try {attempt}: {name} is neither the old nor the new shard"
            )
            read_shard_index(split_dir / name)  # and its index is valid
        for name in old.keys() - visible.keys():
            assert any(h.startswith(f".{name}.old-") for h in hidden), f"try {attempt}: {name} lost"
        assert (out / MANIFEST_NAME).read_bytes() == old_manifest  # the manifest is written last
        replaced = sum(visible[name] == new[name] for name in visible)
        outcomes.append((after_line, replaced, len(hidden)))

        write_shards(new_catalog, splits, out, config)  # the rerun
        assert _shard_contents(split_dir) == new
        assert [p.name for p in out.rglob(".*")] == []
        assert json.loads((out / MANIFEST_NAME).read_text()) == read_manifest(tmp_path / "new")
    print("killed after progress line, shards already replaced, hidden temp folders:", outcomes)
    assert len({replaced for _line, replaced, _hidden in outcomes}) >= 3, outcomes  # kills spread out
