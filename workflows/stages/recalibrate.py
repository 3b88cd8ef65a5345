"""Stage recalibrate: train a DroPE (or any Llama-family) checkpoint at its original context length.

    drope recalibrate CKPT OUT --preset debug --run-name r1 --storage /tmp/ray-results   # alone
    # Python:
    recalibrate(RecalibrateConfig(steps=20, global_batch=8, micro_batch=2, num_workers=2),
                DataConfig(source="shakespeare"), "ckpt/", "out/", run_name="r1", storage_path="/tmp/rr")

DeepSpeed ZeRO 1/2/3 (or ZeRO off, stage 0, on CPU) inside Ray Train workers (TorchTrainer; gloo on CPU, nccl on GPU), resumable to
the exact step: every `checkpoint_every` steps each rank saves its DeepSpeed shard, the data position
and its RNG states and reports them with ray.train.report; a relaunch with the same `run_name` and
`storage_path`, or Ray's own restart after a worker dies (FailureConfig), continues from there. Each
rank writes and reads only its own shard files. The end is a safetensors checkpoint the workers write
themselves (16-bit weights gathered module by module, in the base checkpoint's dtype) with tokenizer
and sha256 manifest, straight to the output URI: no optimizer state reaches the driver
(workflows/zero_weights.py). Under ZeRO-3 no worker ever holds the whole model: it is built inside
DeepSpeed's zero.Init.

Workers are handed the input checkpoint's URI, never a path of the node that launched them: each
materializes it on its own node (stage_io.materialize, cached per node, verified by manifest).

Read top to bottom: config + presets, schedule, DeepSpeed config, the worker's named steps (build,
restore, train_step, check_guard_rails, save, probe) and their loop `train_func`, the driver's parity
check, `recalibrate` (validates everything before any worker starts), and the stage's `run`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from drope_ops.choices import check_choices
from drope_ops import storage
from drope_ops.data import DataConfig, check_source, check_token_budget, make_sampler, resolve_seq_len
from drope_ops.prefetch import Prefetcher
from drope_ops.errors import CheckpointError, DropeError, SpecError
from drope_ops.hardware import use_cpus
from drope_ops.needle_data import inputs_and_labels
from workflows import stage_io, zero_weights
from workflows.config import load_tree, preset_names
from workflows.stage import Stage

DS_TAG = "ds"  # DeepSpeed checkpoint tag inside every reported checkpoint directory
STATE_FILE = "train_state.json"  # step and metric history (rank 0); data_rank{r}.json: each rank's data position
PROBE_FILE = "probe_logits.pt"  # final in-training logits on a fixed batch (rank 0), for the parity check
PROBE_TOKENS = 256
"""Tokens a probe row keeps: every weight takes part in every token's logits, so a short probe checks the
consolidation as a whole block would (SmolLM2 at 2048 tokens: a 400 MB logits file and a 0.55 TFLOP
forward on one rank's thread, against 50 MB and 1/8 of the forward)."""

Schedule = Literal["cosine", "wsd"]
ZeroStage = Literal["auto", 0, 1, 2, 3]


def zero_name(stage: int) -> str:
    """How logs, plans and benchmarks name a ZeRO stage: "ZeRO off" for 0, "ZeRO-N" otherwise."""
    return "ZeRO off" if stage == 0 else f"ZeRO-{stage}"


class TrainingDivergedError(DropeError):
    """The loss went NaN / inf or spiked; the run stopped, its last good checkpoint kept.

    Raised in a Ray Train worker and re-raised by `recalibrate` as the same object (Ray Train hands
    the driver each worker's exception); `step` is the step whose loss tripped the guard rail."""

    def __init__(self, message: str, step: int = 0):
        super().__init__(message)
        self.step = step

    def __reduce__(self):
        return (type(self), (str(self), self.step))


@dataclass
class RecalibrateConfig:
    steps: int = 20
    """Optimizer steps in total (a resumed run counts from where it stopped)."""
    global_batch: int = 8
    """Sequences per optimizer step across all workers; accumulation makes up for fewer workers."""
    micro_batch: int = 2
    """Sequences per forward/backward on one worker."""
    num_workers: int | Literal["auto"] = 2
    """Ray Train workers (one DeepSpeed rank each; GPUs when use_gpu). auto: as many as the cluster holds
    (its GPUs, or its CPUs / cpus_per_worker), the largest count that keeps global_batch by accumulation."""
    use_gpu: bool = False
    """GPU workers (nccl, bf16) or CPU workers (gloo, fp32)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; also its torch thread count."""
    zero_stage: ZeroStage = "auto"
    """DeepSpeed ZeRO stage: 1 (optimizer states), 2 (+ gradients), 3 (+ parameters), or 0 on CPU workers:
    ZeRO off, every rank keeps all states (16 bytes a parameter) and all-reduces gradients once per
    optimizer step. auto: 0 on CPU workers (the fastest there, README "ZeRO settings on CPU"), 2 on GPUs."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO-Offload)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO-3 only)."""
    zero_settings: dict = field(default_factory=dict)
    """DeepSpeed `zero_optimization` keys set over drope's per-device defaults (see deepspeed_config),
    e.g. {"overlap_comm": false, "reduce_bucket_size": 50000000}; the stage and offload have fields."""
    lr: float = 1e-3
    """Peak learning rate (paper: 1e-3 with QK-norm, 3e-4 without)."""
    warmup_steps: int = 2
    """Linear warmup from 0 to lr over this many steps."""
    schedule: Schedule = "cosine"
    """"cosine" (to min_lr_ratio * lr) or "wsd" (warmup, stable, linear decay over decay_fraction)."""
    min_lr_ratio: float = 0.1
    """Final lr as a fraction of the peak."""
    decay_fraction: float = 0.2
    """wsd only: the last fraction of steps that decays linearly."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (paper)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (paper); none on norms and biases."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    activation_checkpointing: bool = False
    """Recompute activations in backward (transformers gradient checkpointing) to save memory."""
    checkpoint_every: int = 10
    """Save a resumable checkpoint every N steps (and always at the last step)."""
    keep_checkpoints: int | None = 2
    """Checkpoints kept in storage (None keeps all)."""
    max_failures: int = 1
    """Ray Train restarts from the last checkpoint after a worker error, up to this many times."""
    loss_spike_factor: float | None = 4.0
    """Stop when a step's loss exceeds this factor times the mean of the previous 20 (None disables)."""
    seed: int = 0
    """Seed of torch / python RNGs in every worker (data order is DataConfig.seed)."""
    stop_after_step: int | None = None
    """End the run (successfully) after this step's checkpoint; relaunching the same run_name resumes."""
    inject_nan_at_step: int | None = None
    """Fault injection for tests: the loss of this step reads NaN."""
    inject_kill_at_step: int | None = None
    """Fault injection for tests: the last rank SIGKILLs itself after this step, once per run name
    (a marker file in the node's temp dir stops the restarted worker from doing it again)."""
    metrics_every: int = 1
    """Call the metrics sink every N steps (rank 0)."""
    output_shard_mb: float = 2000.0
    """Largest safetensors shard of the final checkpoint, in MB (the writing worker holds about one)."""

    def __post_init__(self):
        self.betas = tuple(self.betas)
        check_choices(self, "recalibrate")
        needs_zero = self.use_gpu or self.offload_optimizer  # bf16 / offload: DeepSpeed partitions anyway
        if self.zero_stage == "auto":  # CPU: measured (benchmarks/zero_settings.py); GPU: not measured here
            self.zero_stage = 2 if needs_zero else 0
        positive = {"steps": self.steps, "global_batch": self.global_batch, "micro_batch": self.micro_batch,
                    "checkpoint_every": self.checkpoint_every, "metrics_every": self.metrics_every}
        if self.num_workers != "auto":
            positive["num_workers"] = self.num_workers
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise SpecError(f"recalibrate.{name}={value!r} must be a positive integer")
        if self.global_batch % self.micro_batch:
            raise SpecError(f"recalibrate.global_batch={self.global_batch} is not divisible by micro_batch="
                            f"{self.micro_batch}; pick a multiple of it")
        if self.num_workers != "auto" and self.global_batch % (self.num_workers * self.micro_batch):
            raise SpecError(f"recalibrate.global_batch={self.global_batch} is not divisible by num_workers * "
                            f"micro_batch = {self.num_workers * self.micro_batch}; pick a multiple of it")
        if not self.lr > 0:
            raise SpecError(f"recalibrate.lr={self.lr} must be > 0 (paper: 1e-3 with QK-norm)")
        if not isinstance(self.zero_settings, dict):
            raise SpecError(f"recalibrate.zero_settings={self.zero_settings!r} must be a mapping of DeepSpeed "
                            f"zero_optimization keys, e.g. {{overlap_comm: false}}")
        if owned := sorted({"stage", "offload_optimizer", "offload_param"} & set(self.zero_settings)):
            raise SpecError(f"recalibrate.zero_settings sets {owned[0]!r}; use recalibrate.zero_stage / "
                            f"offload_optimizer / offload_params instead")
        if self.zero_stage == 0 and needs_zero:
            raise SpecError(f"recalibrate.zero_stage=0 (ZeRO off) is for CPU workers without offload, where it was "
                            f"measured; with use_gpu / offload_optimizer set zero_stage: 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise SpecError("recalibrate.offload_params needs zero_stage=3; set zero_stage: 3 or drop it")
        if not 0 <= self.warmup_steps < self.steps:
            raise SpecError(f"recalibrate.warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if not self.weight_decay >= 0 or len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SpecError(f"recalibrate.weight_decay={self.weight_decay} must be >= 0 and betas={list(self.betas)} "
                            f"two numbers in [0, 1), e.g. weight_decay: 0.1, betas: [0.9, 0.95]")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise SpecError("recalibrate.min_lr_ratio must be in [0, 1] and decay_fraction in (0, 1]")
        if not self.output_shard_mb > 0:
            raise SpecError(f"recalibrate.output_shard_mb={self.output_shard_mb} must be > 0 (e.g. 2000)")
        if self.cpus_per_worker <= 0 or self.grad_clip < 0 or self.max_failures < -1:
            raise SpecError("recalibrate: cpus_per_worker must be > 0, grad_clip >= 0, max_failures >= -1")
        if self.loss_spike_factor is not None and self.loss_spike_factor <= 1:
            raise SpecError(f"recalibrate.loss_spike_factor={self.loss_spike_factor} must be > 1 or null")
        if self.stop_after_step is not None and not 0 < self.stop_after_step < self.steps:
            raise SpecError(f"recalibrate.stop_after_step={self.stop_after_step} must be in (0, steps)")

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.num_workers * self.micro_batch)


def preset_sections(name: str) -> tuple[dict, dict]:
    """The `recalibrate` and `data` sections of workflow preset `name` (workflows/presets/<name>.yaml):
    the paper's settings live there once, for the workflow and for `drope recalibrate --preset`."""
    if name not in preset_names():
        raise SpecError(f"unknown preset {name!r}; choose one of {preset_names()}")
    tree = load_tree(name)
    return dict(tree.get("recalibrate") or {}), dict(tree.get("data") or {})


def preset(name: str, **overrides) -> tuple[RecalibrateConfig, DataConfig]:
    """(RecalibrateConfig, DataConfig) of a named preset; overrides go to RecalibrateConfig."""
    train, data = preset_sections(name)
    return RecalibrateConfig(**{**train, **overrides}), DataConfig(**data)


def lr_at(cfg: RecalibrateConfig, step: int) -> float:
    """Learning rate of 0-based optimizer step `step`: linear warmup, then cosine or warmup-stable-decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = cfg.steps - max(1, round(cfg.decay_fraction * cfg.steps))
        if step < decay_start:
            return cfg.lr
        return cfg.lr - (cfg.lr - floor) * (step - decay_start + 1) / (cfg.steps - decay_start)
    progress = (step - cfg.warmup_steps + 1) / max(1, cfg.steps - cfg.warmup_steps)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


# ZeRO settings per device, within the stage the user chose (the stage trades memory, not only speed);
# recalibrate.zero_settings overrides them key by key.
# GPU: overlap_comm reduces on a side CUDA stream during backward, contiguous_gradients avoids
#   fragmentation, and 2e8-element buckets bound overlap_comm's buffers (~4.5 x bucket size) to ~1.8 GB
#   of bf16: the settings of HF's ZeRO-2 example config and Lightning's DeepSpeedStrategy (no GPU here to
#   measure them).
# CPU: DeepSpeed's defaults. benchmarks/zero_settings.py (README "Speed against the alternatives"),
#   2 gloo ranks, micro batch 2 x accumulation 2, step time against DeepSpeed's defaults: overlap_comm
#   1.015 / 0.980 (hidden 512 x 6 layers / 256 x 4), with contiguous_gradients off 0.982 / 0.962,
#   5e6 buckets 0.981 / 0.964, reduce_scatter off 0.965 / 0.978: no ZeRO-2 setting gains more than
#   ~4%, none at both shapes over another. ZeRO-1 (one reduce per step, at the accumulation boundary):
#   0.950 / 0.905, but the stage is the user's (it trades memory).
ZERO_DEFAULTS = {
    "cpu": {},
    "gpu": {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 200_000_000,
            "allgather_bucket_size": 200_000_000},
}


def deepspeed_config(cfg: RecalibrateConfig, world_size: int) -> dict:
    zero: dict = {"stage": cfg.zero_stage, **ZERO_DEFAULTS["gpu" if cfg.use_gpu else "cpu"], **cfg.zero_settings}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    return {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.global_batch // (world_size * cfg.micro_batch),
        # ZeRO off: DeepSpeed clips fp32 gradients but drops their norm, so train_step clips them itself
        "gradient_clipping": cfg.grad_clip if cfg.zero_stage else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.use_gpu},  # fp32 on CPU: exact resume, and gloo has no bf16 reduce
        "zero_allow_untested_optimizer": True,  # our client torch AdamW (no cpu_adam JIT build)
        "zero_force_ds_cpu_optimizer": False,
        "checkpoint": {"use_node_local_storage": True},  # each node writes its own part; Ray merges
        "steps_per_print": 10**9,
    }


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


def _optimizer(model, cfg: RecalibrateConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel a step over each tensor instead of a dozen passes; on CPU (one thread) it updates a
    # 12.6 M-element ZeRO partition in 6 ms against 69 ms (README "Speed against the alternatives")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, fused=True)


# ---------------------------------------------------------------------------------------------------
# The worker: one Ray Train worker = one DeepSpeed rank, in named steps.


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
    import deepspeed
    from transformers import AutoTokenizer

    if not cfg.use_gpu:
        # DeepSpeed's CPU shared-memory all-reduce is a C++ op JIT-compiled at init (30 s to minutes, and
        # recompiled whenever two processes disagree on its flags); gloo's all-reduce does the same job.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    use_cpus(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    ckpt_dir = stage_io.local_dir(checkpoint_uri)
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    ds_config = deepspeed_config(cfg, world)
    # ZeRO-3: built inside zero.Init, partitioned module by module; ZeRO-1/2: in the training dtype
    model, zero3_config = zero_weights.load_model(ckpt_dir, ds_config, zero_weights.train_dtype(cfg.use_gpu))
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # the next batch is tokenized and packed in a thread while the current step runs
    sampler = Prefetcher(make_sampler(data, tokenizer, seq_len, global_batch=cfg.global_batch, rank=rank, world=world))
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=_optimizer(model, cfg), config=ds_config)
    return Trainee(engine, optimizer, sampler, rank, world, ckpt_dir=str(ckpt_dir), tokenizer=tokenizer,
                   zero3_config=zero3_config, reduce_in_backward=reduce_in_backward(engine, cfg.zero_stage))


def reduce_in_backward(engine, zero_stage: int) -> bool:
    """ZeRO off: all-reduce the gradients while backward runs, as DDP does. DeepSpeed's stage 0 flattens
    every gradient and all-reduces them after backward has finished; torch's DDP reducer (through
    `replicate`, torchtitan's DDP: the module keeps its class's methods and its state-dict keys) sends
    25 MB buckets to gloo's thread as their gradients are ready, so the all-reduce runs under the rest of
    backward. DDP halves each rank's gradient before the sum, DeepSpeed halves the sum: with 2 ranks the
    same floats (halving is exact), so a run's weights do not depend on which of them reduced."""
    if zero_stage != 0:
        return False  # ZeRO-1/2/3 reduce their own partitions
    from torch.distributed._composable.replicate import replicate

    engine.enable_backward_allreduce = False  # the switch DeepSpeed's own pipeline engine turns off
    # the gradients are views into the buckets: no copy into and out of them, and no second copy kept
    replicate(engine.module, bucket_cap_mb=25, gradient_as_bucket_view=True)
    return True


