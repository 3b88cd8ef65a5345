"""Recalibration (and the micro reproduction's pretraining): DeepSpeed ZeRO inside Ray Train workers.

    config.py      RecalibrateConfig (torch-free: the spec loads it), presets, worker sizing
    launch.py      the driver: pre-flight checks, placement, TorchTrainer, errors, parity check
    loop.py        the worker: train state, forward_backward, train_step, train_func
    engine.py      DeepSpeed: its config, the engine, ZeRO off's gradient reduce
    checkpoint.py  save / restore to the step, each rank its own shard files; the parity probe
    weights.py     zero.Init load, the final 16-bit write, the older zero_to_fp32 route
    faults.py      test-only NaN / kill injection behind one hook
    report.py      the loss curve on the stage's MLflow run

The stage itself is workflows/stages/recalibrate.py; the math is drope_ops/training.py. This file
imports nothing, so `workflows.recalibrate.config` loads without torch.
"""
