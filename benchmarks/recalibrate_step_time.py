"""Step time of the recalibration path (Ray Train + DeepSpeed ZeRO-2, N CPU workers) against a bare
single-process torch loop doing the same tokens per step on the same model, measured in one run.

    .venv/bin/python benchmarks/recalibrate_step_time.py              # defaults: 2 workers, seq 256
    .venv/bin/python benchmarks/recalibrate_step_time.py --steps 40 --hidden 384 --layers 6

Prints the steady-state ratio (median step time after --skip warm-up steps; goal <= 1.10), the
share of the Ray path's steps spent waiting for data (the next batch is packed in a thread while a
step runs; goal <= 2%; --streaming tokenizes on the fly instead of slicing packed blocks) and the
start-up cost of the Ray path (wall time of recalibrate() minus its steps) separately. The bare
loop uses all the workers' threads (torch.set_num_threads(N * cpus_per_worker)), the same AdamW,
gradient accumulation and clipping, so the ratio is the price of distribution, not of fewer cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


class Quiet:
    def log_metrics(self, metrics, step):
        pass


def bare_loop(ckpt, blocks, cfg, threads: int) -> list[float]:
    """Per-step seconds of a plain torch loop: same model, optimizer, schedule and batch."""
    from transformers import AutoModelForCausalLM

    from drope_ops.training import adamw, lr_at

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    opt = adamw(model, cfg)
    times = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        batch = blocks[(step * cfg.global_batch) % (len(blocks) - cfg.global_batch):][: cfg.global_batch]
        accum = cfg.global_batch // cfg.micro_batch
        for micro in batch.split(cfg.micro_batch):
            (model(input_ids=micro, labels=micro).loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def batch_times(data, seq: int, global_batch: int, workers: int, steps: int) -> list[float]:
    """Seconds rank 0's sampler takes to make each batch when nothing makes it ahead (what a step
    would wait without the prefetch thread)."""
    from drope_ops.data import make_sampler
    from drope_ops.debugmodel import byte_level_tokenizer

    sampler = make_sampler(data, byte_level_tokenizer(), seq, global_batch=global_batch, rank=0, world=workers)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sampler.next_batch()
        times.append(time.perf_counter() - t0)
    return times


def ray_recalibrate(ckpt, data, cfg, tmp: str, tokens: int) -> tuple[list[dict], float]:
    """drope's recalibration on a fresh local Ray: (per-step metrics, wall of ray.init + recalibrate())."""
    import ray

    from workflows.recalibrate.launch import recalibrate

    t0 = time.perf_counter()
    ray.init(num_cpus=cfg.num_workers * 2, include_dashboard=False, address="local", log_to_driver=False)
    result = recalibrate(cfg, data, ckpt, f"{tmp}/out", run_name=f"bench-{int(t0)}",
                         storage_path=f"{tmp}/storage", metrics_sink=Quiet())
    wall = time.perf_counter() - t0
    ray.shutdown()
    return result["history"], wall


def shape_arguments(p: argparse.ArgumentParser, steps: int, skip: int) -> argparse.ArgumentParser:
    """The options the step-time benchmarks share: steps, warm-up left out, workers, model and batch."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--skip", type=int, default=skip, help="warm-up steps left out of the steady state")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    return p


def main() -> None:
    p = shape_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=30, skip=5)
    p.add_argument("--streaming", action="store_true", help="the Ray path tokenizes and packs while it trains")
    args = p.parse_args()

    from drope_ops.data import DataConfig, load_blocks
    from drope_ops.debugmodel import byte_level_tokenizer, make_debug_checkpoint
    from workflows.recalibrate.config import RecalibrateConfig

    tmp = tempfile.mkdtemp(prefix="bench-recal-")
    ckpt = str(make_debug_checkpoint(f"{tmp}/ckpt", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                     num_hidden_layers=args.layers, max_position_embeddings=args.seq))
    cfg = RecalibrateConfig(steps=args.steps, global_batch=args.global_batch, micro_batch=args.micro_batch,
                            num_workers=args.workers, zero_stage=2, checkpoint_every=args.steps, max_failures=0,
                            lr=1e-3, warmup_steps=2, loss_spike_factor=None)
    data = DataConfig(source="shakespeare", seq_len=args.seq, max_tokens=(args.steps + 2) * args.global_batch * args.seq)
    blocks = load_blocks(data, byte_level_tokenizer(), args.seq)
    if args.streaming:
        data = DataConfig(source="shakespeare", seq_len=args.seq, streaming=True)
    tokens = args.global_batch * args.seq
    print(f"model: hidden {args.hidden}, {args.layers} layers; {tokens} tokens / step "
          f"({args.global_batch} x {args.seq}); {args.steps} steps; ZeRO-2 on {args.workers} CPU workers; "
          f"{'streamed' if args.streaming else 'packed'} data")

    bare = bare_loop(ckpt, blocks, cfg, threads=args.workers)
    history, wall = ray_recalibrate(ckpt, data, cfg, tmp, tokens)
    ray_steps = [tokens / h["tokens_per_s"] for h in history]

    bare_med = statistics.median(bare[args.skip:])
    ray_med = statistics.median(ray_steps[args.skip:])
    waits = [h["data_wait_s"] for h in history][args.skip:]
    unhidden = batch_times(data, args.seq, args.global_batch, args.workers, args.steps)[args.skip:]
    print(f"bare torch loop      : median step {bare_med * 1e3:8.1f} ms  ({tokens / bare_med:8.0f} tokens/s)")
    print(f"Ray Train + ZeRO-2   : median step {ray_med * 1e3:8.1f} ms  ({tokens / ray_med:8.0f} tokens/s)")
    print(f"steady-state ratio (Ray+DeepSpeed / bare): {ray_med / bare_med:.3f}   (goal <= 1.10)")
    print(f"waiting for data     : median {statistics.median(waits) * 1e3:8.2f} ms a step, "
          f"{sum(waits) / sum(ray_steps[args.skip:]):.2%} of the steps' time   (goal <= 2%)")
    print(f"making the batches   : median {statistics.median(unhidden) * 1e3:8.2f} ms a step, "
          f"{sum(unhidden) / sum(ray_steps[args.skip:]):.2%} of the steps' time   (what a step would wait unprefetched)")
    print(f"start-up (ray.init included) + checkpoint + consolidation cost of the Ray path: {wall - sum(ray_steps):.1f} s "
          f"(ray.init + recalibrate() wall {wall:.1f} s, steps {sum(ray_steps):.1f} s)")


if __name__ == "__main__":
    main()
