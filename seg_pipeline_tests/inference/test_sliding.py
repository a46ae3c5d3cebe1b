"""Sliding windows over tiles in memory (validation): same answer as one pass, any tile size."""

from __future__ import annotations

import torch
from torch import nn

from seg_pipeline.inference.sliding import predict_tiles, sliding_probabilities
from seg_pipeline.settings.inference import WindowSettings


class PixelModel(nn.Module):
    """A 1x1 conv + softmax: each pixel's output depends on that pixel only, so windows cannot
    change it, and the blend of overlapping windows must give back the one-pass result."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.conv(x).softmax(1)


def test_blended_windows_equal_one_pass_for_a_pixelwise_model() -> None:
    model = PixelModel()
    image = torch.rand(3, 100, 70)
    with torch.no_grad():
        windowed = sliding_probabilities(model, image, WindowSettings(window=32, overlap=8, batch_size=3))
        whole = model(image[None])[0]
    torch.testing.assert_close(windowed, whole, rtol=1e-5, atol=1e-6)
    assert all(shape[-2:] == (32, 32) and shape[0] <= 3 for shape in model.calls[:-1])


def test_tiles_that_fit_a_window_are_batched_by_shape_and_large_ones_slide() -> None:
    model = PixelModel()
    images = [torch.rand(3, 20, 20), torch.rand(3, 64, 64), torch.rand(3, 20, 20), torch.rand(3, 90, 40)]
    with torch.no_grad():
        outputs = predict_tiles(model, images, WindowSettings(window=64, overlap=16, batch_size=4))
        expected = [model(image[None])[0] for image in images]
    assert [tuple(o.shape) for o in outputs] == [(4, 20, 20), (4, 64, 64), (4, 20, 20), (4, 90, 40)]
    for output, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(output, want, rtol=1e-5, atol=1e-6)
    assert (2, 3, 20, 20) in model.calls  # the two 20 px tiles went through together
