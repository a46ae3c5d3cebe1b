"""Fixtures shared by the data tests."""

from __future__ import annotations

import pytest

from seg_pipeline_tests.conftest import scratch_dir
from seg_pipeline_tests.data.test_shard_datasets import build_sharded_dataset


@pytest.fixture(scope="module")
def data(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small sharded synthetic dataset (npy and tif shards, nodata tiles) for each test module,
    removed when the module ends.
    """
    return build_sharded_dataset(
        scratch_dir(request, tmp_path_factory, request.module.__name__.rsplit(".", 1)[-1])
    )
