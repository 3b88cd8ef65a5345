"""Workflow spec: presets load, overrides apply, bad fields are refused naming the field and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest

from drope_ops.errors import SpecError
from workflows.pipeline import stage_names, stage_spec
from workflows.spec import load_spec, preset_names

REQUIRED_PRESETS = {"smollm-135m", "smollm-360m", "smollm-1.7b", "smollm2-135m", "llama-2-7b", "smollm2-135m-cpu",
                    "debug", "micro-repro"}


def test_every_preset_loads():
    assert REQUIRED_PRESETS <= set(preset_names())
    for name in preset_names():
        spec = load_spec(name)
        assert spec.name == name
        assert all(f > 1 for f in spec.fit_temperature.extension_factors)
        # the spec refuses target lengths not beyond the training length, in every preset
        with pytest.raises(SpecError, match=r"fit_temperature\.extension_factors.*(> 1|must exceed)"):
            load_spec(name, ["fit_temperature.extension_factors=[1, 2]"])


def test_loading_a_spec_imports_no_torch():
    """The spec's sections are plain dataclasses: `drope plan`, `status` and the driver's checks load one
    without torch, transformers, DeepSpeed or Ray (each a second or more to import)."""
    code = ("import sys; from workflows.spec import load_spec, preset_names; import workflows.pipeline; "
            "[load_spec(n) for n in preset_names()]; "
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"loading every preset imported {out.stdout.strip()}"


def test_paper_hyperparameters_in_presets():
    s = load_spec("smollm-360m")
    assert (s.recalibrate.lr, s.recalibrate.warmup_steps, s.recalibrate.global_batch) == (1e-3, 490, 512)
    assert tuple(s.recalibrate.betas) == (0.9, 0.95) and s.recalibrate.weight_decay == 0.1
    assert s.drop_rope.qk_norm == "qk" and s.drop_rope.qk_norm_scope == "full"
    assert load_spec("llama-2-7b").data.seq_len == 4096 and load_spec("llama-2-7b").recalibrate.zero_stage == 3


def test_overrides_apply_with_yaml_types():
    s = load_spec("debug", ["recalibrate.steps=7", "evaluate.extension_factors=[1, 4]", "drop_rope.qk_norm=q"])
    assert s.recalibrate.steps == 7 and s.evaluate.extension_factors == [1, 4] and s.drop_rope.qk_norm == "q"


@pytest.mark.parametrize("override, field", [
    ("recalibrate.stepz=3", "stepz"),
    ("nonsense.x=1", "nonsense"),
    ("drop_rope.qk_norm=both", "drop_rope.qk_norm"),
    ("fit_temperature.extension_factors=[1]", "fit_temperature.extension_factors"),
    ("recalibrate.lr=0", "lr"),
    ("recalibrate.steps=0", "steps"),
    ("data.heldout_docs=1", "data.heldout_docs >= 2"),
])
def test_bad_fields_name_the_field(override, field):
    with pytest.raises(SpecError) as e:
        load_spec("debug", [override])
    assert field in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(SpecError, match="unknown preset 'smollm-9b'.*debug"):
        load_spec("smollm-9b")


def test_fingerprint_sections_isolate_evaluation():
    a, b = load_spec("debug"), load_spec("debug", ["evaluate.samples_per_cell=3"])
    for stage in stage_names(a)[:-1]:
        assert stage_spec(a, stage) == stage_spec(b, stage), stage
    assert stage_spec(a, "evaluate") != stage_spec(b, "evaluate")
