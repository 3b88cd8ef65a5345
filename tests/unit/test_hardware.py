"""dtype "auto": bf16 only where the node computes it natively."""

import pytest
import torch

from drope_ops import hardware
from drope_ops.errors import SpecError


def test_auto_follows_the_hardware():
    hardware.fast_bf16.cache_clear()
    try:
        native = hardware.fast_bf16()
        assert hardware.resolve_dtype("auto") == (torch.bfloat16 if native else torch.float32)
        flags = open("/proc/cpuinfo").read()
        assert native == (torch.cuda.is_available() or "avx512_bf16" in flags or "amx_bf16" in flags)
    finally:
        hardware.fast_bf16.cache_clear()
    assert hardware.resolve_dtype("float32") == torch.float32
    assert hardware.resolve_dtype("bfloat16") == torch.bfloat16


def test_unknown_dtype_names_the_field():
    with pytest.raises(SpecError, match=r"evaluate.dtype='fp8'.*auto, float32, bfloat16"):
        hardware.resolve_dtype("fp8", "evaluate.dtype")
