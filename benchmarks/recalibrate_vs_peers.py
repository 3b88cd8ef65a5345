"""drope's recalibration against the alternatives a user would pick instead, same model and tokens, one run.

    .venv/bin/python benchmarks/recalibrate_vs_peers.py --zero-stage 2 1                    # debug shape, ~2.5 min
    .venv/bin/python benchmarks/recalibrate_vs_peers.py --hidden 512 --layers 6 --seq 512 --zero-stage 0 1 2  # ~14 min

Four ways to run the same training (model, tokens per step, micro batch, accumulation, AdamW, clipping,
steps), each its own process(es):
  drope     recalibrate(): Ray Train + DeepSpeed (drope's deepspeed_config, each ZeRO --zero-stage; 0 = ZeRO off)
            on --workers CPU workers (gloo, 1 thread each)
  HF        transformers Trainer, the official DroPE recipe's trainer, launched with torchrun on --workers
            CPU processes. On CPU, accelerate (pinned 1.16.0) takes TrainingArguments(use_cpu=True) as
            MULTI_CPU DDP over gloo and skips the DeepSpeed set-up (it initializes DeepSpeed only when
            not on CPU), so HF here is Trainer + DDP, not Trainer + DeepSpeed; --hf-deepspeed tries it.
  DDP       a plain torchrun script: DistributedDataParallel over gloo, no_sync() on all but the last
            micro-batch of a step (one gradient all-reduce per step)
  bare      one process, --workers threads, no communication at all (recalibrate_step_time.bare_loop)
All four run twice, the second pass in reverse order (a drift of the box's load then favours no one).
Prints each one's median step time (after --skip warm-up steps of each pass), the ratios (goals: drope / HF <= 1.0,
drope / bare <= 1.10) and each one's start-up: wall time from launch to exit minus its steps (process
or Ray start, model load, and the final save: drope's checkpoint + safetensors export, HF's
save_model, DDP's save_pretrained).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from recalibrate_step_time import shape_arguments

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def bench_config(args, zero_stage: int = 2):
    from workflows.recalibrate.config import RecalibrateConfig

    return RecalibrateConfig(steps=args.steps, global_batch=args.global_batch, micro_batch=args.micro_batch,
                             num_workers=args.workers, zero_stage=zero_stage, checkpoint_every=args.steps,
                             max_failures=0, lr=1e-3, warmup_steps=1, loss_spike_factor=None)


def step_rows(blocks: torch.Tensor, cfg, step: int, rank: int, world: int) -> torch.Tensor:
    """This rank's share of step `step`'s global batch: the rows bare_loop takes, split by rank."""
    batch = blocks[(step * cfg.global_batch) % (len(blocks) - cfg.global_batch):][: cfg.global_batch]
    return batch.chunk(world)[rank]  # (global_batch / world, seq)


def ddp_worker(args) -> list[float]:
    """A plain torchrun + DDP loop: one all-reduce per optimizer step (no_sync on the other micro-batches)."""
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM

    from drope_ops.training import adamw, lr_at

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg, blocks = bench_config(args), torch.load(args.blocks)
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32)
    ddp, opt = DistributedDataParallel(model), adamw(model, cfg)
    times = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        micros = step_rows(blocks, cfg, step, rank, world).split(cfg.micro_batch)
        for i, micro in enumerate(micros):
            with ddp.no_sync() if i < len(micros) - 1 else contextlib.nullcontext():
                (ddp(input_ids=micro, labels=micro).loss / len(micros)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        model.save_pretrained(f"{args.out}.model")
    leave_group()
    return times


def hf_worker(args) -> list[float]:
    """transformers Trainer on this torchrun rank; per-step times from a callback."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from workflows.recalibrate.engine import deepspeed_config

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.last = [], None

        def on_train_begin(self, *_, **__):
            self.last = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    cfg, blocks = bench_config(args), torch.load(args.blocks)
    world = int(os.environ["WORLD_SIZE"])
    # the same rows as the others (the Trainer shuffles and shards them itself; all are seq tokens long)
    rows = torch.cat([step_rows(blocks, cfg, step, 0, 1) for step in range(cfg.steps)])
    data = [{"input_ids": row, "labels": row} for row in rows]
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32)
    # the official recipe's DeepSpeed configs leave the batch keys to the Trainer ("auto")
    auto = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    ds = {"deepspeed": {**deepspeed_config(cfg, world), **auto}} if args.hf_deepspeed else {"use_cpu": True}
    targs = TrainingArguments(
        output_dir=f"{args.out}.trainer", per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.global_batch // (world * cfg.micro_batch), max_steps=cfg.steps,
        learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine", optim="adamw_torch",
        adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1], adam_epsilon=1e-8, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip, ddp_backend="gloo", ddp_find_unused_parameters=False,  # none unused
        save_strategy="no", logging_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=cfg.seed, **ds)
    clock = StepClock()
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[clock])
    trainer.train()
    trainer.save_model(f"{args.out}.model")
    leave_group()
    return clock.times


