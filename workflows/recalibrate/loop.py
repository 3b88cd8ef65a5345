"""The recalibration worker: one Ray Train worker = one DeepSpeed rank, as torchtitan's train.py has it:
the train state (`Trainee`, made by `build`), `forward_backward` of one micro batch, `train_step` of
one optimizer step, and `train_func`, the loop Ray Train runs (restore, step, guard, log, checkpoint,
then the final weights). The math is drope_ops/training.py; DeepSpeed is engine.py; saving and
restoring is checkpoint.py; the weights in and out are weights.py.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field

import torch

from drope_ops.data import DataConfig, make_sampler
from drope_ops.hardware import use_cpus
from drope_ops.needle_data import inputs_and_labels
from drope_ops.prefetch import Prefetcher
from drope_ops.training import check_guard_rails, clip_gradients, lr_at
from workflows import stage_io
from workflows.recalibrate import checkpoint, engine, faults, weights
from workflows.recalibrate.config import RecalibrateConfig


@dataclass
class Trainee:
    """What one worker trains: the DeepSpeed engine, its optimizer and this rank's data stream."""

    engine: object
    optimizer: torch.optim.Optimizer
    sampler: object
    rank: int
    world: int
    start: int = 0
    """The first step this launch runs (0, or the step of the restored checkpoint)."""
    history: list = field(default_factory=list)
    """Every finished step's metrics, restored ones included."""
    ckpt_dir: str = ""
    """The input checkpoint on this node (config and tokenizer of the final output)."""
    tokenizer: object = None
    zero3_config: object = None
    """ZeRO-3: transformers' HfDeepSpeedConfig, held for as long as the model lives (weak reference there)."""
    reduce_in_backward: bool = False
    """ZeRO off: torch's DDP reducer, not DeepSpeed, all-reduces the gradients (reduce_in_backward)."""


def build(cfg: RecalibrateConfig, data: DataConfig, checkpoint_uri: str, seq_len: int, rank: int,
          world: int) -> Trainee:
    """Materialize the checkpoint on this node, load it, and wrap it in a DeepSpeed engine (the process
    group of `world` ranks exists already: Ray Train's, or the caller's)."""
    from transformers import AutoTokenizer

    use_cpus(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    ckpt_dir = stage_io.local_dir(checkpoint_uri)
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    ds_config = engine.deepspeed_config(cfg, world)
    # ZeRO-3: built inside zero.Init, partitioned module by module; ZeRO-1/2: in the training dtype
    model, zero3_config = weights.load_model(ckpt_dir, ds_config, weights.train_dtype(cfg.use_gpu))
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # the next batch is tokenized and packed in a thread while the current step runs
    sampler = Prefetcher(make_sampler(data, tokenizer, seq_len, global_batch=cfg.global_batch, rank=rank, world=world))
    ds_engine, optimizer, reduce_in_backward = engine.initialize(model, cfg, ds_config)
    return Trainee(ds_engine, optimizer, sampler, rank, world, ckpt_dir=str(ckpt_dir), tokenizer=tokenizer,
                   zero3_config=zero3_config, reduce_in_backward=reduce_in_backward)


def train_step(t: Trainee, cfg: RecalibrateConfig, step: int, tokens_per_step: int) -> tuple[dict, torch.Tensor]:
    """One optimizer step (0-based `step`) over grad_accum micro batches. Returns its metrics, the loss
    averaged over all ranks, and the last micro batch's input ids (the parity probe's input)."""
    t0 = time.perf_counter()
    for group in t.optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    loss_sum = torch.zeros((), device=t.engine.device)
    t_data = time.perf_counter()
    batch = t.sampler.next_batch()  # (global_batch / world, seq_len)
    data_wait_s = time.perf_counter() - t_data  # ~0 while the prefetch thread keeps up
    batch = batch.to(t.engine.device)
    grad_norm = None
    for micro in batch.split(cfg.micro_batch):  # (micro_batch, seq_len), grad_accum of them
        boundary = t.engine.is_gradient_accumulation_boundary()
        input_ids, loss = forward_backward(t, micro, boundary)
        if cfg.zero_stage == 0 and boundary:
            grad_norm = clip_gradients(t.engine.module, cfg.grad_clip)
        t.engine.step()  # DeepSpeed applies the update at the accumulation boundary only
        loss_sum += loss.detach()
    loss = loss_sum / cfg.grad_accum
    # gloo has no AVG: sum, then divide
    torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.SUM)
    done = step + 1
    metrics = {"loss": loss.item() / t.world, "lr": lr_at(cfg, step),
               "grad_norm": grad_norm if grad_norm is not None else float(t.engine.get_global_grad_norm() or 0.0),
               "tokens_per_s": tokens_per_step / (time.perf_counter() - t0),
               "tokens_seen": float(done * tokens_per_step), "epoch": float(getattr(t.sampler, "epoch", 0)),
               "data_wait_s": data_wait_s, "step": done}
    return metrics, input_ids