def restore(t: Trainee, cfg: RecalibrateConfig, checkpoint) -> None:
    """Load a reported checkpoint: DeepSpeed state (weights, optimizer, step counters), this rank's
    data position and RNG states, and the metric history. This rank downloads only its own files."""
    if checkpoint is None:
        return
    names = zero_weights.checkpoint_files(checkpoint)
    tag_files = [n[len(DS_TAG) + 1:] for n in names if n.startswith(f"{DS_TAG}/")]
    if why := zero_weights.missing_rank(tag_files, t.world, cfg.zero_stage):
        raise CheckpointError(f"checkpoint {checkpoint.path} cannot resume {zero_name(cfg.zero_stage)} with {t.world} "
                              f"ranks: {why}; relaunch with the num_workers and zero_stage it was written with, or a new run_name")
    if f"data_rank{t.rank}.json" not in names:
        raise SpecError(f"checkpoint {checkpoint.path} has no data position for rank {t.rank}; relaunch with "
                        f"the num_workers it was written with, or start a new run_name")
    mine = [STATE_FILE, f"data_rank{t.rank}.json", f"rng_rank{t.rank}.pt",
            *(f"{DS_TAG}/{n}" for n in zero_weights.own_shards(t.rank, tag_files)),
            *(f"{DS_TAG}/{n}" for n in zero_weights.SHARED_FILES[cfg.zero_stage])]
    with tempfile.TemporaryDirectory(prefix=f"recal-restore-r{t.rank}-") as d:
        zero_weights.download(checkpoint, mine, d)
        t.engine.load_checkpoint(d, tag=DS_TAG, load_lr_scheduler_states=False)
        t.sampler.load_state_dict(json.loads((Path(d) / f"data_rank{t.rank}.json").read_text()))
        state = json.loads((Path(d) / STATE_FILE).read_text())
        t.start, t.history = state["step"], state["history"]
        rng = torch.load(Path(d) / f"rng_rank{t.rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["python_version"], tuple(rng["python_state"]), None))


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


def clip_gradients(module: torch.nn.Module, max_norm: float) -> float:
    """ZeRO off: clip the all-reduced gradients before the step as DeepSpeed's clip_fp32_gradients would,
    and return their global norm (DeepSpeed's get_global_grad_norm has none without ZeRO)."""
    return float(torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm or math.inf))


