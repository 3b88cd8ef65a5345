"""Step time of drope's recalibration step under ZeRO-1 / ZeRO-2 settings and ZeRO off, side by side in one run.

    .venv/bin/python benchmarks/zero_settings.py                                      # debug shape
    .venv/bin/python benchmarks/zero_settings.py --hidden 512 --layers 6 --seq 512 --steps 5

One torchrun job of --workers CPU processes (gloo, 1 thread each, as drope places its Ray Train
workers) builds drope's own DeepSpeed engine (workflows/recalibrate/loop.build, so deepspeed_config
and train_step are the ones a run uses) once per setting and times train_step. The table gives each
setting's median step time (after --skip warm-up steps), its ratio to the first row (DeepSpeed's own
defaults; paired: every step runs all settings back to back) and to a bare single-process loop (same
model, AdamW, tokens per step and accumulation, --workers threads) measured just before.

ZeRO-2 keeps only its partition of the gradients, so it reduce-scatters after every micro-batch;
ZeRO-1 keeps whole gradients and reduces once, at the accumulation boundary; ZeRO off (stage 0) too,
and each rank then steps its whole AdamW without partitions to gather back. ZeRO off is timed twice:
with DeepSpeed's own all-reduce (every gradient flattened and reduced after backward) and with
drope's (torch's DDP reducer, buckets reduced while backward runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

import torch
from recalibrate_step_time import shape_arguments

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# DeepSpeed's own defaults, written out so the rows do not move when drope's defaults do
DS_DEFAULTS = {"overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 500_000_000,
               "allgather_bucket_size": 500_000_000, "reduce_scatter": True}
ZERO_OFF_DDP = "ZeRO off, DDP's reducer during backward (drope's)"
SETTINGS = [  # (name, ZeRO stage, zero_optimization keys)
    ("ZeRO-2 DeepSpeed defaults", 2, DS_DEFAULTS),
    ("ZeRO-2 overlap_comm", 2, {**DS_DEFAULTS, "overlap_comm": True}),
    ("ZeRO-2 overlap_comm, contiguous_gradients off", 2,
     {**DS_DEFAULTS, "overlap_comm": True, "contiguous_gradients": False}),
    ("ZeRO-2 overlap_comm, buckets 5e6", 2,  # smaller than the 512 x 6 model: several reduces per backward
     {**DS_DEFAULTS, "overlap_comm": True, "reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000}),
    ("ZeRO-2 reduce_scatter off (all-reduce)", 2, {**DS_DEFAULTS, "reduce_scatter": False}),
    ("ZeRO-1 DeepSpeed defaults", 1, DS_DEFAULTS),
    ("ZeRO-1 overlap_comm", 1, {**DS_DEFAULTS, "overlap_comm": True}),
    ("ZeRO off (stage 0: client AdamW, one all-reduce a step), DeepSpeed's all-reduce after backward", 0, DS_DEFAULTS),
    (ZERO_OFF_DDP, 0, DS_DEFAULTS),
]


def bench_config(args, stage: int, zero: dict):
    from workflows.recalibrate.config import RecalibrateConfig

    return RecalibrateConfig(steps=args.steps, global_batch=args.global_batch, micro_batch=args.micro_batch,
                             num_workers=args.workers, zero_stage=stage, zero_settings=dict(zero), lr=1e-3,
                             warmup_steps=1, loss_spike_factor=None, max_failures=0)


def build_engine(name: str, cfg, data, args, rank: int, world: int):
    """drope's build; the first ZeRO off row keeps DeepSpeed's own all-reduce (drope's before it
    handed the all-reduce to DDP's reducer)."""
    from workflows.recalibrate import engine, loop

    if cfg.zero_stage != 0 or name == ZERO_OFF_DDP:
        return loop.build(cfg, data, args.ckpt, args.seq, rank, world)
    with mock.patch.object(engine, "reduce_in_backward", lambda engine, zero_stage: False):
        return loop.build(cfg, data, args.ckpt, args.seq, rank, world)


def worker(args) -> None:
    """One rank under torchrun: an engine per setting, side by side; each step runs every setting in turn,
    so a change of load on the box hits all settings alike (the ratios between rows are paired)."""
    from drope_ops.data import DataConfig
    from workflows.recalibrate.loop import train_step

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    data = DataConfig(source="shakespeare", seq_len=args.seq,
                      max_tokens=(args.steps + 4) * args.global_batch * args.seq)
    tokens = args.global_batch * args.seq
    runs = [(name, cfg, build_engine(name, cfg, data, args, rank, world))
            for name, stage, zero in SETTINGS for cfg in [bench_config(args, stage, zero)]]
    times = {name: [] for name, _, _ in runs}
    for step in range(args.steps):
        for name, cfg, t in runs:
            times[name].append(tokens / train_step(t, cfg, step, tokens)[0]["tokens_per_s"])
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(times, f)
    if args.profile:  # where a step of the first setting goes: compute against gloo collectives
        name, cfg, t = runs[0]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for step in range(args.steps, args.steps + 2):
                train_step(t, cfg, step, tokens)
        if rank == 0:
            print(f"profile of 2 steps, {name}, rank 0:", file=sys.stderr)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
    torch.distributed.destroy_process_group()


def main() -> None:
    p = shape_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=8, skip=2)
    p.add_argument("--profile", action="store_true", help="print the top ops of 2 more steps of the first setting")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from drope_ops.data import DataConfig, load_blocks
    from drope_ops.debugmodel import byte_level_tokenizer, make_debug_checkpoint
    from recalibrate_step_time import bare_loop

    tmp = tempfile.mkdtemp(prefix="bench-zero-")
    ckpt = str(make_debug_checkpoint(f"{tmp}/ckpt", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                     num_hidden_layers=args.layers, max_position_embeddings=args.seq))
    cfg = bench_config(args, 2, {})
    data = DataConfig(source="shakespeare", seq_len=args.seq, max_tokens=(args.steps + 2) * args.global_batch * args.seq)
    blocks = load_blocks(data, byte_level_tokenizer(), args.seq)
    accum = args.global_batch // (args.workers * args.micro_batch)
    print(f"model: hidden {args.hidden}, {args.layers} layers; {args.global_batch * args.seq} tokens / step "
          f"({args.global_batch} x {args.seq}); micro batch {args.micro_batch} x accumulation {accum} on "
          f"{args.workers} CPU ranks (gloo, 1 thread each); {args.steps} steps, median after {args.skip}; "
          f"load average {os.getloadavg()[0]:.2f}")
    bare = statistics.median(bare_loop(ckpt, blocks, cfg, threads=args.workers)[args.skip:])
    out = f"{tmp}/rows.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.workers}",
           __file__, "--worker", "--ckpt", ckpt, "--out", out, *sys.argv[1:]]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    with open(out) as f:
        times = json.load(f)
    med = {name: statistics.median(t[args.skip:]) for name, t in times.items()}
    first = med[SETTINGS[0][0]]
    print(f"\n| setting | median step | / {SETTINGS[0][0]} | / bare loop ({bare * 1e3:.0f} ms) |\n|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m * 1e3:.0f} ms | {m / first:.3f} | {m / bare:.3f} |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
