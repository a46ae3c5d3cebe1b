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

from seg_pipeline.export.api import ExportResult, export_model
from seg_pipeline.export.card import CARD_VERSION
from seg_pipeline.export.cli import main
from seg_pipeline.export.errors import ExportError, ExportParityError
from seg_pipeline.export.names import CARD_NAME, FILE_NAMES, FORMATS, INPUT_NAME, OUTPUT_NAME
from seg_pipeline.export.parity import DEFAULT_TOLERANCES, PARITY_SEED

__all__ = [
    "CARD_NAME",
    "CARD_VERSION",
    "DEFAULT_TOLERANCES",
    "FILE_NAMES",
    "FORMATS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PARITY_SEED",
    "ExportError",
    "ExportParityError",
    "ExportResult",
    "export_model",
    "main",
]
