"""Which compute dtype pays off on the machine a task runs on.

bf16 halves memory everywhere, but it is only fast where the hardware does bf16 math: CUDA GPUs, and
CPUs with avx512_bf16 or AMX. On an AVX2-only CPU PyTorch emulates it and a bf16 matmul runs ~50x
slower than fp32 (measured: 2048x576 @ 576x1536, one thread, 2963 ms vs 57 ms). "auto" picks for the
node at hand, so a spec written on one machine stays right on another.
"""

from __future__ import annotations

import typing
from functools import lru_cache
from typing import Literal

import torch

from drope_ops.errors import SpecError

Dtype = Literal["auto", "float32", "bfloat16"]
"""A compute dtype as a spec names it: auto (chosen for the node), float32 or bfloat16."""
DTYPE_CHOICES = typing.get_args(Dtype)


@lru_cache(maxsize=1)
def fast_bf16() -> bool:
    if torch.cuda.is_available():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, field: str = "dtype") -> torch.dtype:
    """"auto" -> bfloat16 where the hardware computes it natively, else float32; names pass through."""
    if name not in DTYPE_CHOICES:
        raise SpecError(f"{field}={name!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    if name == "auto":
        return torch.bfloat16 if fast_bf16() else torch.float32
    return getattr(torch, name)


def use_cpus(cpus: float) -> None:
    """Let torch use a task's CPU share: Ray reuses worker processes across tasks of different sizes,
    so the thread count a worker started with is not the one this task was given."""
    torch.set_num_threads(max(1, int(cpus)))


def run_with_cpus(cpus: float, fn, *args):
    """fn(*args) with torch on `cpus` threads: the body of a Ray task given num_cpus=cpus."""
    use_cpus(cpus)
    return fn(*args)
