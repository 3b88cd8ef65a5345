"""Recalibration on real Ray Train + DeepSpeed (gloo, CPU fp32) with the tiny debug model.

One uninterrupted ZeRO-2 reference run is shared by the exact-resume, worker-kill and two-node
comparisons: each of those must end on bit-identical weights (max abs diff 0). CPU fp32 with a
fixed world size is deterministic: same data per rank (BlockSampler position), same reduction
order (2 ranks: a + b == b + a exactly), restored optimizer / step counters from DeepSpeed.
"""

import json
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from ray import cloudpickle
from safetensors.torch import load_file

from drope_ops.data import DataConfig
from drope_ops.errors import CheckpointError, SpecError
from drope_ops.manifest import verify_manifest
from drope_ops.training import TrainingDivergedError
from workflows.recalibrate.config import RecalibrateConfig
from workflows.recalibrate.launch import recalibrate
from workflows.recalibrate.weights import consolidate

STEPS = 24
BASE = dict(steps=STEPS, global_batch=8, micro_batch=2, num_workers=2, zero_stage=2, lr=3e-3,
            warmup_steps=2, checkpoint_every=12, max_failures=0)


def data_cfg(**kw) -> DataConfig:
    return DataConfig(**{"source": "shakespeare", "seq_len": 64, "max_tokens": 60_000, **kw})


