"""`drope plan`'s memory numbers against DeepSpeed's own estimators, and the refusal at start."""

import contextlib
import io
import re

import pytest

from drope_ops.errors import SpecError
from workflows.cli import main
from workflows.plan import architecture, check_fits, memory, parameters, refuse_unless_fits
from workflows.spec import load_spec


def deepspeed_table(stage: int, total: int, largest: int, gpus_per_node: int, nodes: int) -> dict[str, float]:
    """DeepSpeed's printed estimate (the all_cold table): {options: per-GPU GiB}."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

            estimate_zero3_model_states_mem_needs_all_cold(total, largest, gpus_per_node, nodes)
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

            estimate_zero2_model_states_mem_needs_all_cold(total, gpus_per_node, nodes)
    rows = re.findall(r"([\d.]+)GB \|\s+([\d.]+)GB \| (.+)", out.getvalue())
    return {options.strip(): float(gpu) for _, gpu, options in rows}


@pytest.mark.parametrize("stage,gpus,options", [
    (3, 8, "offload_param=none, offload_optimizer=none, zero_init=1"),
    (3, 16, "offload_param=none, offload_optimizer=none, zero_init=1"),
    (2, 8, "offload_optimizer=none"),
])
def test_plan_model_states_are_deepspeeds_estimate(stage, gpus, options, capsys):
    spec = load_spec("llama-2-7b", [f"recalibrate.zero_stage={stage}", f"plan.gpus={gpus}"])
    a = architecture(spec)
    n, largest = spec.model.parameters, a.vocab_size * a.hidden_size  # the embedding is 7B's largest layer
    ours = memory(spec, a, gpus, 4096).model_states / 2**30
    theirs = deepspeed_table(stage, n, largest, 8, gpus // 8)[options]
    assert ours == pytest.approx(theirs, abs=0.006), (ours, theirs)
    assert abs(parameters(a) - n) / n < 0.005  # the shape gives Llama-2-7B's 6.74B parameters
    assert main(["plan", "llama-2-7b", "--set", f"recalibrate.zero_stage={stage}", "--gpus", str(gpus)]) == 0
    assert f"model states {ours * 2**30 / 1e9:.1f} GB" in capsys.readouterr().out


def test_activations_with_and_without_checkpointing_and_a_warning_when_it_cannot_fit(capsys):
    spec = load_spec("llama-2-7b")
    m = memory(spec, architecture(spec), 8, 4096)
    assert m.activations < m.activations_other / 4  # checkpointing keeps each layer's input only
    assert main(["plan", "llama-2-7b"]) == 0
    out = capsys.readouterr().out
    assert "WARNING" not in out and "of 80 GB" in out and "host RAM per node" in out and "checkpoints:" in out
    assert main(["plan", "llama-2-7b", "--gpu-memory", "16"]) == 0
    assert "WARNING: recalibrate needs ~" in capsys.readouterr().out
    # micro batch 16 without checkpointing cannot fit 80 GB either
    assert check_fits(load_spec("llama-2-7b", ["recalibrate.micro_batch=16", "recalibrate.activation_checkpointing=false"]))


def test_run_and_submit_refuse_a_spec_that_cannot_fit_unless_forced(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DROPE_HOME", str(tmp_path / "home"))
    small = ["--set", "plan.gpu_memory_gb=16"]
    assert main(["run", "llama-2-7b", *small]) == 2
    err = capsys.readouterr().err.strip()
    assert "per GPU" in err and "--force" in err and "\n" not in err
    assert not (tmp_path / "home" / "runs").exists()  # refused before any run record
    assert main(["submit", "llama-2-7b", "--address", "http://127.0.0.1:9", *small]) == 2
    assert "per GPU" in capsys.readouterr().err
    spec = load_spec("llama-2-7b", ["plan.gpu_memory_gb=16"])
    with pytest.raises(SpecError):
        refuse_unless_fits(spec, force=False)
    refuse_unless_fits(spec, force=True)  # forced: a warning, no refusal
    assert "WARNING (forced)" in capsys.readouterr().out
    assert check_fits(load_spec("debug")) is None  # CPU specs are not sized against a GPU
