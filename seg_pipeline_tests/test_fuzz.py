"""Property tests (hypothesis) on the three places bad or unusual input meets the pipeline first:
the header builder (random bytes, truncated GeoTIFFs, random dtypes, bands, sizes, nodata), the
confusion matrix (against a reference count), and the sliding-window tiler (any raster size,
window, overlap, scale). Bounded by ``max_examples`` so the suite stays fast."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import rasterio
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seg_pipeline.data.headers import STATUS_OK, STATUS_QUARANTINED, build_headers
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.inference.sliding import sliding_probabilities
from seg_pipeline.inference.windows import blend_weights, window_grid
from seg_pipeline.metrics import ConfusionMatrix
from seg_pipeline.settings.inference import WindowSettings

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(
    dtype=st.sampled_from(["uint8", "uint16", "int16", "float32"]),
    bands=st.integers(1, 5),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    nodata=st.one_of(st.none(), st.integers(0, 200)),
    truncate=st.one_of(st.none(), st.integers(0, 400)),
    garbage=st.booleans(),
)
def test_the_header_builder_never_raises_on_a_tile(
    dtype, bands, height, width, nodata, truncate, garbage
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        path = root / "images" / "t.tif"
        if garbage:
            path.write_bytes(np.random.default_rng(height).bytes(height * width + 7))
        else:
            data = (np.arange(bands * height * width) % 250).reshape(bands, height, width).astype(dtype)
            profile = {"driver": "GTiff", "height": height, "width": width, "count": bands, "dtype": dtype}
            with rasterio.open(path, "w", nodata=nodata, **profile) as dst:
                dst.write(data)
            if truncate is not None:
                path.write_bytes(path.read_bytes()[:truncate])
        (row,) = build_headers(DatasetSpec(dataset_id="f", root=root)).catalog.to_dict("records")
        assert row["status"] in (STATUS_OK, STATUS_QUARANTINED)
        if row["status"] == STATUS_QUARANTINED:
            assert str(path) in row["reason"] or "all nodata" in row["reason"], row["reason"]


@FAST
@given(
    classes=st.integers(2, 7),
    n=st.integers(1, 300),
    seed=st.integers(0, 10_000),
    ignore=st.sampled_from([None, 0, 255]),
)
def test_the_confusion_matrix_counts_like_a_reference(classes, n, seed, ignore) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, n)
    if ignore == 255:
        truth[rng.random(n) < 0.2] = 255
    pred = rng.integers(0, classes, n)
    matrix = ConfusionMatrix(classes, ignore_index=ignore)
    matrix.update(pred, truth)
    expected = np.zeros((classes, classes), np.int64)
    for p, t in zip(pred, truth, strict=True):
        if t != ignore and t < classes:
            expected[t, p] += 1
    np.testing.assert_array_equal(matrix.matrix, expected)


@FAST
@given(
    height=st.integers(1, 90),
    width=st.integers(1, 90),
    window=st.integers(16, 48),
    overlap_share=st.floats(0.0, 0.9),
)
def test_windows_cover_every_pixel_and_blending_returns_the_input_shape(
    height, width, window, overlap_share
) -> None:
    overlap = min(int(window * overlap_share), window - 1)
    grid = window_grid(height, width, window, overlap)
    covered = np.zeros((height, width), np.int64)
    for w in grid:
        assert (
            w.row_off >= 0
            and w.col_off >= 0
            and w.row_off + w.height <= height
            and w.col_off + w.width <= width
        )
        covered[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += 1
    assert covered.min() >= 1
    assert blend_weights(grid[0].height, grid[0].width, overlap).min() > 0

    image = torch.rand(3, height, width)
    probabilities = sliding_probabilities(
        lambda x: torch.softmax(x[:, :2] * 3, dim=1), image, WindowSettings(window=window, overlap=overlap)
    )
    assert probabilities.shape == (2, height, width)
    torch.testing.assert_close(probabilities, torch.softmax(image[:2] * 3, dim=0), rtol=1e-5, atol=1e-6)