def check_guard_rails(cfg: RecalibrateConfig, history: list[dict], loss: float, done: int) -> None:
    """Stop on a NaN / inf or spiking loss. The loss is all-reduced, so every rank stops together; no
    checkpoint of this step is written, and Ray's retries (if any) replay from the last good one."""
    recent = [h["loss"] for h in history[-20:]]
    if not math.isfinite(loss):
        raise TrainingDivergedError(f"loss is {loss} at step {done}", step=done)
    if cfg.loss_spike_factor and len(recent) >= 5 and loss > cfg.loss_spike_factor * sum(recent) / len(recent):
        raise TrainingDivergedError(f"loss spiked to {loss:.4g} at step {done}, above {cfg.loss_spike_factor} x "
                                    f"the running mean {sum(recent) / len(recent):.4g}", step=done)


def inject_kill(cfg: RecalibrateConfig, t: Trainee, run_name: str, done: int) -> None:
    """Fault injection for tests: the last rank dies by SIGKILL after step `inject_kill_at_step`, once per
    run name (a marker in the node's temp dir stops the restarted worker from doing it again)."""
    if cfg.inject_kill_at_step != done or t.rank != t.world - 1:
        return
    marker = Path(tempfile.gettempdir()) / f"drope-injected-kill-{run_name}-{done}"
    if not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)  # a real worker death, mid-run, before any later save


