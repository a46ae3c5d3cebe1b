"""The names an export publishes: formats, their file names, the card's name, the graph's input/output.

Deployment code reads these names from the folder and the graphs, so they live in one place that
the exporters, the model card and the API all import.
"""

from __future__ import annotations

FORMATS: tuple[str, ...] = ("torchscript", "onnx")
FILE_NAMES: dict[str, str] = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
CARD_NAME = "model_card.json"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
