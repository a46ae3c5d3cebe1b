"""Export a trained stage checkpoint to TorchScript and ONNX with a model card (F24 in docs/architecture.md).

Deployment targets (a C++/Java service, ONNX Runtime on an edge box, a GIS plugin) cannot run
our Python wrapper, so the export bakes everything the model needs into the graph and writes the
rest into ``model_card.json``: classes, bands, normalisation, input constraints, metrics, lineage.

Choices, each measured on torch 2.14.1 / SMP 0.6 / onnxruntime 1.31 (CPU), are explained where
they are made, one job per module:

* ``graph``: the stage checkpoint read into what export needs, and the padded net traced with
  padding inside the graph, so one trace serves any batch and input size.
* ``torchscript`` / ``onnx``: the two exporters (ONNX via the TorchScript-based exporter, why not
  dynamo, why PSPNet and UPerNet are TorchScript only).
* ``parity``: seeded inputs, eager reference, tolerances; a failing format publishes nothing.
* ``card``: ``model_card.json``.
* ``arguments``: the argument checks, before any checkpoint is read.
* ``api``: :func:`export_model` and the atomic staging folder; ``cli``: ``main``.
* ``errors`` / ``names``: the errors and the published names every module shares.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module that defines it. Imported on first use, so ``seg-pipeline summary``
#: (which builds the ``export`` sub-command's parser) does not pay for torch.
_EXPORTS = {
    "ExportResult": "api",
    "export_model": "api",
    "CARD_VERSION": "card",
    "main": "cli",
    "ExportError": "errors",
    "ExportParityError": "errors",
    "CARD_NAME": "names",
    "FILE_NAMES": "names",
    "FORMATS": "names",
    "INPUT_NAME": "names",
    "OUTPUT_NAME": "names",
    "DEFAULT_TOLERANCES": "parity",
    "PARITY_SEED": "parity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
