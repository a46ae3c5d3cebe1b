"""What the exporters trace: the stage checkpoint read into what export needs, and the padded net.

* **Padding inside the graph, any input size.** :class:`SegmentationModel` pads to the encoder
  stride with Python ``if``/``max`` that tracing would freeze. :class:`TraceablePaddedNet` computes
  the same reflect pad with shape arithmetic only (``(m - h % m) % m``), which ``torch.jit.trace``
  and the ONNX exporter record as graph ops: one trace serves every batch size and H/W, no
  TracerWarning. The parity check (:mod:`seg_pipeline.export.parity`) runs a second, off-stride
  shape to prove it.

The checkpoint's ``model_spec`` is read here as the plain dict the training stage stored (never
through :class:`~seg_pipeline.models.ModelSpec`); :class:`StageInfo`'s properties are the only
places that read its keys.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from seg_pipeline.models.checkpoint import CheckpointError, load_checkpoint


class TraceablePaddedNet(nn.Module):
    """The SMP net plus :class:`SegmentationModel`'s bottom/right reflect padding, trace-friendly.

    Only shape arithmetic (no Python ``if``/``max``) so tracing keeps H/W symbolic. Matches the
    eager wrapper exactly whenever both sides are at least ``max(pad_multiple, min_side)``; below
    that the eager wrapper switches to replicate padding or a larger minimum size, which this
    graph does not reproduce (the card states the minimum side).
    """

    def __init__(self, net: nn.Module, pad_multiple: int) -> None:
        super().__init__()
        self.net = net
        self.pad_multiple = int(pad_multiple)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad to the stride inside the graph, run the network, crop back."""
        height, width = x.shape[-2], x.shape[-1]
        pad_bottom = (self.pad_multiple - height % self.pad_multiple) % self.pad_multiple
        pad_right = (self.pad_multiple - width % self.pad_multiple) % self.pad_multiple
        logits = self.net(F.pad(x, (0, pad_right, 0, pad_bottom), mode="reflect"))
        return logits[:, :, :height, :width]


def pad_multiple(model: nn.Module) -> int:
    """The stride the eager wrapper pads inputs to (1 for a model that does not pad)."""
    return int(getattr(model, "pad_multiple", 1))


def min_side(model: nn.Module) -> int:
    """The smallest input side the exported graph reproduces the eager wrapper at."""
    return max(pad_multiple(model), int(getattr(model, "min_side", 1)))


def exportable_net(model: nn.Module) -> nn.Module:
    """The eager model's SMP net inside :class:`TraceablePaddedNet`, in eval mode, weights frozen."""
    net = cast(nn.Module, model.net)  # the SMP net is a submodule; nn.Module.__getattr__ says Tensor | Module
    exportable = TraceablePaddedNet(net, pad_multiple(model)).eval()
    for parameter in exportable.parameters():
        parameter.requires_grad_(False)
    return exportable


@dataclass(frozen=True)
class StageInfo:
    """What the card needs from a stage checkpoint, validated once."""

    model_spec: dict[str, Any]
    run: dict[str, Any]
    class_names: list[str]
    mean: list[float]
    std: list[float]
    state: dict[str, Any]

    @property
    def bands(self) -> int:
        """Input channels of the model (``model_spec["in_channels"]``)."""
        return int(self.model_spec["in_channels"])

    @property
    def architecture(self) -> Any:
        """The SMP architecture name stored in the spec, or None."""
        return self.model_spec.get("architecture")

    @property
    def encoder(self) -> Any:
        """The encoder name stored in the spec, or None."""
        return self.model_spec.get("encoder")


def read_stage_checkpoint(checkpoint: Path) -> StageInfo:
    """Load the checkpoint and insist on what only a training stage writes (spec, classes, stats)."""
    state = load_checkpoint(checkpoint)
    run = (state.get("config") or {}).get("run") if isinstance(state.get("config"), Mapping) else None
    missing = []
    if not isinstance(state.get("model_spec"), Mapping) or not state["model_spec"]:
        missing.append("model_spec")
    if not isinstance(run, Mapping) or "class_names" not in run:
        missing.append("config.run.class_names")
    if not isinstance(run, Mapping) or not isinstance(run.get("normalization"), Mapping):
        missing.append("config.run.normalization")
    if missing:
        raise CheckpointError(
            f"checkpoint {checkpoint} is not a training-stage checkpoint: it lacks {missing} "
            f"(top-level keys: {sorted(map(str, state))[:8]}). Export a best.pt/last.pt/final.pt written "
            "by a training stage; a bare state_dict has no classes or band statistics."
        )
    assert isinstance(run, Mapping)  # else "config.run.*" is missing and we raised above
    normalization = run["normalization"]
    return StageInfo(
        model_spec=dict(state["model_spec"]),
        run=dict(run),
        class_names=[str(name) for name in run["class_names"]],
        mean=[float(v) for v in normalization["mean"]],
        std=[float(v) for v in normalization["std"]],
        state=state,
    )


@contextlib.contextmanager
def quiet_export_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Silence torch's deprecation notices for jit/legacy-ONNX (a documented choice), keep the rest."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    for message in caught:
        if issubclass(message.category, DeprecationWarning | FutureWarning):
            continue
        warnings.warn_explicit(message.message, message.category, message.filename, message.lineno)