def leave_group() -> None:
    """Every rank done before any exits (a rank leaving gloo mid-teardown aborts its peer)."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def timed(fn) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    times = fn()
    return times, time.perf_counter() - t0


def torchrun(args, role: str, ckpt: str, blocks: str, out: str) -> tuple[list[float], float]:
    """Launch `role` on --workers torchrun processes (1 thread each): (rank 0's step seconds, wall)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.workers}",
           __file__, "--role", role, "--ckpt", ckpt, "--blocks", blocks, "--out", out, *sys.argv[1:]]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with open(out) as f:
        return json.load(f), wall


def step_seconds(history: list[dict], wall: float, tokens: int) -> tuple[list[float], float]:
    """(per-step seconds, wall) of a recalibration's metrics history."""
    return [tokens / h["tokens_per_s"] for h in history], wall


def main() -> None:
    p = shape_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=6, skip=2)
    p.add_argument("--zero-stage", type=int, nargs="+", default=[2], choices=[0, 1, 2], help="one drope row each (0: ZeRO off)")
    p.add_argument("--hf-deepspeed", action="store_true", help="HF Trainer with a DeepSpeed config instead of use_cpu")
    p.add_argument("--role", choices=["hf", "ddp"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--blocks", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        torch.set_num_threads(1)
        times = (hf_worker if args.role == "hf" else ddp_worker)(args)
        if int(os.environ.get("RANK", 0)) == 0:
            with open(args.out, "w") as f:
                json.dump(times, f)
        return

    compare(args)


def compare(args) -> None:
    """Every way of training, two passes, then the table and the ratios."""
    from workflows.recalibrate.config import zero_name
    from drope_ops.data import DataConfig, load_blocks
    from drope_ops.debugmodel import byte_level_tokenizer, make_debug_checkpoint
    from recalibrate_step_time import bare_loop, ray_recalibrate

    tmp = tempfile.mkdtemp(prefix="bench-peers-")
    ckpt = str(make_debug_checkpoint(f"{tmp}/ckpt", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                     num_hidden_layers=args.layers, max_position_embeddings=args.seq))
    cfg = bench_config(args)
    data = DataConfig(source="shakespeare", seq_len=args.seq, max_tokens=(args.steps + 2) * args.global_batch * args.seq)
    blocks = load_blocks(data, byte_level_tokenizer(), args.seq)
    torch.save(blocks, f"{tmp}/blocks.pt")
    tokens = args.global_batch * args.seq
    print(f"model: hidden {args.hidden}, {args.layers} layers; {tokens} tokens / step ({args.global_batch} x "
          f"{args.seq}); micro batch {args.micro_batch} x accumulation {cfg.grad_accum} on {args.workers} CPU "
          f"ranks (1 thread each); {args.steps} steps, median after {args.skip}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    hf_name = "HF Trainer + DeepSpeed (torchrun)" if args.hf_deepspeed else "HF Trainer + DDP gloo (torchrun)"
    launch = {
        "bare (1 process)": lambda: timed(lambda: bare_loop(ckpt, blocks, cfg, threads=args.workers)),
        **{f"drope (Ray + {zero_name(z)})": lambda z=z: step_seconds(*ray_recalibrate(
            ckpt, data, bench_config(args, z), tempfile.mkdtemp(dir=tmp), tokens), tokens)
           for z in args.zero_stage},
        hf_name: lambda: torchrun(args, "hf", ckpt, f"{tmp}/blocks.pt", f"{tmp}/hf.json"),
        "torchrun + DDP (no_sync)": lambda: torchrun(args, "ddp", ckpt, f"{tmp}/blocks.pt", f"{tmp}/ddp.json"),
    }
    report(args, two_passes(launch), tokens, hf_name)


def two_passes(launch: dict) -> dict:
    """{name: [(step seconds, wall seconds from launch to exit)] per pass}; the second pass runs in reverse
    order, so a drift of the box's load does not favour one side."""
    runs = {name: [] for name in launch}
    for order in (list(launch), list(launch)[::-1]):
        for name in order:
            runs[name].append(launch[name]())
    return runs


def report(args, runs: dict, tokens: int, hf_name: str) -> None:
    from workflows.recalibrate.config import zero_name

    steady = {name: [t for times, _ in passes for t in times[args.skip:]] for name, passes in runs.items()}
    med = {name: statistics.median(t) for name, t in steady.items()}
    print("\n| run | median step | tokens / s | median step, pass 1 / pass 2 | start-up + save (mean) |\n"
          "|---|---|---|---|---|")
    for name, passes in runs.items():
        per_pass = " / ".join(f"{statistics.median(times[args.skip:]) * 1e3:.0f}" for times, _ in passes)
        startup = statistics.mean(wall - sum(times) for times, wall in passes)
        print(f"| {name} | {med[name] * 1e3:.0f} ms | {tokens / med[name]:.0f} | {per_pass} ms | {startup:.1f} s |")
    bare, hf, ddp = med["bare (1 process)"], med[hf_name], med["torchrun + DDP (no_sync)"]
    print(f"\nHF / bare: {hf / bare:.3f}   DDP / bare: {ddp / bare:.3f}")
    for z in args.zero_stage:
        drope = med[f"drope (Ray + {zero_name(z)})"]
        print(f"drope {zero_name(z)} / HF Trainer: {drope / hf:.3f} (goal <= 1.0)   / DDP: {drope / ddp:.3f}   "
              f"/ bare: {drope / bare:.3f} (goal <= 1.10)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
