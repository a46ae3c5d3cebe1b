"""Atomic writes with one temp scheme, the stale-temp sweep, file modes, hashes and JSON."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seg_pipeline.io import (
    STALE_AFTER_S,
    atomic_dir,
    atomic_write,
    file_sha256,
    is_temp,
    read_json,
    sweep_stale_temps,
    temp_name,
    write_json,
    write_text,
)


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    payload = os.urandom(3 * (1 << 20) + 7)  # several read chunks
    path.write_bytes(payload)
    assert file_sha256(path) == hashlib.sha256(payload).hexdigest()


def test_atomic_write_renames_into_place_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out" / "result.txt"
    with atomic_write(final) as tmp:
        assert tmp != final and tmp.parent == final.parent and tmp.name.startswith(".")
        assert tmp.suffix == ".txt" and is_temp(tmp)  # GDAL/matplotlib pick formats from the suffix
        tmp.write_text("done")
        assert not final.exists()  # nothing visible until the body finished
    assert final.read_text() == "done"
    assert sorted(p.name for p in final.parent.iterdir()) == ["result.txt"]


def test_atomic_write_leaves_nothing_when_the_body_raises(tmp_path: Path) -> None:
    final = tmp_path / "result.tif"
    with pytest.raises(RuntimeError, match="boom"), atomic_write(final) as tmp:
        tmp.write_text("half")
        Path(f"{tmp}.aux.xml").write_text("gdal sidecar")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_the_old_file_when_the_body_raises(tmp_path: Path) -> None:
    final = tmp_path / "result.txt"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(final) as tmp:
        tmp.write_text("new but unfinished")
        raise RuntimeError("interrupted")
    assert final.read_text() == "old"
    assert list(tmp_path.iterdir()) == [final]


def test_atomic_dir_swaps_whole_folders(tmp_path: Path) -> None:
    final = tmp_path / "shard-00000"
    with atomic_dir(final) as staging:
        (staging / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(final) as staging:
        (staging / "a.txt").write_text("v2 half")
        raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "v1"  # the failed rewrite left the old folder whole
    with atomic_dir(final) as staging:
        (staging / "b.txt").write_text("v2")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000"]  # no temp or retired folder left


def test_published_files_follow_the_umask_not_0600(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        path = write_json(tmp_path / "manifest.json", {"a": 1})
        with atomic_dir(tmp_path / "folder") as staging:
            (staging / "x").write_text("x")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_sweep_removes_dead_writers_temps_and_keeps_live_ones(tmp_path: Path) -> None:
    dead = tmp_path / f".last.pt.tmp-{_dead_pid()}-0123abcd.pt"
    dead.write_text("half checkpoint of a killed writer")
    dead_dir = tmp_path / f".shard-00001.tmp-{_dead_pid()}-0123abcd"
    dead_dir.mkdir()
    mine = temp_name(tmp_path / "best.pt")
    mine.write_text("this process is still writing it")
    live_parent = tmp_path / f".x.tif.tmp-{os.getppid()}-89abcdef.tif"
    live_parent.write_text("a live process's temp")
    user_file = tmp_path / ".hidden-user-file"
    user_file.write_text("not ours")
    removed = sweep_stale_temps(tmp_path)
    assert sorted(removed) == sorted([dead, dead_dir])
    assert mine.exists() and live_parent.exists() and user_file.exists()


def test_sweep_removes_very_old_temps_whatever_their_pid(tmp_path: Path) -> None:
    old = temp_name(tmp_path / "a.json")
    old.write_text("{}")
    assert sweep_stale_temps(tmp_path) == []
    assert sweep_stale_temps(tmp_path, now=time.time() + STALE_AFTER_S + 60) == [old]


def test_json_round_trip_is_stable(tmp_path: Path) -> None:
    path = write_json(tmp_path / "a.json", {"b": [1, 2], "a": Path("/x")})
    assert path.read_text() == '{\n  "a": "/x",\n  "b": [\n    1,\n    2\n  ]\n}\n'
    assert read_json(path) == {"a": "/x", "b": [1, 2]}
    write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"


def test_folder_lock_makes_a_second_writer_wait_and_leaves_no_folder(tmp_path: Path) -> None:
    import multiprocessing
    import time

    from seg_pipeline.io import folder_lock

    target = tmp_path / "processed" / "demo"
    context = multiprocessing.get_context("spawn")
    with folder_lock(target, "test"):
        started = time.monotonic()
        other = context.Process(target=_hold_lock, args=(str(target), str(tmp_path / "other.txt")))
        other.start()
        time.sleep(1.0)
        assert not (tmp_path / "other.txt").exists()  # still waiting for us
    other.join(timeout=30)
    assert (tmp_path / "other.txt").read_text() == "done" and time.monotonic() - started >= 1.0
    assert not target.exists()  # the lock file sits beside the folder, nothing made inside


def _hold_lock(folder: str, marker: str) -> None:
    from seg_pipeline.io import folder_lock

    with folder_lock(Path(folder), "other"):
        Path(marker).write_text("done")
