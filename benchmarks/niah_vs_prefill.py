"""NIAH cost against a bare prefill, and peak memory against length.

    .venv/bin/python benchmarks/niah_vs_prefill.py                     # both parts
    .venv/bin/python benchmarks/niah_vs_prefill.py --part time --length 4096 --max-new-tokens 12
    .venv/bin/python benchmarks/niah_vs_prefill.py --part memory --lengths 2048 4096 8192 16384

Part "time" (real SmolLM2-135M, imported from the PyPI GGUF, --dtype: auto = what the node's probe picks,
as the evaluate stage does): one NIAH sample at length L
(RULER prompt built token-exact, prefill once with the KV cache, greedy decode up to max_new_tokens)
against one bare forward of L tokens (logits of the last position only: the stricter baseline),
interleaved, medians. Goal: ratio <= 1.15.

Part "memory" (tiny debug model, fp32): the sample's own peak, each length in a fresh process: after a
warm-up sample at 1024 tokens, a thread samples the process's RSS every millisecond while the sample at L
runs; the peak above the RSS just before it is the sample's. (ru_maxrss cannot show it: building the model
and the prompt had already set a higher high-water mark, so its growth read 0.0 at every length.) Goal:
growth linear in L, no L x L tensor (16k x 16k fp32 would be 1 GiB per head).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _smollm2(tmp: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drope_ops import assets
    from drope_ops.gguf import import_gguf

    ckpt = import_gguf(assets.smollm2_gguf(), os.path.join(tmp, "smollm2"))
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(ckpt)


def time_part(length: int, max_new_tokens: int, repeats: int, dtype: torch.dtype) -> dict:
    from drope_ops.evals import niah
    from drope_ops.evals.decoding import greedy_generate

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = _smollm2(tmp, dtype)
    # The bare forward's input: a NIAH prompt of L - 1 tokens plus one more, exactly L tokens.
    prompt = niah.make_sample("niah_single_1", tok, length=length, depth=50, max_new_tokens=1).prompt_ids
    bare_ids = torch.tensor(prompt + prompt[-1:]).view(1, -1)
    prefill, sample, generated = [], [], []
    with torch.inference_mode():
        model(bare_ids[:, :256], logits_to_keep=1)  # warm-up
        for r in range(repeats):
            t = time.perf_counter()
            model(bare_ids, use_cache=False, logits_to_keep=1)
            prefill.append(time.perf_counter() - t)
            t = time.perf_counter()
            s = niah.make_sample("niah_single_1", tok, length=length, depth=50, index=r,
                                 max_new_tokens=max_new_tokens)
            new = greedy_generate(model, torch.tensor(s.prompt_ids), max_new_tokens=max_new_tokens,
                                  eos_token_id=tok.eos_token_id)
            sample.append(time.perf_counter() - t)
            generated.append(len(new))
            print(f"  repeat {r}: prefill {prefill[-1]:.2f} s, NIAH sample {sample[-1]:.2f} s "
                  f"({len(new)} tokens generated)", flush=True)
    p, s = statistics.median(prefill), statistics.median(sample)
    return {"length": length, "max_new_tokens": max_new_tokens, "prefill_s": p, "sample_s": s,
            "ratio": s / p, "generated": generated, "threads": torch.get_num_threads()}


def memory_child(length: int) -> dict:
    """One NIAH sample on the tiny DroPE model at `length`; peak RSS growth during decoding."""
    from drope_ops import debugmodel
    from drope_ops.evals import niah
    from drope_ops.evals.decoding import greedy_generate
    from drope_ops.modeling import DropeConfig, DropeForCausalLM

    base = debugmodel.debug_config().to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        base.pop(k, None)
    cfg = DropeConfig(**base, original_max_position_embeddings=2048, logit_scale_c=0.1)
    cfg._attn_implementation = "sdpa"
    model = DropeForCausalLM(cfg).eval()
    tok = debugmodel.byte_level_tokenizer()
    warm = niah.make_sample("niah_single_1", tok, length=1024, depth=50, max_new_tokens=16)
    greedy_generate(model, torch.tensor(warm.prompt_ids), max_new_tokens=16, eos_token_id=None)
    s = niah.make_sample("niah_single_1", tok, length=length, depth=50, max_new_tokens=16)
    ids = torch.tensor(s.prompt_ids)
    with RssPeak() as peak:
        greedy_generate(model, ids, max_new_tokens=16, eos_token_id=None)
    return {"length": length, "peak_growth_mib": peak.growth / 2**20, "samples": peak.samples}


class RssPeak:
    """The peak of this process's RSS above its value at entry, sampled every millisecond by a thread."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s, self.growth, self.samples = interval_s, 0, 0

    def __enter__(self):
        self._proc, self._stop = psutil.Process(), threading.Event()
        self._base = self._top = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._top = max(self._top, self._proc.memory_info().rss)
            self.samples += 1
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.growth = max(self._top, self._proc.memory_info().rss) - self._base


def memory_part(lengths: list[int]) -> list[dict]:
    rows = []
    for L in lengths:
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(L)], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  L={L}: peak growth {rows[-1]['peak_growth_mib']:.1f} MiB ({rows[-1]['samples']} RSS samples)",
              flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["time", "memory", "both"], default="both")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return
    if args.part in ("time", "both"):
        from drope_ops.hardware import resolve_dtype

        dtype = resolve_dtype(args.dtype, "--dtype")
        print(f"NIAH sample vs bare prefill, SmolLM2-135M {dtype}, L={args.length}:")
        r = time_part(args.length, args.max_new_tokens, args.repeats, dtype)
        print(f"time: prefill {r['prefill_s']:.2f} s, NIAH sample {r['sample_s']:.2f} s, "
              f"ratio {r['ratio']:.3f} (goal <= 1.15), tokens generated {r['generated']}")
    if args.part in ("memory", "both"):
        print("peak memory of one NIAH sample, tiny DroPE model (fresh process per length):")
        rows = memory_part(args.lengths)
        first = rows[0]
        for r in rows:
            print(f"memory: L={r['length']:>6}  peak growth {r['peak_growth_mib']:8.1f} MiB  "
                  f"x{r['peak_growth_mib'] / max(first['peak_growth_mib'], 1e-9):.2f} for "
                  f"x{r['length'] / first['length']:.0f} length  "
                  f"(one L x L fp32 tensor would be {r['length'] ** 2 * 4 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