def weights(output_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(Path(output_dir).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def max_abs_diff(a_dir, b_dir) -> float:
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys(), "the two checkpoints hold different tensors"
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def texts():
    from drope_ops import assets

    return assets.shakespeare_texts()  # download once in the driver, before workers race for it


@pytest.fixture(scope="module")
def reference(ray_local, texts, debug_checkpoint, tmp_path_factory):
    """The uninterrupted ZeRO-2 run: STEPS steps, checkpoints at 12 and 24."""
    root = tmp_path_factory.mktemp("recal-ref")
    result = recalibrate(RecalibrateConfig(**BASE), data_cfg(), str(debug_checkpoint), str(root / "out"),
                         run_name="reference", storage_path=str(root / "storage"))
    return result


def test_bad_specs_are_refused_before_any_worker(debug_checkpoint, tmp_path):
    import ray

    bad = [({"global_batch": 6}, "global_batch"), ({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"),
           ({"lr": -1e-3}, "lr"), ({"zero_stage": 4}, "zero_stage")]
    for override, name in bad:
        with pytest.raises(SpecError, match=rf"recalibrate\.{name}="):
            RecalibrateConfig(**{**BASE, **override})
    was_running = ray.is_initialized()
    with pytest.raises(SpecError, match=r"data\.seq_len=256 .* original context 128"):
        recalibrate(RecalibrateConfig(**BASE), data_cfg(seq_len=256), str(debug_checkpoint),
                    str(tmp_path / "out"), run_name="never", storage_path=str(tmp_path / "s"))
    assert ray.is_initialized() == was_running, "a refused spec must not start Ray"
    assert not (tmp_path / "s").exists()


def test_zero2_loss_decreases_and_consolidated_checkpoint_matches(reference, debug_checkpoint, tmp_path):
    losses = [h["loss"] for h in reference["history"]]
    assert reference["steps"] == STEPS and len(losses) == STEPS
    assert losses[-1] < losses[0] - 1.0, f"loss did not decrease: {losses[0]:.3f} -> {losses[-1]:.3f}"
    h = reference["history"][-1]
    assert h["tokens_seen"] == STEPS * 8 * 64 and h["grad_norm"] > 0 and h["tokens_per_s"] > 0
    assert verify_manifest(reference["output"]) == []
    assert reference["probe_max_abs_diff"] == 0.0  # the reloaded checkpoint reproduces training logits

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(reference["output"])
    assert model.config.max_position_embeddings == 128
    # rank 0 wrote the final weights; today's route (zero_to_fp32 over the whole final DeepSpeed
    # checkpoint, optimizer states included) gives the same tensors, bit for bit
    consolidate(reference["checkpoint"], str(debug_checkpoint), str(tmp_path / "zero_to_fp32"))
    assert max_abs_diff(reference["output"], tmp_path / "zero_to_fp32") == 0.0


def test_a_finished_training_leaves_no_train_controller_running(reference, ray_local):
    """Ray Train's fit keeps its controller actor alive through the SIGINT handler it registers; recalibrate
    puts the handler back, so after the reference run (and every run of this module before this test) no
    controller or DatasetManager is left polling the CPUs the later stages use."""
    assert reference["steps"] == STEPS
    # the GCS actor table (the state API needs the dashboard, which this test cluster does not start)
    deadline = time.monotonic() + 30
    while True:
        alive = sorted(a["ActorClassName"] for a in ray_local._private.state.actors().values() if a["State"] != "DEAD")
        if not {"TrainController", "DatasetManager"} & set(alive) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "TrainController" not in alive and "DatasetManager" not in alive, alive


def test_zero3_drope_resumes_writes_its_weights_and_refuses_a_missing_rank_shard(
        ray_local, texts, debug_checkpoint, tmp_path):
    """ZeRO-3 on the drope model type (built under zero.Init): stop at 2, resume to 4; the workers'
    sharded output equals zero_to_fp32 of the final checkpoint; without rank 1's shard, no resume."""
    from drope_ops.surgery import drop_rope

    drope = drop_rope(debug_checkpoint, tmp_path / "drope", qk_norm="qk", progress=False)
    base = {**BASE, "zero_stage": 3, "steps": 4, "checkpoint_every": 2, "output_shard_mb": 0.1}
    storage, out = str(tmp_path / "storage"), str(tmp_path / "out")
    first = recalibrate(RecalibrateConfig(**{**base, "stop_after_step": 2}), data_cfg(), str(drope), out,
                        run_name="z3", storage_path=storage)
    assert first["output"] is None and not (tmp_path / "out").exists()
    res = recalibrate(RecalibrateConfig(**base), data_cfg(), str(drope), out, run_name="z3", storage_path=storage)
    assert res["start_step"] == 2 and res["probe_max_abs_diff"] == 0.0 and verify_manifest(out) == []
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "output_shard_mb=0.1 should give several shards"
    consolidate(res["checkpoint"], str(drope), str(tmp_path / "zero_to_fp32"))
    assert max_abs_diff(out, tmp_path / "zero_to_fp32") == 0.0

    shard = next((tmp_path / "storage" / "z3" / "checkpoint_step_000004" / "ds").glob("zero_pp_rank_1_*optim*"))
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"optim_states shard of rank 1 is missing") as e:
        recalibrate(RecalibrateConfig(**base), data_cfg(), str(drope), out, run_name="z3", storage_path=storage)
    assert "\n" not in str(e.value)


def test_zero_off_resumes_exactly_clips_like_deepspeed_and_refuses_missing_states(
        reference, debug_checkpoint, tmp_path):
    """ZeRO off (stage 0, CPU): one all-reduce per step, drope clips the gradients itself. Stop at 2 and
    resume to 4 ends on an uninterrupted run's weights bit for bit; the first steps' gradient norms and
    losses are ZeRO-2's (same weights, batches and clipping); without rank 0's states, no resume."""
    base = {**BASE, "zero_stage": 0, "steps": 4, "checkpoint_every": 2}
    storage, out = str(tmp_path / "storage"), str(tmp_path / "out")
    whole = recalibrate(RecalibrateConfig(**base), data_cfg(), str(debug_checkpoint), str(tmp_path / "whole"),
                        run_name="z0-whole", storage_path=storage)
    first = recalibrate(RecalibrateConfig(**{**base, "stop_after_step": 2}), data_cfg(), str(debug_checkpoint),
                        out, run_name="z0", storage_path=storage)
    assert first["output"] is None
    res = recalibrate(RecalibrateConfig(**base), data_cfg(), str(debug_checkpoint), out, run_name="z0",
                      storage_path=storage)
    assert res["start_step"] == 2 and res["probe_max_abs_diff"] == 0.0 and verify_manifest(out) == []
    assert max_abs_diff(out, whole["output"]) == 0.0
    norms = [h["grad_norm"] for h in whole["history"]]
    assert norms[0] > RecalibrateConfig().grad_clip, "step 1's norm should be clipped, or the loss check below shows nothing"
    for mine, zero2 in zip(whole["history"][:2], reference["history"][:2]):  # lr(step) is the same for both
        assert mine["grad_norm"] == pytest.approx(zero2["grad_norm"], rel=1e-4)
        assert mine["loss"] == pytest.approx(zero2["loss"], rel=1e-5)
    tag = tmp_path / "storage" / "z0" / "checkpoint_step_000004" / "ds"
    assert sorted(p.name for p in tag.iterdir()) == ["mp_rank_00_model_states.pt"]
    (tag / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt \(rank 0's module weights and "
                                              r"optimizer state\) is missing"):
        recalibrate(RecalibrateConfig(**base), data_cfg(), str(debug_checkpoint), out, run_name="z0",
                    storage_path=storage)
    with pytest.raises(SpecError, match=r"recalibrate\.zero_stage=0 .* CPU workers"):
        RecalibrateConfig(**{**base, "use_gpu": True})


def test_copy_and_needle_blocks_train_on_their_scored_tokens(ray_local, texts, debug_checkpoint, tmp_path):
    """The micro reproduction's data: blocks holding ~t (no-loss) entries go through the real loop
    (decoded to tokens + labels), and the parity probe replays tokens, not the encoded entries."""
    for data in (DataConfig(source="copies", copies=40, seq_len=64),
                 data_cfg(needles=0, copies=8, max_tokens=20_000)):
        res = recalibrate(RecalibrateConfig(**{**BASE, "steps": 4, "checkpoint_every": 4}), data,
                          str(debug_checkpoint), str(tmp_path / data.source / "out"), run_name=f"copies-{uuid.uuid4().hex[:6]}",
                          storage_path=str(tmp_path / data.source / "s"))
        losses = [h["loss"] for h in res["history"]]
        assert len(losses) == 4 and all(0 < x < 10 for x in losses)
        assert res["probe_max_abs_diff"] == 0.0


def test_exact_resume_after_relaunch_with_same_name(reference, tmp_path, debug_checkpoint):
    storage, out = str(tmp_path / "storage"), str(tmp_path / "out")
    first = recalibrate(RecalibrateConfig(**{**BASE, "stop_after_step": STEPS // 2}), data_cfg(),
                        str(debug_checkpoint), out, run_name="resume-me", storage_path=storage)
    assert first["output"] is None and first["steps"] == STEPS // 2 and first["start_step"] == 0
    second = recalibrate(RecalibrateConfig(**BASE), data_cfg(), str(debug_checkpoint), out,
                         run_name="resume-me", storage_path=storage)
    assert second["steps"] == STEPS and second["start_step"] == STEPS // 2
    assert [h["loss"] for h in second["history"]] == [h["loss"] for h in reference["history"]]
    assert max_abs_diff(second["output"], reference["output"]) == 0.0


def test_sigkilled_worker_restarts_from_checkpoint_and_matches(reference, tmp_path, debug_checkpoint):
    # rank 1 SIGKILLs itself after step 15 (last checkpoint: 12); Ray restarts the group from it.
    # (a fresh run name: the once-only kill marker in the temp dir is keyed by it)
    cfg = RecalibrateConfig(**{**BASE, "max_failures": 1, "inject_kill_at_step": 15})
    result = recalibrate(cfg, data_cfg(), str(debug_checkpoint), str(tmp_path / "out"),
                         run_name=f"killed-{uuid.uuid4().hex[:12]}", storage_path=str(tmp_path / "storage"))
    assert result["steps"] == STEPS
    assert max_abs_diff(result["output"], reference["output"]) == 0.0


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module


class LossFile:
    """A picklable metrics sink (the interface the workflow's MLflow sink has): appends to a file."""

    def __init__(self, path):
        self.path = str(path)

    def log_metrics(self, metrics, step):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def test_zero3_trains_then_nan_stops_naming_the_step_and_keeps_last_good_checkpoint(
        ray_local, texts, debug_checkpoint, tmp_path):
    # ZeRO-3, checkpoints at 6; the loss of step 10 reads NaN: the stage stops, step 6 stays.
    cfg = RecalibrateConfig(**{**BASE, "zero_stage": 3, "steps": 12, "checkpoint_every": 6,
                               "inject_nan_at_step": 10})
    sink = LossFile(tmp_path / "metrics.jsonl")
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 10.*checkpoint_step_000006"):
        recalibrate(cfg, data_cfg(), str(debug_checkpoint), str(tmp_path / "out"), run_name="zero3-nan",
                    storage_path=str(tmp_path / "storage"), metrics_sink=sink)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 10))  # every step from rank 0, none after NaN
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.5, f"ZeRO-3 loss did not decrease: {logged}"
    assert not (tmp_path / "out").exists()
    kept = sorted((tmp_path / "storage" / "zero3-nan").glob("checkpoint_step_*"))
    assert [p.name for p in kept] == ["checkpoint_step_000006"]
    # the kept ZeRO-3 checkpoint consolidates (zero_to_fp32) into a loadable DroPE-format checkpoint
    consolidate(str(kept[0]), str(debug_checkpoint), str(tmp_path / "step6"))
    assert verify_manifest(tmp_path / "step6") == []
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "step6").num_parameters() > 0


def test_two_nodes_with_s3_storage_completes_and_resumes(reference, s3_bucket, ray_two_nodes, debug_checkpoint,
                                                         tmp_path):
    # One worker per node: each node has 2 CPUs and each worker asks for 2.
    storage = f"s3://{s3_bucket}/ray-results"
    base = {**BASE, "cpus_per_worker": 2.0}
    first = recalibrate(RecalibrateConfig(**{**base, "stop_after_step": STEPS // 2}), data_cfg(),
                        str(debug_checkpoint), str(tmp_path / "out"), run_name="two-nodes", storage_path=storage)
    assert first["steps"] == STEPS // 2 and first["checkpoint"].startswith(f"{s3_bucket}/ray-results/two-nodes/")
    second = recalibrate(RecalibrateConfig(**base), data_cfg(), str(debug_checkpoint), str(tmp_path / "out"),
                         run_name="two-nodes", storage_path=storage)
    assert second["steps"] == STEPS
    assert max_abs_diff(second["output"], reference["output"]) == 0.0


def test_schedules_presets_and_cli_spec_building(tmp_path):
    from workflows.commands.recalibrate import build_configs
    from workflows.spec import preset_names
    from drope_ops.training import lr_at
    from workflows.recalibrate.config import preset, preset_sections

    cos = RecalibrateConfig(**{**BASE, "steps": 10, "warmup_steps": 2, "lr": 1.0, "min_lr_ratio": 0.1})
    assert [lr_at(cos, s) for s in (0, 1)] == [0.5, 1.0] and lr_at(cos, 9) == pytest.approx(0.1)
    wsd = RecalibrateConfig(**{**BASE, "steps": 10, "warmup_steps": 2, "lr": 1.0, "schedule": "wsd",
                               "decay_fraction": 0.2, "min_lr_ratio": 0.0})
    assert [lr_at(wsd, s) for s in range(2, 10)] == [1.0] * 6 + [0.5, 0.0]
    seqs = {name: preset_sections(name)[1].get("seq_len") for name in preset_names()}
    assert seqs["llama-2-7b"] == 4096 and seqs["smollm-360m"] == 2048 and seqs["smollm2-135m-cpu"] == 2048
    train, _ = preset("smollm-360m")
    assert (train.lr, train.betas, train.weight_decay, train.global_batch) == (1e-3, (0.9, 0.95), 0.1, 512)
    (tmp_path / "r.yaml").write_text("recalibrate: {steps: 7}\ndata: {seq_len: 32}\n")
    cfg, data = build_configs("debug", str(tmp_path / "r.yaml"), ["recalibrate.zero_stage=3"])
    assert (cfg.steps, cfg.zero_stage, data.seq_len, data.source) == (7, 3, 32, "shakespeare")
    with pytest.raises(SpecError, match=r"recalibrate\.global_batch=3"):
        build_configs("debug", None, ["recalibrate.global_batch=3"])


def test_a_request_the_cluster_cannot_place_fails_in_one_line(ray_two_nodes, monkeypatch):
    """GPUs on a CPU cluster, or more workers than CPUs: one line naming the numbers, never a hang."""
    from workflows.tasks import require_resources, run_units

    monkeypatch.setenv("DROPE_RESOURCE_WAIT_S", "1")
    with pytest.raises(SpecError, match=r"evaluate.gpus_per_unit: needs 1 x \(CPU 1, GPU 1\)"):
        run_units(len, [("x",)], cpus=1, gpus=1, what="evaluate.gpus_per_unit")
    with pytest.raises(SpecError, match=r"needs 64 x \(CPU 1\).*CPU 4"):
        require_resources("recalibrate.num_workers=64", {"CPU": 1}, 64, wait_s=1)
