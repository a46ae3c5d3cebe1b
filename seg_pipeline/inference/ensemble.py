"""``EnsemblePredictor``: models plus a TTA config; one set of forward passes serves every output.

:meth:`EnsemblePredictor.predict_sets` runs each model's TTA views once per input and returns each
model's own probabilities *and* the ensemble's, merged from the same terms. Predicting the single
models and the ensemble therefore costs the sum of the models' views, not twice that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from seg_pipeline.contracts import ENSEMBLE
from seg_pipeline.hardware import AMX_FLAG, cpu_bf16_is_fast, describe_precision, resolve_device
from seg_pipeline.inference.tta import TTAConfig, member_term, merge_terms, tta_predict, view_probabilities

__all__ = ["ENSEMBLE", "EnsemblePredictor", "resolve_device"]

#: The name of the merged output among :meth:`EnsemblePredictor.predict_sets`'s results.


class EnsemblePredictor:
    """Average class probabilities of ``models`` over the TTA views of ``tta``.

    The models are put in eval mode and moved to ``device`` **in place** (``nn.Module.to``), and
    converted to channels-last when ``tta.channels_last`` is set. An instance is a valid
    ``predict_fn`` for ``predict_raster``: ``predictor(batch) -> probabilities``.

    Args:
        models: Modules mapping float (B, C, H, W) to logits (B, K, H, W); all must share K.
        tta: Augmentations and merge mode; default ``TTAConfig()`` (3 scales x none/h/v).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"`` or a ``torch.device``.
        names: One name per model for :meth:`predict_sets` (default ``model_0``, ``model_1``...).
        weights: Ensemble weight per model (default: equal).
        suppressed_class: A class id that is never predicted (a ``ignore_index`` inside the class
            range means "not labelled": the models never learnt it).
        class_bias: Per-class offsets added to the ensemble's log-probabilities (tuned decision
            thresholds, :mod:`~seg_pipeline.inference.tuning`); the single models stay as trained.
        precision_reason: Why ``tta.amp_dtype`` was chosen (:func:`inference_dtype`), for
            :attr:`precision`.
        model_note: What was done to the models for inference (e.g. ``batchnorm folded 30/30``,
            :mod:`~seg_pipeline.inference.folding`), appended to :attr:`precision`.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        tta: TTAConfig | None = None,
        device: str | torch.device = "cpu",
        *,
        names: Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
        suppressed_class: int | None = None,
        class_bias: Sequence[float] | None = None,
        precision_reason: str = "",
        model_note: str = "",
    ) -> None:
        models = list(models)
        if not models:
            raise ValueError("EnsemblePredictor needs at least one model.")
        for index, model in enumerate(models):
            if not isinstance(model, nn.Module):
                raise ValueError(f"models[{index}] must be a torch.nn.Module, got {type(model).__name__}.")
        self.names = list(names) if names is not None else [f"model_{i}" for i in range(len(models))]
        if len(self.names) != len(models) or len(set(self.names)) != len(models) or ENSEMBLE in self.names:
            raise ValueError(
                f"names={self.names} must be {len(models)} distinct names other than {ENSEMBLE!r}."
            )
        self.weights = list(weights) if weights is not None else None
        self.suppressed_class = suppressed_class
        self.class_bias = None if class_bias is None or not any(class_bias) else list(class_bias)
        self.tta = tta or TTAConfig()
        self.device = resolve_device(device)
        self.precision_reason = precision_reason
        self.model_note = model_note
        memory_format = torch.channels_last if self.tta.channels_last else torch.preserve_format
        # torch's stubs list memory_format only alone; Module.to takes it with a device (_parse_to)
        self.models = [
            model.eval().to(self.device, memory_format=memory_format)  # type: ignore[call-overload]
            for model in models
        ]

    @property
    def forward_views(self) -> int:
        """Views averaged per input: models x scales x transforms (18 for the defaults and 2 models)."""
        return len(self.models) * self.tta.views_per_model

    @property
    def precision(self) -> str:
        """One line for logs and metadata, e.g. ``cpu bf16-autocast channels_last (bf16 chosen: ...)``."""
        tta = self.tta
        line = describe_precision(self.device, tta.amp_dtype, tta.channels_last, self.precision_reason)
        return f"{line}, {self.model_note}" if self.model_note else line

    def _suppress(self, probabilities: Tensor) -> Tensor:
        if self.suppressed_class is None or not 0 <= self.suppressed_class < probabilities.shape[1]:
            return probabilities
        probabilities[:, self.suppressed_class] = 0.0
        return probabilities / probabilities.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def _biased(self, probabilities: Tensor) -> Tensor:
        """The ensemble's probabilities re-weighted by ``exp(class_bias)`` (argmax of log p + bias)."""
        if self.class_bias is None:
            return probabilities
        if len(self.class_bias) != probabilities.shape[1]:
            raise ValueError(
                f"class_bias has {len(self.class_bias)} values for {probabilities.shape[1]} classes"
            )
        factors = torch.tensor(self.class_bias, dtype=probabilities.dtype, device=probabilities.device).exp()
        probabilities = probabilities * factors.view(1, -1, 1, 1)
        return probabilities / probabilities.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def predict_sets(self, x: Tensor) -> dict[str, Tensor]:
        """Each model's probabilities by name, and the ensemble's under ``"ensemble"`` (one pass)."""
        x = x.to(self.device, dtype=torch.float32)
        with torch.inference_mode():
            terms = [member_term(model, x, self.tta) for model in self.models]
            outputs = {
                name: self._suppress(merge_terms([term], self.tta))
                for name, term in zip(self.names, terms, strict=True)
            }
            outputs[ENSEMBLE] = self._suppress(self._biased(merge_terms(terms, self.tta, self.weights)))
        return outputs

    def predict_views(self, x: Tensor) -> Tensor:
        """Every model's probabilities of every view, ``(B, M * V * K, H, W)`` (model-major, views
        scale-major): what view tuning scores subsets of. No weights or offsets applied.
        """
        x = x.to(self.device, dtype=torch.float32)
        with torch.inference_mode():
            views = torch.cat([view_probabilities(model, x, self.tta) for model in self.models], dim=1)
            batch, count, classes, height, width = views.shape
            flat = self._suppress(views.reshape(batch * count, classes, height, width))
        return flat.reshape(batch, count * classes, height, width)

    def predict_probabilities(self, x: Tensor) -> Tensor:
        """Ensemble class probabilities (B, K, H, W) float32, on the predictor's device."""
        x = x.to(self.device, dtype=torch.float32)
        with torch.inference_mode():  # _suppress edits in place: inference tensors only allow that here
            if self.weights is None:
                return self._suppress(self._biased(tta_predict(self.models, x, self.tta)))
            terms = [member_term(model, x, self.tta) for model in self.models]
            return self._suppress(self._biased(merge_terms(terms, self.tta, self.weights)))

    def predict(self, x: Tensor) -> Tensor:
        """Class indices (B, H, W) int64: the argmax of ``predict_probabilities``."""
        return self.predict_probabilities(x).argmax(dim=1)

    def __call__(self, x: Tensor) -> Tensor:
        """Ensemble probabilities: the ``predict_fn`` contract of ``predict_raster``."""
        return self.predict_probabilities(x)


