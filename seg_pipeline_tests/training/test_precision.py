"""Tests for device resolution and the seed-000 AMP policy table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seg_pipeline.training.precision import PrecisionPolicy, resolve_device

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.mark.parametrize(
    ("device", "amp", "channels_last", "bf16_ok", "expected_dtype", "expected_cl", "scaler"),
    [
        (
            CPU,
            None,
            None,
            False,
            None,
            True,
            False,
        ),  # CPU without AMX: fp32 + channels_last (measured fastest)
        (CPU, None, None, True, torch.bfloat16, True, False),  # CPU with AMX: bf16 (2.83x measured)
        (CPU, True, None, None, torch.bfloat16, True, False),  # opt-in bf16 autocast
        (CPU, False, None, None, None, True, False),
        (CPU, False, False, None, None, False, False),
        (CPU, True, False, None, torch.bfloat16, False, False),
        (CUDA, None, None, True, torch.bfloat16, True, False),
        (CUDA, None, None, False, torch.float16, True, True),  # fp16 needs the GradScaler
        (CUDA, False, None, True, torch.bfloat16, True, False),  # forced on for CUDA
        (MPS, None, None, None, None, False, False),
        (MPS, True, None, None, None, False, False),  # forced off for MPS
    ],
)
def test_policy_table(device, amp, channels_last, bf16_ok, expected_dtype, expected_cl, scaler) -> None:
    policy = PrecisionPolicy.from_rule(
        device, amp, channels_last, cuda_bf16_supported=bf16_ok, cpu_bf16_fast=bf16_ok
    )
    assert policy.amp_dtype == expected_dtype
    assert policy.channels_last is expected_cl
    assert policy.uses_grad_scaler is scaler


def test_overridden_requests_are_explained() -> None:
    assert (
        "AMP is always on for CUDA" in PrecisionPolicy.from_rule(CUDA, False, cuda_bf16_supported=True).note
    )
    assert "AMP is always off for MPS" in PrecisionPolicy.from_rule(MPS, True).note
    assert PrecisionPolicy.from_rule(CPU, False).note == ""
    assert PrecisionPolicy.from_rule(CPU, cpu_bf16_fast=False).describe() == (
        "cpu fp32 channels_last (fp32 chosen: no amx_bf16 on this CPU)"
    )
    assert PrecisionPolicy.from_rule(CPU, cpu_bf16_fast=True).describe() == (
        "cpu bf16-autocast channels_last (bf16 chosen: CPU has amx_bf16)"
    )
    assert PrecisionPolicy.from_rule(CPU, True, False).describe() == "cpu bf16-autocast contiguous"


def test_resolve_device_choices_and_errors() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'"):
            resolve_device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='tpu'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="auto"):
        resolve_device("auto:0")


def test_autocast_context_and_tensor_preparation_on_cpu() -> None:
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with PrecisionPolicy.from_rule(CPU, amp=True).autocast_context():
        assert layer(x).dtype == torch.bfloat16
    with PrecisionPolicy.from_rule(CPU, cpu_bf16_fast=False).autocast_context():  # a CPU without AMX
        assert layer(x).dtype == torch.float32

    policy = PrecisionPolicy.from_rule(CPU)  # bf16 or fp32 by this machine: channels-last either way
    image = policy.prepare_tensor(torch.randn(2, 3, 8, 8))
    mask = policy.prepare_tensor(torch.zeros(2, 8, 8, dtype=torch.int64))
    assert image.is_contiguous(memory_format=torch.channels_last)
    assert not image.is_contiguous()
    assert mask.dtype == torch.int64 and mask.is_contiguous()
    conv = policy.prepare_model(nn.Conv2d(3, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not policy.make_grad_scaler().is_enabled()


def test_cpu_flags_are_read_from_cpuinfo(tmp_path) -> None:
    from seg_pipeline.hardware import cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert {"avx2", "amx_bf16"} <= cpu_flags(str(info))
    assert cpu_flags(str(tmp_path / "missing")) == set()