def probe_logits(t: Trainee, input_ids: torch.Tensor) -> dict:
    """Logits of the model as trained on a fixed input (any will do), for the parity check after
    consolidation: up to 2 rows, their first PROBE_TOKENS tokens."""
    probe = input_ids[:2, :PROBE_TOKENS].cpu()
    t.engine.eval()
    with torch.no_grad():
        logits = t.engine(input_ids=probe.to(t.engine.device)).logits.float().cpu()
    t.engine.train()
    return {"input_ids": probe, "logits": logits}


def save(t: Trainee, done: int, metrics: dict, report: dict, probe: dict | None) -> None:
    """Write this rank's part of the step-`done` checkpoint and report it; Ray Train merges the ranks'
    parts into checkpoint_step_NNNNNN in the run's storage."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix=f"recal-r{t.rank}-") as d:
        if probe is not None and t.rank == 0:
            torch.save(probe, Path(d) / PROBE_FILE)
        t.engine.save_checkpoint(d, tag=DS_TAG)
        if t.rank != 0:  # only its own shards: rank 0 alone writes what every rank shares
            zero_weights.keep_own_shards(Path(d), DS_TAG, t.rank)
        version, state, _ = random.getstate()
        torch.save({"torch": torch.get_rng_state(), "python_version": version, "python_state": list(state)},
                   Path(d) / f"rng_rank{t.rank}.pt")
        (Path(d) / f"data_rank{t.rank}.json").write_text(json.dumps(t.sampler.state_dict()))
        if t.rank == 0:
            (Path(d) / STATE_FILE).write_text(json.dumps({"step": done, "history": t.history}))
        ray.train.report({**metrics, **report}, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_step_{done:06d}")


def finish(t: Trainee, cfg: RecalibrateConfig, output: str) -> None:
    """The last step is done: every rank takes part in gathering the 16-bit weights, rank 0 writes them
    to `output` (safetensors shards, base checkpoint dtype, manifest last)."""
    zero_weights.write_final_weights(t.engine, zero_stage=cfg.zero_stage, rank=t.rank, source_dir=t.ckpt_dir,
                                     tokenizer=t.tokenizer, output_uri=output,
                                     max_shard_bytes=int(cfg.output_shard_mb * 1e6))


def train_func(config: dict) -> None:
    """The loop of one worker: build, restore, then step, guard, log, checkpoint until the end."""
    import ray.train

    cfg = config["cfg"]
    ctx = ray.train.get_context()
    t = build(cfg, config["data"], config["checkpoint"], config["seq_len"], ctx.get_world_rank(),
              ctx.get_world_size())
    restore(t, cfg, ray.train.get_checkpoint())
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
        if cfg.inject_nan_at_step == done:  # fault injection for tests
            metrics["loss"] = float("nan")
        check_guard_rails(cfg, t.history, metrics["loss"], done)
        t.history.append(metrics)
        if t.rank == 0 and done % cfg.metrics_every == 0:
            sink.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=done)
            say_progress(metrics, done, cfg.steps)
        inject_kill(cfg, t, config["run_name"], done)
        if done % cfg.checkpoint_every == 0 or done in (cfg.steps, cfg.stop_after_step):
            save(t, done, metrics, report, probe_logits(t, input_ids) if done == cfg.steps else None)
        if done == cfg.stop_after_step:
            return
    t.sampler.close()  # no batch is made while finish saves the tokenizer
    finish(t, cfg, config["output"])  # also after a restart that restored the last step's checkpoint


# ---------------------------------------------------------------------------------------------------
# The driver side: validate, launch, check the workers' output against the training logits.


def probe_parity(checkpoint, output: str) -> float | None:
    """Max |logit difference| between the checkpoint the workers wrote at `output` and the in-training
    model on the probe batch of the final Ray Train checkpoint (None if it carries no probe). Reads only
    the probe file of that checkpoint, never its optimizer states."""
    from transformers import AutoModelForCausalLM

    import drope_ops  # noqa: F401

    if PROBE_FILE not in zero_weights.checkpoint_files(checkpoint):
        return None
    with tempfile.TemporaryDirectory(prefix="recal-probe-") as d:
        zero_weights.download(checkpoint, [PROBE_FILE], d)
        probe = torch.load(Path(d) / PROBE_FILE, weights_only=True)
    reloaded = AutoModelForCausalLM.from_pretrained(stage_io.materialize(output), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = reloaded(input_ids=probe["input_ids"]).logits
    return float((ours - probe["logits"]).abs().max())


def _storage(storage_path: str):
    """(storage_path, pyarrow filesystem or None). s3:// against a custom endpoint (moto, MinIO) needs
    an explicit S3FileSystem with endpoint_override, taken from AWS_ENDPOINT_URL(_S3)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not storage_path.startswith("s3://") or not endpoint:
        return storage_path, None
    import pyarrow.fs

    scheme = "http" if endpoint.startswith("http://") else "https"
    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[-1], scheme=scheme,
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return storage_path[len("s3://"):], fs


