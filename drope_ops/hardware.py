"""Which compute dtype pays off on the machine a task runs on, decided by measuring it there.

bf16 halves memory everywhere, but whether it is also faster depends on the node, and cpuinfo flags do
not say: on an AVX2-only CPU PyTorch emulates bf16 and a matmul runs ~50x slower than fp32 (one thread,
2048x576 @ 576x1536: 2963 ms vs 57 ms), and on an Intel Xeon with avx512_bf16 but no AMX bf16 was
measured 1.7x *slower* than fp32. So "auto" times the model's own matmul shape in fp32 and in bf16 on
the node that computes (`dtype_probe`) and takes bf16 only if it is clearly faster (under
`BF16_MARGIN` x the fp32 time). On CUDA, bf16 is native and taken without probing.

The probe costs a few hundred milliseconds on a CPU and runs once per node: its result is kept in the
process and in `$DROPE_CACHE/dtype-probe.json` (default ~/.cache/drope), keyed by CPU model, torch
version, thread count and shapes, so a spec written on one machine stays right on another. Where bf16
is emulated, one bf16 product takes seconds: a product already `GIVE_UP` x over the time bf16 must
beat decides it, and bf16 is not timed again (the emulated case costs one product, not six).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

from drope_ops.errors import SpecError

if TYPE_CHECKING:
    import torch

Dtype = Literal["auto", "float32", "bfloat16"]
"""A compute dtype as a spec names it: auto (chosen for the node), float32 or bfloat16."""
DTYPE_CHOICES = typing.get_args(Dtype)

DEFAULT_SHAPES = (2048, 576, 1536)
"""(tokens, hidden, ffn) of the probe's matmul, tokens x hidden @ hidden x ffn: SmolLM-135M's MLP."""
BF16_MARGIN = 0.9
"""bf16 is chosen iff its best time is under this fraction of fp32's (a tie is not worth the rounding)."""
GIVE_UP = 10.0
"""bf16 stops being timed once one product (the warm-up included) took this many times the time it must
beat: repeats shave noise, not a factor of ten."""
PROBE_CACHE_FILE = "dtype-probe.json"

_PROBES: dict[str, dict] = {}  # the in-process cache, by probe key
_ANNOUNCED: set[str] = set()   # keys resolve_dtype already printed its one line for


def _cpu_model() -> str:
    """The CPU's model name plus a digest of its flags: VMs often report a generic name ("Intel(R)
    Xeon(R) Processor") for CPUs that differ in exactly the bf16 units that matter here."""
    name, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown cpu"
    return f"{name} (flags {hashlib.sha256(flags.encode()).hexdigest()[:8]})" if flags else name


def _cache_file() -> Path:
    return Path(os.environ.get("DROPE_CACHE", Path.home() / ".cache" / "drope")) / PROBE_CACHE_FILE


def _read_cache_file() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache_file(key: str, result: dict) -> None:
    """Best effort: a read-only or shared home only costs a re-probe in the next process."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache_file()
        data[key] = result
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def clear_probe_cache() -> None:
    """Forget this process's probe results (the cache file stays; delete it to re-probe a node)."""
    _PROBES.clear()
    _ANNOUNCED.clear()


def _best_ms(dtype: torch.dtype, shapes: tuple[int, int, int], device: str, repeats: int,
             timer: Callable[[], float], matmul: Callable, give_up_ms: float = float("inf")) -> tuple[float, int]:
    """(best time in ms, timed products): one warm-up, then up to `repeats` timed products; stops at the
    first product (the warm-up included) slower than `give_up_ms`, returning that time (0 timed: the
    warm-up's)."""
    import torch

    m, k, n = shapes
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed() -> float:
        t0 = timer()
        matmul(a, b)
        sync()
        return (timer() - t0) * 1000.0

    warm_up = timed()  # first-call allocation and kernel selection are not the steady state
    if warm_up > give_up_ms:
        return warm_up, 0
    best, runs = float("inf"), 0
    while runs < repeats:
        best, runs = min(best, timed()), runs + 1
        if best > give_up_ms:
            break
    return best, runs


