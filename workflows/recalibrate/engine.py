"""DeepSpeed for recalibration: the config it is handed (ZeRO stage, per-device defaults, the user's
zero_settings), the pre-flight check of those settings against DeepSpeed's schema, and the engine
around the model with the gradient reduce ZeRO off uses.
"""

from __future__ import annotations

from drope_ops.errors import SpecError
from drope_ops.training import adamw
from workflows.recalibrate.config import RecalibrateConfig


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


def initialize(model, cfg: RecalibrateConfig, ds_config: dict):
    """(engine, optimizer, reduce_in_backward): `model` wrapped in a DeepSpeed engine with drope's AdamW,
    the process group existing already (Ray Train's, or the caller's)."""
    import deepspeed

    if not cfg.use_gpu:
        # DeepSpeed's CPU shared-memory all-reduce is a C++ op JIT-compiled at init (30 s to minutes, and
        # recompiled whenever two processes disagree on its flags); gloo's all-reduce does the same job.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=adamw(model, cfg), config=ds_config)
    return engine, optimizer, reduce_in_backward(engine, cfg.zero_stage)


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