def _latest_checkpoint_step(path: str, filesystem, run_name: str) -> int:
    """Step of the newest checkpoint_step_NNNNNN Ray Train kept for `run_name` (0: a fresh run)."""
    import pyarrow.fs

    fs = filesystem or pyarrow.fs.LocalFileSystem()
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{path.rstrip('/')}/{run_name}", allow_not_found=True))
    except OSError:
        return 0
    steps = [int(m.group(1)) for i in infos if (m := re.fullmatch(r"checkpoint_step_(\d+)", i.base_name))]
    return max(steps, default=0)


def workers_for(cfg: RecalibrateConfig, slots: int) -> int:
    """num_workers: auto on a cluster with `slots` worker slots: the most workers <= slots that divide
    global_batch / micro_batch (the rest is gradient accumulation)."""
    sequences = cfg.global_batch // cfg.micro_batch
    return max(n for n in range(1, max(1, min(slots, sequences)) + 1) if sequences % n == 0)


def place_workers(cfg: RecalibrateConfig) -> RecalibrateConfig:
    """Resolve num_workers: auto from the cluster, and fail within a minute (one line naming the
    numbers) when the cluster cannot hold the workers, instead of waiting forever."""
    import dataclasses

    import ray

    from workflows.tasks import node_capacity, placeable, require_resources

    per_worker = {"CPU": cfg.cpus_per_worker, "GPU": 1 if cfg.use_gpu else 0}
    if cfg.num_workers == "auto":
        slots = placeable(per_worker, 10**6, node_capacity(ray))
        if slots < 1:
            require_resources("recalibrate.num_workers=auto", per_worker)
            slots = placeable(per_worker, 10**6, node_capacity(ray))
        cfg = dataclasses.replace(cfg, num_workers=workers_for(cfg, slots))
        print(f"[recalibrate] num_workers auto -> {cfg.num_workers} (cluster holds {slots}; gradient accumulation "
              f"{cfg.grad_accum})", flush=True)
    require_resources(f"recalibrate.num_workers={cfg.num_workers} x cpus_per_worker={cfg.cpus_per_worker}"
                      + (" x 1 GPU" if cfg.use_gpu else ""), per_worker, cfg.num_workers)
    return cfg


