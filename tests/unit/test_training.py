"""drope_ops/training.py alone, no DeepSpeed: the lr schedule, AdamW's groups, ZeRO off's clipping and
the guard rails that stop a diverging run."""

import math

import pytest
import torch

from drope_ops.training import TrainingDivergedError, adamw, check_guard_rails, clip_gradients, lr_at
from workflows.recalibrate.config import RecalibrateConfig


def test_cosine_warms_up_linearly_then_ends_at_the_floor():
    cfg = RecalibrateConfig(steps=10, warmup_steps=4, lr=2.0, min_lr_ratio=0.25, schedule="cosine")
    assert [lr_at(cfg, s) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    # halfway through the cosine (3 of 6 decay steps) the lr is the mean of peak and floor
    assert lr_at(cfg, 6) == pytest.approx((2.0 + 0.5) / 2)
    assert lr_at(cfg, 9) == pytest.approx(0.5)
    lrs = [lr_at(cfg, s) for s in range(4, 10)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])), f"cosine must fall monotonically: {lrs}"


def test_wsd_holds_the_peak_then_decays_linearly():
    cfg = RecalibrateConfig(steps=20, warmup_steps=0, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.25)
    assert [lr_at(cfg, s) for s in range(15)] == [1.0] * 15
    assert [lr_at(cfg, s) for s in range(15, 20)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])


def test_adamw_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model[1].weight.requires_grad_(False)  # frozen parameters take no part
    opt = adamw(model, RecalibrateConfig(lr=3e-4, weight_decay=0.1, betas=(0.8, 0.9)))
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [(3, 4)] and decay["weight_decay"] == 0.1
    assert sorted(tuple(p.shape) for p in no_decay["params"]) == [(3,), (3,)] and no_decay["weight_decay"] == 0.0
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["betas"] == (0.8, 0.9)


def test_clip_gradients_returns_the_norm_before_clipping():
    layer = torch.nn.Linear(2, 1, bias=False)
    layer.weight.grad = torch.tensor([[3.0, 4.0]])
    assert clip_gradients(layer, 1.0) == pytest.approx(5.0)
    assert layer.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    layer.weight.grad = torch.tensor([[3.0, 4.0]])
    assert clip_gradients(layer, 0.0) == pytest.approx(5.0)  # 0 disables clipping
    assert layer.weight.grad.tolist() == [[3.0, 4.0]]


def test_guard_rails_stop_on_nan_and_on_a_spike_only():
    cfg = RecalibrateConfig(loss_spike_factor=4.0)
    history = [{"loss": 2.0}] * 5
    check_guard_rails(cfg, history, 7.9, 6)  # under 4 x the mean: goes on
    with pytest.raises(TrainingDivergedError, match="loss spiked to 8.1 at step 6") as spike:
        check_guard_rails(cfg, history, 8.1, 6)
    assert spike.value.step == 6
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 3"):
        check_guard_rails(cfg, [], math.nan, 3)
    check_guard_rails(cfg, history[:4], 100.0, 5)  # fewer than 5 steps: no running mean yet
    check_guard_rails(RecalibrateConfig(loss_spike_factor=None), history, 100.0, 6)


def test_diverged_error_crosses_a_pickle_with_its_step():
    import pickle

    err = pickle.loads(pickle.dumps(TrainingDivergedError("loss is nan at step 3", step=3)))
    assert (str(err), err.step) == ("loss is nan at step 3", 3)
