"""Class remapping and interleaving of combined sources (F6)."""

from __future__ import annotations

import pytest
import torch

from seg_pipeline.data.combined import (
    ClassRemapError,
    InterleavedSources,
    RemappedSource,
    remap_table,
    resolve_remap,
)
from seg_pipeline.data.synthetic import AUX_CLASSES, TARGET_CLASSES

AUX_TO_TARGET = {
    "unknown": None,
    "bareland": "bare_soil",
    "rangeland": "vegetation",
    "developed_space": "building",
    "tree": "vegetation",
    "agriculture_land": "cropland",
}


def test_resolve_remap_by_names_keeps_shared_names_and_ignores_unmapped() -> None:
    remap = resolve_remap(AUX_TO_TARGET, AUX_CLASSES, TARGET_CLASSES)
    # road and water exist in both schemes, so they map without being listed.
    assert remap == {0: None, 1: 0, 2: 2, 3: 3, 4: 4, 5: 2, 6: 1, 7: 5}


def test_resolve_remap_rejects_unknown_names_with_the_valid_list() -> None:
    with pytest.raises(ClassRemapError, match=r"unknown target class 'forest'.*'bare_soil'"):
        resolve_remap({"tree": "forest"}, AUX_CLASSES, TARGET_CLASSES)
    with pytest.raises(ClassRemapError, match="source class id 9"):
        resolve_remap({9: 1}, AUX_CLASSES, TARGET_CLASSES)


def test_remapped_source_applies_the_table_and_sends_unmapped_to_ignore() -> None:
    lut = remap_table({0: None, 1: 0, 2: 2}, ignore_index=255)
    mask = torch.tensor([[0, 1], [2, 255]], dtype=torch.int64)
    samples = [{"image": torch.zeros(3, 2, 2), "mask": mask, "item_id": "a"}]
    (out,) = list(RemappedSource(samples, lut, name="aux"))
    assert out["mask"].tolist() == [[255, 0], [2, 255]]
    assert out["source"] == "aux"
    assert mask.tolist() == [[0, 1], [2, 255]]  # the source sample is not modified


def _source(name: str, n: int) -> RemappedSource:
    return RemappedSource(
        [{"mask": torch.zeros(1, 1), "item_id": f"{name}{i}"} for i in range(n)], None, name
    )


def test_interleaving_yields_every_sample_once_mixed_and_seeded() -> None:
    combined = InterleavedSources([_source("t", 20), _source("a", 10)], seed=3)
    first = [s["item_id"] for s in combined]
    assert sorted(first) == sorted([f"t{i}" for i in range(20)] + [f"a{i}" for i in range(10)])
    assert first != sorted(first, key=lambda x: x[0])  # not one source after the other
    assert [s["item_id"] for s in InterleavedSources([_source("t", 20), _source("a", 10)], seed=3)] == first
    assert len(combined) == 30
