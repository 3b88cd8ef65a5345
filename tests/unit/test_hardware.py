"""dtype "auto": whichever of fp32 / bf16 a short matmul measured to be faster on the node."""

import json

import pytest
import torch

from drope_ops import hardware
from drope_ops.errors import SpecError


@pytest.fixture
def probe_cache(tmp_path, monkeypatch):
    """A fresh probe cache file (under a private DROPE_CACHE) and an empty in-process cache."""
    monkeypatch.setenv("DROPE_CACHE", str(tmp_path))
    hardware.clear_probe_cache()
    yield tmp_path / hardware.PROBE_CACHE_FILE
    hardware.clear_probe_cache()


class Clock:
    """A timer and a matmul for the probe: each product advances the clock by its dtype's cost."""

    def __init__(self, fp32_s: float, bf16_s: float):
        self.cost = {torch.float32: fp32_s, torch.bfloat16: bf16_s}
        self.now = 100.0
        self.calls = 0
        self.shapes = set()

    def timer(self) -> float:
        return self.now

    def matmul(self, a, b):
        assert a.dtype == b.dtype
        self.calls += 1
        self.shapes.add((tuple(a.shape), tuple(b.shape)))
        # a slower first call (the warm-up) must not count: best-of takes the steady state
        self.now += self.cost[a.dtype] * (5.0 if self.calls in (1, 7) else 1.0)
        return a


@pytest.mark.parametrize("fp32_s, bf16_s, choice", [
    (0.040, 0.022, "bfloat16"),   # clearly faster: bf16
    (0.022, 0.038, "float32"),    # the avx512_bf16-without-AMX Xeon: bf16 1.7x slower
    (0.040, 0.038, "float32"),    # within the margin: not worth bf16's rounding
])
def test_auto_follows_the_measured_times(probe_cache, capsys, fp32_s, bf16_s, choice):
    clock = Clock(fp32_s, bf16_s)
    probe = hardware.dtype_probe(device="cpu", repeats=5, timer=clock.timer, matmul=clock.matmul)
    assert probe["source"] == "measured"
    assert probe["fp32_ms"] == pytest.approx(fp32_s * 1000) and probe["bf16_ms"] == pytest.approx(bf16_s * 1000)
    assert probe["choice"] == choice
    assert clock.calls == 2 * (1 + 5)  # one warm-up and five timed products per dtype
    assert clock.shapes == {((2048, 576), (576, 1536))}  # the default shape: tokens x hidden @ hidden x ffn

    # resolve_dtype takes the probe's choice, and says so once, with the measured times
    capsys.readouterr()
    assert hardware.resolve_dtype("auto") == getattr(torch, choice)
    assert hardware.resolve_dtype("auto", "evaluate.dtype") == getattr(torch, choice)
    assert capsys.readouterr().out == (f"[dtype] auto -> {choice} (fp32 {fp32_s * 1000:.1f} ms, "
                                       f"bf16 {bf16_s * 1000:.1f} ms, probe on this node)\n")
    assert clock.calls == 12  # nothing re-measured
    # explicit names are never probed
    assert hardware.resolve_dtype("float32") == torch.float32
    assert hardware.resolve_dtype("bfloat16") == torch.bfloat16


@pytest.mark.parametrize("bf16_s, runs", [
    (2.820, 0),   # the AVX2-only EPYC, bf16 emulated (~70x): the warm-up alone is over the cut-off, no repeat
    (0.060, 5),   # 1.5x slower (a warm-up at 5x, 300 ms, under the cut-off): every repeat runs
])
def test_emulated_bf16_is_not_timed_again(probe_cache, capsys, bf16_s, runs):
    clock = Clock(0.040, bf16_s)  # fp32 40 ms: bf16 must beat 36 ms, the cut-off is 360 ms
    probe = hardware.dtype_probe(device="cpu", repeats=5, timer=clock.timer, matmul=clock.matmul)
    assert probe["choice"] == "float32" and probe["bf16_runs"] == runs
    assert clock.calls == (1 + 5) + (1 + runs)
    # the time reported is the warm-up's (5x the product here) when no product was timed after it
    assert probe["bf16_ms"] == pytest.approx(bf16_s * 1000 * (5.0 if runs == 0 else 1.0))
    hardware.resolve_dtype("auto")
    once = " in its first product" if runs == 0 else ""
    assert capsys.readouterr().out == (f"[dtype] auto -> float32 (fp32 40.0 ms, "
                                       f"bf16 {probe['bf16_ms']:.1f} ms{once}, probe on this node)\n")


