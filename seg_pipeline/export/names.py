"""The names an export publishes: formats, their file names, the card's name, the graph's input/output.

Deployment code reads these names from the folder and the graphs, so they live in one place that
the exporters, the model card and the API all import.
"""

from __future__ import annotations

from seg_pipeline.settings.export import FORMATS

__all__ = ["CARD_NAME", "FILE_NAMES", "FORMATS", "INPUT_NAME", "OUTPUT_NAME"]
FILE_NAMES: dict[str, str] = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
CARD_NAME = "model_card.json"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
