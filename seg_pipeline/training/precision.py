"""Device selection and mixed-precision policy (F13 in docs/architecture.md, seed 000).

The rule from seed 000: AMP is forced on for CUDA, forced off for MPS and opt-in (``amp=True``,
bf16 autocast) on CPU. On CUDA the autocast dtype is bf16 where the GPU supports it (no loss
scaling needed), otherwise fp16 with a :class:`torch.amp.GradScaler`.

CPU default (``amp=None``): chosen by capability, because machines differ. oneDNN runs bf16
convolutions on AMX tiles (``amx_bf16`` in ``/proc/cpuinfo``): there bf16 autocast + channels_last
trained Unet-resnet18 2.83x faster than fp32 (issue 13's measurement, ``bench/bench_train_step.py``).
Without AMX it does not pay: on a 2-core AVX512-BF16 CPU (no AMX) fp32 + channels_last took 1.51
s/step and bf16 + channels_last 1.94 s; on AVX2 CPUs bf16 is emulated. So CPUs with AMX get bf16
autocast, others fp32 + ``channels_last``; the choice and its reason are in :meth:`describe`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from seg_pipeline.hardware import (
    AMX_FLAG,
    DEVICE_CHOICES,
    cpu_bf16_is_fast,
    describe_precision,
    resolve_device,
)

__all__ = ["DEVICE_CHOICES", "PrecisionPolicy", "resolve_device"]


@dataclass(frozen=True)
class PrecisionPolicy:
    """Resolved precision settings for one device.

    Attributes:
        device: where the model and batches live.
        amp_dtype: autocast dtype (``torch.bfloat16``/``torch.float16``) or ``None`` for full fp32.
        channels_last: whether models and 4-D inputs use the NHWC memory format.
        note: why a requested setting was overridden (empty when nothing was), for the run log.
    """

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    note: str = ""

    @classmethod
    def for_device(
        cls,
        device: str | torch.device = "auto",
        amp: bool | None = None,
        channels_last: bool | None = None,
    ) -> PrecisionPolicy:
        """Resolve ``device`` (raising if unavailable), then apply :meth:`from_rule`."""
        return cls.from_rule(resolve_device(device), amp, channels_last)

    @classmethod
    def from_rule(
        cls,
        device: torch.device,
        amp: bool | None = None,
        channels_last: bool | None = None,
        cuda_bf16_supported: bool | None = None,
        cpu_bf16_fast: bool | None = None,
    ) -> PrecisionPolicy:
        """The seed-000 rule for an already resolved device; ``None`` means "the device default".

        CUDA: AMP always (bf16 when supported, else fp16 + GradScaler), channels_last by default.
        MPS: AMP never, contiguous by default. CPU: ``amp=None`` = bf16 autocast where the CPU has
        AMX (``cpu_bf16_fast``, detected when ``None``), else fp32; channels_last by default.
        """
        notes: list[str] = []
        if device.type == "cuda":
            if amp is False:
                notes.append("amp=False ignored: AMP is always on for CUDA (seed 000 policy)")
            if cuda_bf16_supported is None:
                cuda_bf16_supported = torch.cuda.is_bf16_supported()
            amp_dtype: torch.dtype | None = torch.bfloat16 if cuda_bf16_supported else torch.float16
            default_channels_last = True
        elif device.type == "mps":
            if amp:
                notes.append("amp=True ignored: AMP is always off for MPS (seed 000 policy)")
            amp_dtype = None
            default_channels_last = False
        else:
            if amp is None:
                amp = cpu_bf16_is_fast() if cpu_bf16_fast is None else cpu_bf16_fast
                notes.append(
                    f"bf16 chosen: CPU has {AMX_FLAG}" if amp else f"fp32 chosen: no {AMX_FLAG} on this CPU"
                )
            amp_dtype = torch.bfloat16 if amp else None
            default_channels_last = True
        use_channels_last = default_channels_last if channels_last is None else bool(channels_last)
        return cls(device, amp_dtype, use_channels_last, "; ".join(notes))

    @property
    def amp_enabled(self) -> bool:
        """True when forward passes run under autocast."""
        return self.amp_dtype is not None

    @property
    def uses_grad_scaler(self) -> bool:
        """fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 does not."""
        return self.amp_dtype == torch.float16

    @property
    def memory_format(self) -> torch.memory_format:
        """Memory format for the model and 4-D inputs."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        """One readable line for the run log, e.g. ``cpu bf16-autocast channels_last``."""
        return describe_precision(
            self.device, self.amp_dtype, self.channels_last, self.note, loss_scaling=self.uses_grad_scaler
        )

    @contextlib.contextmanager
    def autocast_context(self) -> Iterator[None]:
        """Autocast for the forward pass and loss; a no-op in fp32."""
        if self.amp_dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
            yield

    def make_grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is enabled only for fp16 (disabled scalers are pass-throughs)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.uses_grad_scaler)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device and memory format in place (optimizer references stay valid)."""
        # torch's stubs list memory_format only alone; Module.to takes it with device (_parse_to)
        return model.to(device=self.device, memory_format=self.memory_format)  # type: ignore[call-overload]

    def prepare_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move one tensor to the device; 4-D floating tensors (images) also get the memory format."""
        non_blocking = self.device.type == "cuda"
        if tensor.dim() == 4 and tensor.is_floating_point():
            return tensor.to(self.device, non_blocking=non_blocking, memory_format=self.memory_format)
        return tensor.to(self.device, non_blocking=non_blocking)