def forward_backward(t: Trainee, micro: torch.Tensor, boundary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's loss and gradients (accumulated into the parameters' .grad). ZeRO off / 1 reduce
    the gradients at the accumulation boundary only; ZeRO off's reducer is told before the forward."""
    if t.reduce_in_backward:
        t.engine.module.set_requires_gradient_sync(boundary)
    input_ids, labels = inputs_and_labels(micro)  # copy / needle blocks score only some tokens
    loss = t.engine(input_ids=input_ids, labels=labels).loss
    t.engine.backward(loss)
    return input_ids, loss


class NoMetrics:
    """Default metrics sink: the progress line rank 0 prints is all there is."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


def say_progress(metrics: dict[str, float], done: int, steps: int) -> None:
    """Rank 0's line per logged step. Not print(): Ray Train 2.60 tees a worker's print to its logger
    as well, so a print shows up twice on the driver."""
    sys.stdout.write(f"[recalibrate] step {done}/{steps} loss={metrics['loss']:.4f} lr={metrics['lr']:.3g} "
                     f"grad_norm={metrics['grad_norm']:.3g} tokens/s={metrics['tokens_per_s']:.0f}\n")
    sys.stdout.flush()


def train_func(config: dict) -> None:
    """The loop of one worker: build, restore, then step, guard, log, checkpoint until the end."""
    import ray.train

    cfg = config["cfg"]
    ctx = ray.train.get_context()
    t = build(cfg, config["data"], config["checkpoint"], config["seq_len"], ctx.get_world_rank(),
              ctx.get_world_size())
    checkpoint.restore(t, cfg, ray.train.get_checkpoint())
    tokens_per_step = cfg.global_batch * config["seq_len"]
    # where this launch went on from, for the driver: the newest checkpoint directory in storage can
    # be one a killed launch was still writing
    report = {"launch": config["launch"], "resumed_from": t.start}
    try:
        _train_steps(t, cfg, config, tokens_per_step, report)
    finally:
        t.sampler.close()  # the prefetch thread


def _train_steps(t: Trainee, cfg: RecalibrateConfig, config: dict, tokens_per_step: int, report: dict) -> None:
    """Step, guard, log and checkpoint from t.start to the end (or stop_after_step), then finish."""
    sink = config["metrics_sink"]
    for step in range(t.start, cfg.steps):
        done = step + 1
        metrics, input_ids = train_step(t, cfg, step, tokens_per_step)
        faults.after_step(cfg, metrics, rank=t.rank, world=t.world, run_name=config["run_name"])
        check_guard_rails(cfg, t.history, metrics["loss"], done)
        t.history.append(metrics)
        if t.rank == 0 and done % cfg.metrics_every == 0:
            sink.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=done)
            say_progress(metrics, done, cfg.steps)
        if done % cfg.checkpoint_every == 0 or done in (cfg.steps, cfg.stop_after_step):
            probe = checkpoint.probe_logits(t, input_ids) if done == cfg.steps else None
            checkpoint.save(t, done, metrics, report, probe)
        if done == cfg.stop_after_step:
            return
    t.sampler.close()  # no batch is made while finish saves the tokenizer
    weights.write_final(t, cfg, config["output"])  # also after a restart that restored the last step's checkpoint