def test_probe_is_cached_in_process_and_on_disk(probe_cache):
    clock = Clock(0.040, 0.020)
    first = hardware.dtype_probe(shapes=(64, 32, 48), timer=clock.timer, matmul=clock.matmul)
    assert clock.calls == 12 and clock.shapes == {((64, 32), (32, 48))}
    assert hardware.dtype_probe(shapes=(64, 32, 48), timer=clock.timer, matmul=clock.matmul) == first
    assert clock.calls == 12  # second call in the process: no measurement

    on_disk = json.loads(probe_cache.read_text())
    assert on_disk[first["key"]]["choice"] == "bfloat16"
    assert on_disk[first["key"]]["fp32_ms"] == pytest.approx(40.0)
    assert "torch " + torch.__version__ in first["key"] and f"{torch.get_num_threads()} threads" in first["key"]

    hardware.clear_probe_cache()  # a new process on the same node: the file answers
    again = hardware.dtype_probe(shapes=(64, 32, 48), timer=clock.timer, matmul=clock.matmul)
    assert clock.calls == 12
    assert again["source"] == "cache file"
    assert {k: again[k] for k in ("choice", "fp32_ms", "bf16_ms")} == {k: first[k] for k in ("choice", "fp32_ms", "bf16_ms")}

    # another shape (or thread count, torch, CPU) is another key: measured afresh
    hardware.dtype_probe(shapes=(64, 32, 96), timer=clock.timer, matmul=clock.matmul)
    assert clock.calls == 24
    assert len(json.loads(probe_cache.read_text())) == 2


def test_unreadable_cache_file_is_remeasured(probe_cache):
    probe_cache.parent.mkdir(parents=True, exist_ok=True)
    probe_cache.write_text("{not json")
    clock = Clock(0.010, 0.015)
    assert hardware.dtype_probe(shapes=(8, 8, 8), timer=clock.timer, matmul=clock.matmul)["choice"] == "float32"
    assert clock.calls == 12
    assert len(json.loads(probe_cache.read_text())) == 1


def test_real_probe_on_this_node(probe_cache):
    probe = hardware.dtype_probe(device="cpu", repeats=3)
    assert probe["source"] == "measured"
    assert probe["fp32_ms"] > 0 and probe["bf16_ms"] > 0
    assert probe["choice"] == ("bfloat16" if probe["bf16_ms"] < hardware.BF16_MARGIN * probe["fp32_ms"]
                               else "float32")
    # the ratio is rounded from the unrounded times: relative, since bf16 can be 100x fp32 (no bf16 units)
    assert probe["ratio"] == pytest.approx(probe["bf16_ms"] / probe["fp32_ms"], rel=1e-3, abs=1e-3)
    assert hardware.resolve_dtype("auto") == getattr(torch, probe["choice"])
    print(hardware.describe_probe(probe))


def test_cuda_takes_bf16_without_probing(probe_cache):
    def no_matmul(a, b):
        raise AssertionError("CUDA must not be probed")

    probe = hardware.dtype_probe(device="cuda", matmul=no_matmul)
    assert probe["choice"] == "bfloat16" and probe["source"] == "cuda" and probe["fp32_ms"] is None
    assert not probe_cache.exists()


def test_unknown_dtype_names_the_field():
    with pytest.raises(SpecError, match=r"evaluate.dtype='fp8'.*auto, float32, bfloat16"):
        hardware.resolve_dtype("fp8", "evaluate.dtype")
    with pytest.raises(ValueError, match="shapes"):
        hardware.dtype_probe(shapes=(0, 4, 4))