def validate(cfg: RecalibrateConfig, data: DataConfig, checkpoint: str) -> int:
    """Check the spec against the model before any worker starts; returns the block length."""
    from transformers import AutoConfig

    import drope_ops  # noqa: F401

    meta = stage_io.materialize_metadata(checkpoint)
    if not (meta / "config.json").is_file():
        raise CheckpointError(f"{checkpoint} has no config.json; give a checkpoint directory or s3:// prefix "
                              f"(fetch it first with `drope fetch`)")
    seq_len = resolve_seq_len(data, AutoConfig.from_pretrained(meta))
    check_source(data)  # a wrong data.source / data.text_field fails here, not in every Ray Train worker
    # a source too small for the schedule (with data.max_epochs forbidding more passes) fails here too
    check_token_budget(data, steps=cfg.steps, global_batch=cfg.global_batch, seq_len=seq_len)
    check_zero_settings(cfg)
    return seq_len


def check_zero_settings(cfg: RecalibrateConfig) -> None:
    """A misspelt or mistyped recalibrate.zero_settings key fails here, against DeepSpeed's own schema.
    With none set the section is drope's own defaults (checked by the tests): DeepSpeed (~2.6 s to
    import) is not loaded for nothing."""
    if not cfg.zero_settings:
        return
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**deepspeed_config(cfg, 1)["zero_optimization"])
    except ValidationError as e:
        err = e.errors()[0]
        raise SpecError(f"recalibrate.zero_settings.{'.'.join(map(str, err['loc']))}: {err['msg']}; see "
                        f"DeepSpeed's zero_optimization keys (deepspeed.ai/docs/config-json)") from None


