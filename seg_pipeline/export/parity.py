"""Parity between an exported file and the eager model: seeded inputs, the difference, the check.

* **Parity check.** Eager, the saved TorchScript file and the saved ONNX file (in onnxruntime when
  installed, else only ``onnx.checker``) run the same seeded inputs; differences above the
  tolerances raise :class:`ExportParityError` and nothing is published.

:data:`DEFAULT_TOLERANCES` are max abs logit differences per format; onnxruntime's kernels differed
from torch's by ~1e-5 on torch 2.14.1 / SMP 0.6 / onnxruntime 1.31 (CPU), well inside 1e-3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from seg_pipeline.export.errors import ExportParityError

DEFAULT_TOLERANCES: dict[str, float] = {"torchscript": 1e-4, "onnx": 1e-3}
PARITY_SEED = 0
#: Off-stride extra rows/columns of the second parity input, so the in-graph padding is exercised.
_PARITY_EXTRA_ROWS, _PARITY_EXTRA_COLS = 5, 11


def parity_inputs(bands: int, example_size: int) -> list[torch.Tensor]:
    """Seeded inputs: the trace example shape, then batch 2 at an off-stride size.

    So the parity check also proves that batch and H/W are dynamic and the in-graph padding is right.
    """
    generator = torch.Generator().manual_seed(PARITY_SEED)
    shapes = [
        (1, bands, example_size, example_size),
        (2, bands, example_size + _PARITY_EXTRA_ROWS, example_size + _PARITY_EXTRA_COLS),
    ]
    return [torch.randn(shape, generator=generator) for shape in shapes]


def eager_outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The reference outputs: the eager wrapper, with its own (non-traced) padding code."""
    with torch.no_grad():
        return [model(x) for x in inputs]


def max_abs_diff(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference over all pairs; ``inf`` when any pair's shapes differ."""
    worst = 0.0
    for output, reference in zip(outputs, references, strict=True):
        if tuple(output.shape) != tuple(reference.shape):
            return math.inf
        worst = max(worst, float((output.float() - reference.float()).abs().max()))
    return worst


def check_parity(name: str, difference: float, tolerance: float, detail: str) -> None:
    """Raise :class:`ExportParityError` naming the format when ``difference`` exceeds ``tolerance``."""
    if not difference <= tolerance:  # also catches NaN
        raise ExportParityError(
            f"{name} export differs from the eager model by max abs {difference:.3g} > tolerance "
            f"{tolerance:.3g} ({detail}); nothing was written. Check the architecture traces with "
            "dynamic shapes, or raise the tolerance if the difference is numerical noise."
        )
