"""``EnsemblePredictor``: several segmentation models plus a TTA config, callable as a ``predict_fn``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from seg_pipeline.inference.tta import TTAConfig, tta_predict

__all__ = ["EnsemblePredictor", "resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU; anything else goes to ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {device!r}.") from error


class EnsemblePredictor:
    """Average class probabilities of ``models`` over the TTA views of ``tta``.

    The models are put in eval mode and moved to ``device`` **in place** (``nn.Module.to``), and
    converted to channels-last when ``tta.channels_last`` is set. An instance is a valid
    ``predict_fn`` for ``predict_raster``: ``predictor(batch) -> probabilities``.

    Args:
        models: Modules mapping float (B, C, H, W) to logits (B, K, H, W); all must share K.
        tta: Augmentations and merge mode; default ``TTAConfig()`` (3 scales x none/h/v).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"`` or a ``torch.device``.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        tta: TTAConfig | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        models = list(models)
        if not models:
            raise ValueError("EnsemblePredictor needs at least one model.")
        for index, model in enumerate(models):
            if not isinstance(model, nn.Module):
                raise ValueError(f"models[{index}] must be a torch.nn.Module, got {type(model).__name__}.")
        self.tta = tta or TTAConfig()
        self.device = resolve_device(device)
        memory_format = torch.channels_last if self.tta.channels_last else torch.preserve_format
        self.models = [model.eval().to(self.device, memory_format=memory_format) for model in models]

    @property
    def forward_views(self) -> int:
        """Views averaged per input: models x scales x transforms (18 for the defaults and 2 models)."""
        return len(self.models) * self.tta.views_per_model

    def predict_probabilities(self, x: Tensor) -> Tensor:
        """Class probabilities (B, K, H, W) float32, on the predictor's device."""
        return tta_predict(self.models, x.to(self.device, dtype=torch.float32), self.tta)

    def predict(self, x: Tensor) -> Tensor:
        """Class indices (B, H, W) int64: the argmax of ``predict_probabilities``."""
        return self.predict_probabilities(x).argmax(dim=1)

    def __call__(self, x: Tensor) -> Tensor:
        return self.predict_probabilities(x)
