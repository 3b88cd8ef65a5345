"""Benchmark: drop_rope on a Llama-2-7B-shaped checkpoint against `cp -r` of the same files.

    .venv/bin/python benchmarks/surgery_vs_cp.py [--workdir /tmp] [--max-shard-gb 2] [--layers 32]

Writes a random fp16 safetensors checkpoint shaped like Llama-2-7B (32 layers, hidden 4096, ffn 11008,
32 heads, vocab 32000, ~13.5 GB in several shards) into a temporary directory, then in one run:
  1. `cp -r SRC COPY && sync`                     (the floor: read + write every byte)
  2. `drope drop-rope SRC DST && sync` as a child  (the CLI: stream, hash source and output, add QK-norm)
in --rounds rounds whose order alternates (neither always runs on the page cache the other left),
and prints the median wall(surgery) / median wall(cp) (goal <= 1.5) and the surgery's peak RSS /
largest shard (goal <= 1.2). Needs about 2.1x the checkpoint size free on --workdir; everything is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="float16",
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                   (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, h)),
                   (f"{p}.mlp.gate_proj.weight", (f, h)), (f"{p}.mlp.up_proj.weight", (f, h)),
                   (f"{p}.mlp.down_proj.weight", (h, f)), (f"{p}.input_layernorm.weight", (h,)),
                   (f"{p}.post_attention_layernorm.weight", (h,))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_checkpoint(root: Path, cfg: dict, max_shard_bytes: int) -> list[Path]:
    """Random fp16 weights in shards of at most max_shard_bytes, with index, config and tokenizer."""
    from drope_ops.debugmodel import byte_level_tokenizer

    root.mkdir(parents=True)
    groups, current, size = [], [], 0
    for name, shape in tensor_shapes(cfg):
        n = 2 * int(torch.Size(shape).numel())
        if current and size + n > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    groups.append(current)
    weight_map, files = {}, []
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: torch.randn(shape, dtype=torch.float16) * 0.02 for name, shape in group}
        save_file(tensors, root / fname, metadata={"format": "pt"})
        del tensors
        weight_map.update({name: fname for name, _ in group})
        files.append(root / fname)
        print(f"  wrote {fname} ({(root / fname).stat().st_size / 1e9:.2f} GB)", flush=True)
    total = sum(p.stat().st_size for p in files)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                  **cfg}, indent=2))
    byte_level_tokenizer().save_pretrained(root)
    return files


SURGERY_CHILD = """
import resource, sys, time
t = time.perf_counter()
from workflows.cli import main
t_import = time.perf_counter() - t
t = time.perf_counter()
rc = main(["drop-rope", sys.argv[1], sys.argv[2], "--no-progress"])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
ru = resource.getrusage(resource.RUSAGE_SELF)
print(f"{rc} {t_import:.2f} {time.perf_counter() - t:.2f} {hwm * 1024} {ru.ru_utime + ru.ru_stime:.2f}")
"""


def timed_surgery(src: Path, dst: Path) -> dict:
    """Wall incl. sync, peak RSS bytes, CLI import s, command s and CPU s of `drope drop-rope` in a child.

    Peak RSS is the child's own VmHWM: the rusage of a forked child also counts the parent's pages
    it held before exec (the parent holds GBs right after writing the checkpoint).
    """
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", SURGERY_CHILD, str(src), str(dst)], stdout=subprocess.PIPE, text=True)
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t
    rc, t_import, t_run, rss, cpu = (proc.stdout.strip().splitlines() or ["1 0 0 0 0"])[-1].split()
    if proc.returncode != 0 or rc != "0":
        raise SystemExit(f"drope drop-rope failed with exit code {proc.returncode or rc}")
    return dict(wall=wall, rss=int(rss), t_import=float(t_import), t_run=float(t_run), cpu=float(cpu))


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_cp(src: Path, dst: Path) -> dict:
    """Wall incl. sync and CPU seconds of `cp -r`."""
    t, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    cp_cpu = _children_cpu() - cpu
    subprocess.run(["sync"], check=True)
    return dict(wall=time.perf_counter() - t, cpu=cp_cpu)


def rounds(src: Path, scratch: Path, n: int) -> tuple[list[dict], list[dict]]:
    """n rounds of cp and drop-rope, the order alternating (cp first in odd rounds) so neither always
    finds the page cache the other left; each output is removed and synced before the next run."""
    cps, surgeries = [], []
    for k in range(n):
        order = ("cp", "drope") if k % 2 == 0 else ("drope", "cp")
        for which in order:
            dst = scratch / which
            if which == "cp":
                cps.append(timed_cp(src, dst))
            else:
                surgeries.append(timed_surgery(src, dst))
            shutil.rmtree(dst)
            subprocess.run(["sync"], check=True)
        print(f"  round {k + 1}: cp {cps[-1]['wall']:.1f} s, drop-rope {surgeries[-1]['wall']:.1f} s", flush=True)
    return cps, surgeries


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="where the ~40 GB of scratch files go")
    ap.add_argument("--max-shard-gb", type=float, default=2.0, help="shard size of the source checkpoint")
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick try (shape stays 7B-wide)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of cp and drop-rope (order alternating); medians")
    a = ap.parse_args()
    cfg = {**LLAMA2_7B, "num_hidden_layers": a.layers}
    need = 2.1 * 2 * sum(torch.Size(s).numel() for _, s in tensor_shapes(cfg))
    free = shutil.disk_usage(a.workdir).free
    if free < need:
        raise SystemExit(f"--workdir {a.workdir}: {free / 1e9:.0f} GB free, the benchmark needs {need / 1e9:.0f} GB")
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="drope-bench-", dir=a.workdir))
    try:
        print(f"writing a Llama-2-7B-shaped fp16 checkpoint ({a.layers} layers) to {root}/src", flush=True)
        files = write_checkpoint(root / "src", cfg, int(a.max_shard_gb * 1e9))
        total, largest = sum(p.stat().st_size for p in files), max(p.stat().st_size for p in files)
        subprocess.run(["sync"], check=True)
        cps, surgeries = rounds(root / "src", root, a.rounds)
        t_cp, t_surgery, t_import = median(cps, "wall"), median(surgeries, "wall"), median(surgeries, "t_import")
        print(f"checkpoint: {len(files)} shards, {total / 1e9:.2f} GB, largest shard {largest / 1e9:.2f} GB; "
              f"medians of {a.rounds} rounds")
        print(f"machine load average:    {os.getloadavg()[0]:7.1f}  on {os.cpu_count()} cores")
        print(f"cp -r + sync:            {t_cp:7.1f} s  ({total / t_cp / 1e9:.2f} GB/s, cp CPU {median(cps, 'cpu'):.1f} s)")
        print(f"drope drop-rope + sync:  {t_surgery:7.1f} s  (child: CLI import {t_import:.2f} s, command "
              f"{median(surgeries, 't_run'):.1f} s, CPU {median(surgeries, 'cpu'):.1f} s)")
        print(f"wall ratio surgery / cp: {t_surgery / t_cp:7.2f}  (goal <= 1.5; without the CLI import: "
              f"{(t_surgery - t_import) / t_cp:.2f})")
        rss = max(r["rss"] for r in surgeries)
        print(f"peak RSS / largest shard:{rss / largest:7.2f}  (goal <= 1.2; peak RSS {rss / 1e9:.2f} GB)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
