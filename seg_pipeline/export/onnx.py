"""ONNX export with dynamic batch/height/width, checked by ``onnx.checker`` and run in onnxruntime.

* **ONNX via the TorchScript-based exporter** (``torch.onnx.export(..., dynamo=False)``). The
  dynamo exporter (the torch >= 2.9 default) needs the extra ``onnxscript`` package, took 13-22 s
  instead of 4 s for a UNet-resnet18, and could not honour opset 17 (it fell back to 18 because
  ONNX has no Pad adapter). The legacy exporter is deprecated upstream but exact here (max abs
  difference ~1e-5 in onnxruntime) with dynamic batch, height and width. It cannot export SMP's
  PSPNet and UPerNet (``adaptive_avg_pool2d`` on traced sizes, even with static shapes; dynamo
  fails on UPerNet too), so those raise :class:`ExportError` suggesting TorchScript only.

Measured on torch 2.14.1 / SMP 0.6 / onnxruntime 1.31 (CPU). ``onnx`` and ``onnxruntime`` are
imported only when ONNX is requested (the ``export`` extra), so TorchScript export works without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from seg_pipeline.export.errors import ExportError
from seg_pipeline.export.graph import quiet_export_warnings
from seg_pipeline.export.names import INPUT_NAME, OUTPUT_NAME
from seg_pipeline.export.parity import eager_outputs, max_abs_diff, parity_inputs
from seg_pipeline.models import SegmentationModel

# The legacy exporter's ceiling (20 in torch 2.14); read from torch where it says so.
MAX_OPSET: int = int(
    getattr(getattr(torch.onnx, "_constants", None), "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
)


def export_onnx(
    eager: SegmentationModel, exportable: nn.Module, path: Path, opset: int, bands: int, example_size: int
) -> dict[str, Any]:
    """Export with dynamic batch/height/width, check the graph, run it in onnxruntime if installed."""
    try:
        import onnx
    except ImportError as error:
        raise ExportError(
            "formats includes 'onnx' but the onnx package is not installed; "
            "pip install onnx onnxruntime (the 'export' extra) or use formats=('torchscript',)."
        ) from error
    inputs = parity_inputs(bands, example_size)
    axes = {0: "batch", 2: "height", 3: "width"}
    try:
        with quiet_export_warnings(), torch.no_grad():
            torch.onnx.export(
                exportable,
                (inputs[0],),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                do_constant_folding=True,
            )
    except torch.onnx.errors.OnnxExporterError as error:
        # PSPNet and UPerNet (adaptive_avg_pool2d on traced sizes) fail here even for static shapes.
        raise ExportError(
            f"torch.onnx cannot export architecture {eager.spec.architecture!r}: "
            f"{str(error).splitlines()[0][:200]}. Use formats=('torchscript',) for this model."
        ) from error
    onnx.checker.check_model(str(path), full_check=True)
    details: dict[str, Any] = {
        "method": f"torch.onnx.export(dynamo=False, opset_version={opset})",
        "opset": opset,
        "dynamic_axes": ["batch", "height", "width"],
        "input_shape": ["batch", bands, "height", "width"],
        "max_abs_diff": None,
        "parity_input_shapes": [list(x.shape) for x in inputs],
    }
    try:
        import onnxruntime
    except ImportError:
        return {
            **details,
            "checked_with": f"onnx.checker {onnx.__version__} only (onnxruntime not installed)",
        }
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]) for x in inputs]
    return {
        **details,
        "max_abs_diff": max_abs_diff(outputs, eager_outputs(eager, inputs)),
        "checked_with": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
    }