def inference_dtype(device: torch.device, bf16: bool | None) -> tuple[torch.dtype | None, str]:
    """The autocast dtype of forward-only passes and why: ``bf16=None`` picks bf16 on CUDA GPUs that
    support it and on CPUs with AMX, fp32 elsewhere; ``True``/``False`` force it.
    """
    if bf16 is not None:
        return (torch.bfloat16 if bf16 else None), f"bf16={bf16} set"
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
        return (
            torch.bfloat16 if fast else None
        ), "bf16: GPU supports it" if fast else "fp32: GPU has no bf16"
    if device.type == "cpu" and cpu_bf16_is_fast():
        return torch.bfloat16, f"bf16 chosen: CPU has {AMX_FLAG}"
    return None, f"fp32 chosen: no {AMX_FLAG} on this CPU" if device.type == "cpu" else "fp32 on MPS"


def inference_channels_last(device: torch.device, channels_last: bool | None) -> bool:
    """Whether forward-only passes use channels-last: ``None`` = on for CPU and CUDA, off for MPS.

    oneDNN (CPU) and cuDNN run NHWC convolutions without the layout reorders that NCHW costs; with
    bf16 on an AMX CPU a Unet-resnet18 pass of 1024 px took 0.27 s in NHWC vs 0.63 s in NCHW
    (``bench/bench_forward_layout.py``).
    """
    if channels_last is not None:
        return channels_last
    return device.type in ("cpu", "cuda")
