"""TorchScript export: trace the padded net, save it, reload the saved file and compare it with eager.

``torch.jit.trace`` (not ``torch.jit.script``) records :class:`~seg_pipeline.export.graph.TraceablePaddedNet`
with its padding as shape arithmetic, so the one trace accepts any batch and H/W.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from seg_pipeline.export.graph import quiet_export_warnings
from seg_pipeline.export.parity import eager_outputs, max_abs_diff, parity_inputs
from seg_pipeline.models import SegmentationModel


def export_torchscript(
    eager: SegmentationModel, exportable: nn.Module, path: Path, bands: int, example_size: int
) -> dict[str, Any]:
    """Trace, save, reload the saved file and compare it with eager at two shapes.

    Tracer warnings (each a value frozen into the graph) are recorded; the off-stride parity input
    is what proves the trace still generalises.
    """
    inputs = parity_inputs(bands, example_size)
    with quiet_export_warnings() as caught, torch.no_grad():
        traced = torch.jit.trace(exportable, inputs[0], check_trace=False)
        traced.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
        outputs = [loaded(x) for x in inputs]
    return {
        "method": "torch.jit.trace (padding traced as shape arithmetic)",
        "dynamic_axes": ["batch", "height", "width"],
        "input_shape": ["batch", bands, "height", "width"],
        "max_abs_diff": max_abs_diff(outputs, eager_outputs(eager, inputs)),
        "parity_input_shapes": [list(x.shape) for x in inputs],
        "checked_with": f"torch.jit.load (torch {torch.__version__})",
        "tracer_warnings": sorted(
            {str(m.message) for m in caught if issubclass(m.category, torch.jit.TracerWarning)}
        ),
    }