def _worker_error(e: Exception) -> DropeError | None:
    """The DropeError a Ray Train worker raised (Ray Train hands the driver each worker's exception
    object in WorkerGroupError.worker_failures), or None."""
    for failure in getattr(e, "worker_failures", {}).values():
        if isinstance(failure, DropeError):
            return failure
    return None


def _lost_worker(e: Exception) -> bool:
    """Whether Ray Train failed because a worker's (or its controller's) process or node went away, not
    because of a bug in the loop (Ray Train wraps those in WorkerGroupError / ControllerError)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError

    lost = (ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError)
    causes = [e, getattr(e, "controller_failure", None), e.__cause__, *getattr(e, "worker_failures", {}).values()]
    return any(isinstance(c, lost) for c in causes)


def _first_line(e: Exception) -> str:
    failures = list(getattr(e, "worker_failures", {}).values())
    text = str(failures[0] if failures else e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _trainer(cfg: RecalibrateConfig, *, train_loop_config: dict, run_name: str, path: str, filesystem):
    """The TorchTrainer: sizing in ScalingConfig, resume and retention in RunConfig (same name = resume)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_func,
        train_loop_config=train_loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}),
    )


def _fit_releasing_controller(trainer):
    """trainer.fit(), then the SIGINT handler as it was. Ray Train's fit (main thread) registers a
    handler that holds its TrainController actor's handle and never removes it: the controller and its
    DatasetManager then outlive the training, polling on the box's CPUs through the whole fit and
    evaluation that follow in the same process. Restored, the last handle goes and Ray ends them."""
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or handler is None:
        return trainer.fit()  # off the main thread fit registers nothing (and nothing could be restored)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGINT, handler)