def dtype_probe(shapes: tuple[int, int, int] | None = None, device: str | None = None, *,
                repeats: int = 5, timer: Callable[[], float] = time.perf_counter,
                matmul: Callable | None = None) -> dict:
    """The dtype "auto" picks on this node, with the facts it picked on.

    Times `tokens x hidden @ hidden x ffn` (`shapes`, default DEFAULT_SHAPES) in fp32 and bf16 on
    `device` (default: cuda if available, else cpu) with torch's current thread count: one warm-up,
    then the best of `repeats` (bf16: none more once a product took GIVE_UP x the time it must beat).
    Returns {choice, fp32_ms, bf16_ms, bf16_runs (timed bf16 products), ratio (bf16/fp32), source
    ("measured", "cache file" or "cuda": no probe), device, threads, shapes, cpu, torch, key}.
    Cached per process and in $DROPE_CACHE/dtype-probe.json under `key`. `timer` and `matmul` are
    there to be injected by tests (matmul default: torch.matmul); results are cached under the same key
    whoever measured them. torch is imported here, not with the module: a spec names a dtype without it.
    """
    import torch

    matmul = matmul or torch.matmul
    shapes = tuple(int(x) for x in (shapes or DEFAULT_SHAPES))
    if len(shapes) != 3 or min(shapes) < 1:
        raise ValueError(f"shapes={shapes!r}: want (tokens, hidden, ffn), all positive")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    facts = {"device": device, "threads": threads, "shapes": list(shapes), "cpu": _cpu_model(),
             "torch": torch.__version__}
    if device.startswith("cuda"):
        return {**facts, "choice": "bfloat16", "fp32_ms": None, "bf16_ms": None, "ratio": None,
                "source": "cuda", "key": None}
    m, k, n = shapes
    key = f"{facts['cpu']} | torch {facts['torch']} | {threads} threads | {m}x{k} @ {k}x{n} | {device}"
    if key in _PROBES:
        return dict(_PROBES[key])
    cached = _read_cache_file().get(key)
    if isinstance(cached, dict) and cached.get("choice") in ("float32", "bfloat16"):
        result = {**cached, "source": "cache file", "key": key}
    else:
        fp32_ms, _ = _best_ms(torch.float32, shapes, device, repeats, timer, matmul)
        bf16_ms, bf16_runs = _best_ms(torch.bfloat16, shapes, device, repeats, timer, matmul,
                                      give_up_ms=GIVE_UP * BF16_MARGIN * fp32_ms)
        choice = "bfloat16" if bf16_ms < BF16_MARGIN * fp32_ms else "float32"
        result = {**facts, "choice": choice, "fp32_ms": round(fp32_ms, 3), "bf16_ms": round(bf16_ms, 3),
                  "bf16_runs": bf16_runs,
                  "ratio": round(bf16_ms / fp32_ms, 3) if fp32_ms > 0 else None,
                  "source": "measured", "key": key}
        _write_cache_file(key, {k_: v for k_, v in result.items() if k_ not in ("source", "key")})
    _PROBES[key] = result
    return dict(result)


def describe_probe(probe: dict) -> str:
    """One line for logs: `[dtype] auto -> bfloat16 (fp32 41.2 ms, bf16 22.0 ms, probe on this node)`."""
    if probe["source"] == "cuda":
        return f"[dtype] auto -> {probe['choice']} (CUDA computes bf16 natively: no probe)"
    where = "probe on this node" + (", cached" if probe["source"] == "cache file" else "")
    once = " in its first product" if probe.get("bf16_runs") == 0 else ""
    return (f"[dtype] auto -> {probe['choice']} "
            f"(fp32 {probe['fp32_ms']:.1f} ms, bf16 {probe['bf16_ms']:.1f} ms{once}, {where})")


def resolve_dtype(name: str, field: str = "dtype") -> torch.dtype:
    """"auto" -> what `dtype_probe()` measured to be faster on this node; names pass through.
    Prints the probe's one line the first time a process resolves "auto"."""
    if name not in DTYPE_CHOICES:
        raise SpecError(f"{field}={name!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    import torch

    if name == "auto":
        probe = dtype_probe()
        tag = probe["key"] or probe["device"]
        if tag not in _ANNOUNCED:
            _ANNOUNCED.add(tag)
            print(describe_probe(probe), flush=True)
        return getattr(torch, probe["choice"])
    return getattr(torch, name)


def use_cpus(cpus: float) -> None:
    """Let torch use a task's CPU share: Ray reuses worker processes across tasks of different sizes,
    so the thread count a worker started with is not the one this task was given."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def run_with_cpus(cpus: float, fn, *args):
    """fn(*args) with torch on `cpus` threads: the body of a Ray task given num_cpus=cpus."""
    use_cpus(cpus)
    return fn(*args)
