"""Settings of model export (seed 000's runtime export): formats, trace example, ONNX opset."""

from __future__ import annotations

import importlib.util

from pydantic import Field, field_validator, model_validator

from seg_pipeline.settings.base import Settings

#: The formats an export can write (the exporters and the model card use these names).
FORMATS: tuple[str, ...] = ("torchscript", "onnx")


class ExportSettings(Settings):
    """What ``seg-pipeline export`` and the ``exported_model`` asset write beside the model card."""

    formats: list[str] = Field(
        default=["torchscript", "onnx"],
        min_length=1,
        description="Formats to write; each is checked against the eager model (parity) before it lands.",
    )
    example_size: int = Field(
        default=256,
        ge=16,
        description="Side in pixels of the square trace example; the exports accept any batch and H/W.",
    )
    opset: int = Field(default=17, ge=11, description="ONNX opset.")

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, formats: list[str]) -> list[str]:
        unknown = [name for name in formats if name not in FORMATS]
        if unknown:
            raise ValueError(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")
        return list(dict.fromkeys(formats))

    @model_validator(mode="after")
    def _onnx_is_installed(self) -> ExportSettings:
        """Refuse ONNX without the onnx package when the run starts, not after both trainings."""
        if "onnx" in self.formats and importlib.util.find_spec("onnx") is None:
            raise ValueError(
                "formats includes 'onnx' but the onnx package is not installed: pip install onnx "
                "onnxruntime, or set formats: [torchscript]"
            )
        return self
