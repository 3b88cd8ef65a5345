"""The DeepSpeed config recalibrate hands every worker: stage, per-device ZeRO settings, batch arithmetic,
checked against DeepSpeed's own zero_optimization schema (which forbids unknown keys)."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from drope_ops.errors import SpecError
from drope_ops.training import adamw
from workflows.recalibrate.config import RecalibrateConfig
from workflows.recalibrate.engine import ZERO_DEFAULTS, check_zero_settings, deepspeed_config

REPO = Path(__file__).resolve().parents[2]
GPU_ZERO = {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 200_000_000,
            "allgather_bucket_size": 200_000_000}


@pytest.mark.parametrize("use_gpu", [False, True])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_and_device_settings(use_gpu, stage):
    ds = deepspeed_config(RecalibrateConfig(zero_stage=stage, use_gpu=use_gpu), world_size=2)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage, "the user's ZeRO stage must reach DeepSpeed unchanged"
    # written out here, not read from ZERO_DEFAULTS: the test holds the settings README and the
    # benchmarks measured (GPU: HF's / Lightning's; CPU: DeepSpeed's own defaults, no key set)
    device = GPU_ZERO if use_gpu else {}
    assert {k: v for k, v in zero.items() if k != "stage"} == device, "the per-device ZeRO settings differ"
    assert ZERO_DEFAULTS == {"cpu": {}, "gpu": GPU_ZERO}
    assert ds["bf16"]["enabled"] is use_gpu, "bf16 on GPU only (gloo has no bf16 reduce, fp32 resumes exactly)"
    parsed = DeepSpeedZeroConfig(**zero)  # raises on a key DeepSpeed does not know
    # GPU: overlap_comm on at every stage; CPU: DeepSpeed's default, on for ZeRO-3 only
    assert parsed.stage == stage and parsed.overlap_comm is (use_gpu or stage == 3)
    assert parsed.reduce_bucket_size == (200_000_000 if use_gpu else 500_000_000)


def test_zero_off_on_cpu_clips_in_drope_not_deepspeed():
    # DeepSpeed without ZeRO clips fp32 gradients but keeps no norm: train_step clips them and logs it
    ds = deepspeed_config(RecalibrateConfig(zero_stage=0, grad_clip=0.5), world_size=2)
    assert ds["zero_optimization"]["stage"] == 0 and ds["gradient_clipping"] == 0.0
    assert deepspeed_config(RecalibrateConfig(zero_stage=1, grad_clip=0.5), 2)["gradient_clipping"] == 0.5
    assert RecalibrateConfig(offload_optimizer=True).zero_stage == 2  # auto: offload needs ZeRO
    for bad in ({"use_gpu": True}, {"offload_optimizer": True}):
        with pytest.raises(SpecError, match=r"recalibrate\.zero_stage=0 \(ZeRO off\) is for CPU workers"):
            RecalibrateConfig(zero_stage=0, **bad)


def test_device_defaults():
    cpu = deepspeed_config(RecalibrateConfig(use_gpu=False), 2)["zero_optimization"]
    gpu = deepspeed_config(RecalibrateConfig(use_gpu=True), 2)["zero_optimization"]
    # CPU keeps DeepSpeed's defaults (benchmarks/zero_settings.py: overlap_comm no faster on gloo)
    assert DeepSpeedZeroConfig(**cpu).overlap_comm is False
    assert gpu["overlap_comm"] is True and gpu["contiguous_gradients"] is True
    assert gpu["reduce_bucket_size"] <= 2e8, "overlap_comm holds ~4.5 x the bucket: keep it bounded on GPU"


@pytest.mark.parametrize("world,global_batch,micro_batch,accum", [(1, 8, 2, 4), (2, 8, 2, 2), (2, 8, 4, 1),
                                                                  (4, 32, 2, 4), (3, 12, 1, 4)])
def test_batch_arithmetic(world, global_batch, micro_batch, accum):
    cfg = RecalibrateConfig(num_workers=world, global_batch=global_batch, micro_batch=micro_batch)
    ds = deepspeed_config(cfg, world_size=world)
    assert ds["gradient_accumulation_steps"] == accum == cfg.grad_accum
    # DeepSpeed refuses a config where these disagree
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * accum * world == global_batch


def test_fewer_ranks_than_workers_accumulate_more():
    # a single rank (the zero_weights test, a 1-rank restart) keeps the global batch by accumulation
    ds = deepspeed_config(RecalibrateConfig(num_workers=2, global_batch=8, micro_batch=2), world_size=1)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 8


def test_user_zero_settings_win_over_device_defaults():
    for use_gpu in (False, True):
        cfg = RecalibrateConfig(use_gpu=use_gpu, zero_settings={"overlap_comm": False, "reduce_bucket_size": 10**7})
        zero = deepspeed_config(cfg, 2)["zero_optimization"]
        assert zero["overlap_comm"] is False and zero["reduce_bucket_size"] == 10**7
        assert zero["stage"] == (2 if use_gpu else 0), "zero_stage auto: ZeRO off on CPU, ZeRO-2 on GPUs"


def test_offload_with_its_fields():
    zero = deepspeed_config(RecalibrateConfig(zero_stage=3, offload_optimizer=True, offload_params=True), 2)[
        "zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False} == zero["offload_param"]
    DeepSpeedZeroConfig(**zero)


@pytest.mark.parametrize("settings,field", [({"stage": 3}, "stage"), ({"offload_param": {"device": "cpu"}},
                                                                      "offload_param")])
def test_zero_settings_cannot_change_stage_or_offload(settings, field):
    with pytest.raises(SpecError, match=f"zero_settings sets '{field}'"):
        RecalibrateConfig(zero_settings=settings)


def test_zero_settings_not_a_mapping():
    with pytest.raises(SpecError, match="recalibrate.zero_settings=.*must be a mapping"):
        RecalibrateConfig(zero_settings=["overlap_comm"])


@pytest.mark.parametrize("settings,key", [({"overlap_com": True}, "overlap_com"),
                                          ({"reduce_bucket_size": "big"}, "reduce_bucket_size")])
def test_misspelt_or_mistyped_zero_settings_named(settings, key):
    with pytest.raises(SpecError, match=f"recalibrate.zero_settings.{key}"):
        check_zero_settings(RecalibrateConfig(zero_settings=settings))


def test_no_zero_settings_checked_without_loading_deepspeed():
    """Nothing set: the section is drope's defaults, which test_stage_and_device_settings holds to DeepSpeed's
    schema, so the pre-flight check does not import DeepSpeed (~2.6 s in the stage process)."""
    code = ("import sys; from workflows.recalibrate.config import RecalibrateConfig; from workflows.recalibrate.engine import check_zero_settings; "
            "check_zero_settings(RecalibrateConfig()); print('loaded', 'deepspeed' in sys.modules); "
            "check_zero_settings(RecalibrateConfig(zero_settings={'overlap_comm': True})); "
            "print('loaded', 'deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    loaded = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("loaded ")]
    assert loaded == ["False", "True"], out.stdout + out.stderr[-2000:]


def test_fused_optimizer_moves_weights_as_reference_adamw():
    """drope's AdamW runs fused (one kernel a step); its steps must match torch's reference AdamW with the
    same groups: weight decay on matrices, none on norms and biases."""
    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    theirs_model = copy.deepcopy(ours_model)
    cfg = RecalibrateConfig(lr=1e-2, weight_decay=0.1)
    ours = adamw(ours_model, cfg)
    assert ours.defaults["fused"] is True, "recalibrate's AdamW should take the fused path"
    params = list(theirs_model.parameters())
    theirs = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                               lr=1e-2, betas=cfg.betas, eps=1e-8, foreach=False)
    for _ in range(5):
        x = torch.randn(8, 16)
        for model, opt in ((ours_model, ours), (theirs_model, theirs)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
