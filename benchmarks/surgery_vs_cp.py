"""Benchmark: drop_rope on a Llama-2-7B-shaped checkpoint against `cp -r` of the same files.

    .venv/bin/python benchmarks/surgery_vs_cp.py [--workdir /tmp] [--max-shard-gb 2] [--layers 32] [--parts]

Writes a random fp16 safetensors checkpoint shaped like Llama-2-7B (32 layers, hidden 4096, ffn 11008,
32 heads, vocab 32000, ~13.5 GB in several shards) into a temporary directory, then in one run:
  1. `cp -r SRC COPY && sync`                     (the floor: read + write every byte)
  2. `drope drop-rope SRC DST && sync` as a child  (the CLI: check the config, copy the shards while
                                                 hashing them once, a shard per core; add the QK-norm shard)
  3. `drope drop-rope --link SRC DST && sync`      (the workflow stage's way: shards hard-linked, read once
                                                 to hash them)
  --before CHECKOUT: also drop-rope from another checkout (the previous commit, say), in the same rounds
  --parts: also the surgery's shard copy + hash alone (copy_shards in a child, no CLI)
in --rounds rounds whose order alternates (neither always runs on the page cache the other left),
and prints the median wall(surgery) / median wall(cp) of both (goal <= 1.5) and the surgery's peak RSS /
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
rc = main(["drop-rope", *sys.argv[1:], "--no-progress"])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
ru = resource.getrusage(resource.RUSAGE_SELF)
print(f"{rc} {t_import:.2f} {time.perf_counter() - t:.2f} {hwm * 1024} {ru.ru_utime + ru.ru_stime:.2f}")
"""


def timed_surgery(src: Path, dst: Path, *options: str, tree: str | None = None) -> dict:
    """Wall incl. sync, peak RSS bytes, CLI import s, command s and CPU s of `drope drop-rope` in a child.

    Peak RSS is the child's own VmHWM: the rusage of a forked child also counts the parent's pages
    it held before exec (the parent holds GBs right after writing the checkpoint).
    """
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", SURGERY_CHILD, str(src), str(dst), *options], stdout=subprocess.PIPE,
                          text=True, cwd=tree)  # `python -c` imports workflows from its working directory
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t
    rc, t_import, t_run, rss, cpu = (proc.stdout.strip().splitlines() or ["1 0 0 0 0"])[-1].split()
    if proc.returncode != 0 or rc != "0":
        raise SystemExit(f"drope drop-rope failed with exit code {proc.returncode or rc}")
    return dict(wall=wall, rss=int(rss), t_import=float(t_import), t_run=float(t_run), cpu=float(cpu))


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_command(argv: list[str]) -> dict:
    """Wall incl. sync and CPU seconds of a command."""
    t, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(argv, check=True)
    cpu = _children_cpu() - cpu
    subprocess.run(["sync"], check=True)
    return dict(wall=time.perf_counter() - t, cpu=cpu)


# --parts: the surgery's shard copy + hash alone, in its own process
COPY_PART = """
import sys
from pathlib import Path
from drope_ops.surgery import copy_shards, weight_files
Path(sys.argv[2]).mkdir()
copy_shards(weight_files(sys.argv[1])[0], Path(sys.argv[2]), progress=False)
"""
PARTS = {"part: copy + hash": lambda src, dst: timed_command([sys.executable, "-c", COPY_PART, str(src), str(dst)])}


RUNS = {"cp": lambda src, dst: timed_command(["cp", "-r", str(src), str(dst)]),
        "drop-rope": lambda src, dst: timed_surgery(src, dst),
        "drop-rope --link": lambda src, dst: timed_surgery(src, dst, "--link")}


def rounds(src: Path, scratch: Path, n: int, before: str | None, parts: bool) -> dict[str, list[dict]]:
    """n rounds of each of RUNS, the order reversed every other round so none always finds the page
    cache another left; each output is removed and synced before the next run."""
    todo = dict(RUNS)
    if before:
        todo["drop-rope (before)"] = lambda src, dst: timed_surgery(src, dst, tree=before)
    if parts:
        todo.update(PARTS)
    runs: dict[str, list[dict]] = {name: [] for name in todo}
    for k in range(n):
        for name in (list(todo) if k % 2 == 0 else reversed(todo)):
            dst = scratch / "out"
            runs[name].append(todo[name](src, dst))
            shutil.rmtree(dst, ignore_errors=True)
            subprocess.run(["sync"], check=True)
        print(f"  round {k + 1}: " + ", ".join(f"{name} {r[-1]['wall']:.1f} s" for name, r in runs.items()), flush=True)
    return runs


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(runs: dict[str, list[dict]], total: int, largest: int, shards: int, n: int) -> None:
    cps, t_cp = runs["cp"], median(runs["cp"], "wall")
    print(f"checkpoint: {shards} shards, {total / 1e9:.2f} GB, largest shard {largest / 1e9:.2f} GB; medians of {n} rounds")
    print(f"machine load average:    {os.getloadavg()[0]:7.1f}  on {os.cpu_count()} cores")
    print(f"{'cp -r + sync:':25}{t_cp:7.1f} s  ({total / t_cp / 1e9:.2f} GB/s, cp CPU {median(cps, 'cpu'):.1f} s)")
    surgeries = [name for name in runs if name.startswith("drop-rope")]
    for name in surgeries:
        r, t = runs[name], median(runs[name], "wall")
        print(f"{name + ' + sync:':25}{t:7.1f} s  (child: CLI import {median(r, 't_import'):.2f} s, command "
              f"{median(r, 't_run'):.1f} s, CPU {median(r, 'cpu'):.1f} s)")
        print(f"  wall ratio / cp:       {t / t_cp:7.2f}  (goal <= 1.5)")
    for name in (name for name in runs if name.startswith("part")):
        print(f"{name + ':':25}{median(runs[name], 'wall'):7.1f} s  (CPU {median(runs[name], 'cpu'):.1f} s; "
              f"/ cp {median(runs[name], 'wall') / t_cp:.2f})")
    rss = max(r["rss"] for name in surgeries for r in runs[name])
    print(f"peak RSS / largest shard:{rss / largest:7.2f}  (goal <= 1.2; peak RSS {rss / 1e9:.2f} GB)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="where the ~40 GB of scratch files go")
    ap.add_argument("--max-shard-gb", type=float, default=2.0, help="shard size of the source checkpoint")
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick try (shape stays 7B-wide)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of cp and drop-rope (order alternating); medians")
    ap.add_argument("--before", metavar="CHECKOUT", help="also time drop-rope from another checkout of drope (e.g. "
                    "`git worktree add /tmp/before HEAD~1`) in the same rounds")
    ap.add_argument("--parts", action="store_true", help="also time the surgery's shard copy + hash alone")
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
        runs = rounds(root / "src", root, a.rounds, a.before, a.parts)
        report(runs, total, largest, len(files), a.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
