"""Recalibration's settings: the RecalibrateConfig dataclass (the spec's `recalibrate:` section), its
checks, and the presets' sections. Torch-free: loading a spec reads this module, and nothing here
needs a tensor.

    cfg, data = preset("debug", steps=4)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from drope_ops.choices import check_choices
from drope_ops.data import DataConfig
from drope_ops.errors import SpecError
from workflows.config import load_tree, preset_names

Schedule = Literal["cosine", "wsd"]
ZeroStage = Literal["auto", 0, 1, 2, 3]


def zero_name(stage: int) -> str:
    """How logs, plans and benchmarks name a ZeRO stage: "ZeRO off" for 0, "ZeRO-N" otherwise."""
    return "ZeRO off" if stage == 0 else f"ZeRO-{stage}"


@dataclass
class RecalibrateConfig:
    """The spec's `recalibrate:` section: schedule, batch, DeepSpeed ZeRO and the stop rules."""

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
    """Fault injection for tests (workflows/recalibrate/faults.py): the loss of this step reads NaN."""
    inject_kill_at_step: int | None = None
    """Fault injection for tests (faults.py): the last rank SIGKILLs itself after this step, once per run name
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
        self._check_batch()
        self._check_zero(needs_zero)
        self._check_optimizer()
        self._check_run()

    def _check_batch(self) -> None:
        """Counts are positive integers and the global batch splits into workers x micro batches."""
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

    def _check_zero(self, needs_zero: bool) -> None:
        """The ZeRO stage, offload and zero_settings agree (the stage and offload have fields of their own)."""
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

    def _check_optimizer(self) -> None:
        """AdamW and its schedule: a positive lr, betas in [0, 1), a warmup shorter than the run."""
        if not self.lr > 0:
            raise SpecError(f"recalibrate.lr={self.lr} must be > 0 (paper: 1e-3 with QK-norm)")
        if not 0 <= self.warmup_steps < self.steps:
            raise SpecError(f"recalibrate.warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if not self.weight_decay >= 0 or len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SpecError(f"recalibrate.weight_decay={self.weight_decay} must be >= 0 and betas={list(self.betas)} "
                            f"two numbers in [0, 1), e.g. weight_decay: 0.1, betas: [0.9, 0.95]")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise SpecError("recalibrate.min_lr_ratio must be in [0, 1] and decay_fraction in (0, 1]")

    def _check_run(self) -> None:
        """Sizes, retries and stop rules of the run itself."""
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


def workers_for(cfg: RecalibrateConfig, slots: int) -> int:
    """num_workers: auto on a cluster with `slots` worker slots: the most workers <= slots that divide
    global_batch / micro_batch (the rest is gradient accumulation)."""
    sequences = cfg.global_batch // cfg.micro_batch
    return max(n for n in range(1, max(1, min(slots, sequences)) + 1) if sequences % n == 0)