def recalibrate(cfg: RecalibrateConfig, data: DataConfig, checkpoint: str, output_dir: str, *,
                run_name: str, storage_path: str, metrics_sink=None) -> dict:
    """Train `checkpoint` (a local directory or an s3:// URI) on `data` with DeepSpeed ZeRO on Ray Train;
    the workers write the trained checkpoint to `output_dir` (a directory every worker can reach, or an
    s3:// URI), manifest last.

    Returns {"output", "steps", "final_loss", "history", "checkpoint", "probe_max_abs_diff", "start_step"}.
    Raises SpecError / CheckpointError before any worker starts, TrainingDivergedError on a NaN or a
    loss spike (the last good checkpoint stays in storage, a relaunch resumes from it).
    """
    import ray

    seq_len = validate(cfg, data, checkpoint)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    cfg = place_workers(cfg)
    path, filesystem = _storage(storage_path)
    launch = uuid.uuid4().hex
    if newest := _latest_checkpoint_step(path, filesystem, run_name):
        print(f"[recalibrate] {run_name}: checkpoint directories up to step {newest} in storage; resuming from "
              f"the newest one Ray Train registered as complete", flush=True)
    if not stage_io.is_remote(checkpoint):
        checkpoint = str(Path(checkpoint).resolve())
    output_dir = _fresh_output(output_dir)
    trainer = _trainer(cfg, train_loop_config={
        "cfg": cfg, "data": data, "seq_len": seq_len, "checkpoint": checkpoint, "output": output_dir,
        "metrics_sink": metrics_sink or NoMetrics(), "run_name": run_name, "launch": launch},
        run_name=run_name, path=path, filesystem=filesystem)
    try:
        result = _fit_releasing_controller(trainer)
    except Exception as e:
        err = _worker_error(e)
        if isinstance(err, TrainingDivergedError):
            good = (err.step - 1) // cfg.checkpoint_every * cfg.checkpoint_every
            where = f"{storage_path}/{run_name}/checkpoint_step_{good:06d}" if good else "none yet"
            raise TrainingDivergedError(f"recalibration stopped: {err}; last good checkpoint: {where}; lower "
                                        f"recalibrate.lr or raise warmup_steps, then relaunch", step=err.step) from None
        if err is not None:
            raise err from None
        if _lost_worker(e):
            raise DropeError(f"recalibration lost a Ray Train actor (its node died or was removed): {_first_line(e)}; "
                             f"`drope resume RUN_ID` continues from the last checkpoint in {storage_path}/{run_name}") from None
        raise
    if result.checkpoint is None:
        raise CheckpointError(f"run {run_name} ended without a checkpoint in {storage_path}")
    metrics = result.metrics or {}
    state = zero_weights.read_json(result.checkpoint, STATE_FILE)  # the driver reads two small files, no shard
    # a launch that found the run finished ran no step and reported no checkpoint of its own
    start_step = int(metrics["resumed_from"]) if metrics.get("launch") == launch else state["step"]
    out = {"steps": state["step"], "final_loss": state["history"][-1]["loss"], "history": state["history"],
           "checkpoint": result.checkpoint.path, "start_step": start_step}
    if state["step"] < cfg.steps:  # stopped on purpose (stop_after_step): no output yet
        return {"output": None, **out}
    if not storage.checkpoint_complete(output_dir):
        raise CheckpointError(f"run {run_name} finished but its workers' output {output_dir} is incomplete; "
                              f"relaunch with the same run_name to write it again")
    return {"output": output_dir, **out, "probe_max_abs_diff": probe_parity(result.checkpoint, output_dir)}


def _fresh_output(output_dir: str) -> str:
    """The output as workers on any node see it: an absolute local path (emptied: the workers write it
    whole, an earlier attempt's files are never read) or the s3:// URI as given."""
    if stage_io.is_remote(output_dir):
        return output_dir
    out = Path(output_dir).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return str(out)


# ---------------------------------------------------------------------------------------------------
# The stage: the workflow's face of `recalibrate`.


def run(spec, ctx) -> dict:
    # the workers write the output themselves, straight to ctx.output (local or S3), manifest last
    res = recalibrate(spec.recalibrate, spec.data, ctx.inputs["drop_rope"], ctx.output,
                      run_name=f"recalibrate-{ctx.fingerprint[:12]}",
                      storage_path=storage.join(ctx.run_uri, "ray-train"), metrics_sink=ctx.sink)
    return report_training(ctx, res)


def report_training(ctx, res: dict) -> dict:
    """Give this attempt's MLflow run the whole curve (a resumed attempt logged only the steps it ran:
    the restored ones are filled in) and a PNG of it; return the ledger's facts."""
    history = res.get("history", [])
    if res.get("start_step") and ctx.sink is not None and hasattr(ctx.sink, "fill_history"):
        ctx.sink.fill_history(history)
    _log_curve(ctx.sink, history, ("loss", "lr", "grad_norm"), "loss_curve.png")
    return {k: v for k, v in res.items() if k in ("steps", "final_loss", "tokens_seen", "start_step")}


def _log_curve(sink, history: list[dict], keys, name: str) -> None:
    """A PNG of per-step metrics, logged to the stage's MLflow run."""
    if not history or sink is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in h for h in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(*zip(*[(h.get("step", i), h[key]) for i, h in enumerate(history) if key in h]))
        ax.set_xlabel("step")
        ax.set_title(key)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / name, dpi=100)
        sink.log_artifact(str(Path(tmp) / name))
    plt.close(fig)


STAGE = Stage(name="recalibrate", run=run, sections=("recalibrate", "data"), inputs=("drop_rope",),
              logged_model="recalibrated", dataset_context="training", label="recalibrated")
