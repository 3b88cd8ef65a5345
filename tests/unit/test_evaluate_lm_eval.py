"""The evaluate stage with lm_eval:<task> tasks, in-process (no Ray), on a debug checkpoint that always
answers the first choice (its final norm is zero, so every choice ties and lm-eval takes the first):
each variant's row holds lm-eval's score, at C_train for the in-context task and at every length for
the long-context one, and the stage's metrics sink gets one metric per (task, variant), step = length."""

import json

import pytest

from drope_ops.errors import SpecError
from drope_ops.surgery import drop_rope
from tests.fixtures.lm_eval_tasks import expected_fraction
from workflows.stages.evaluate import EvalConfig, evaluate


@pytest.fixture(scope="module")
def first_choice_checkpoints(tmp_path_factory):
    """(base, drope) debug checkpoints whose logits are all zero: the final RMSNorm's weight is 0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drope_ops import debugmodel

    root = tmp_path_factory.mktemp("first-choice")
    src = debugmodel.make_debug_checkpoint(root / "src")
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(src).save_pretrained(root / "base")
    return root / "base", drop_rope(root / "base", root / "drope", progress=False)


class Sink:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step, model_id=""):
        self.logged += [(key, value, step) for key, value in metrics.items()]


def test_lm_eval_tasks_score_every_variant_and_reach_the_metrics_sink(first_choice_checkpoints, lm_eval_tasks,
                                                                     tmp_path):
    base, drope = first_choice_checkpoints
    cfg = EvalConfig(variants=["drope", "pi", "yarn"], tasks=["lm_eval:toy_mc", "lm_eval:toy_long"],
                     extension_factors=[2, 4], lm_eval_include_path=str(lm_eval_tasks), dtype="float32")
    sink = Sink()
    res = evaluate(cfg, drope_checkpoint=str(drope), base_checkpoint=str(base), output_dir=str(tmp_path), metrics_sink=sink)
    cells = {(r["variant"], r["task"], r["length"]): r["score"] for r in res["results"]}
    first = expected_fraction("A")  # 2/8: the documents whose gold is the first choice
    assert cells == {(v, t, n): pytest.approx(first) for v in ("drope", "pi", "yarn")
                     for t, n in [("lm_eval_toy_mc", 128), ("lm_eval_toy_long", 256), ("lm_eval_toy_long", 512)]}
    logged = {(key.replace("/", ".").rsplit(".", 1)[1], key.replace("/", ".").rsplit(".", 1)[0], step): value
              for key, value, step in sink.logged}  # the key is {task}/{variant} (or {task}.{variant})
    assert logged == cells
    table = json.loads((tmp_path / "results.json").read_text())
    assert table["rows"]["drope"]["lm_eval_toy_mc@128"] == pytest.approx(first)
    assert "lm_eval_toy_long@512" in table["columns"]


def test_rope_past_its_positions_on_a_long_context_task_is_refused_before_any_model_loads(
        first_choice_checkpoints, lm_eval_tasks, tmp_path):
    base, _ = first_choice_checkpoints
    cfg = EvalConfig(variants=["rope"], tasks=["lm_eval:toy_long"], extension_factors=[1, 2],
                     lm_eval_include_path=str(lm_eval_tasks), original_context=128)
    with pytest.raises(SpecError, match=r"lm_eval:toy_long at 256 tokens.*max_position_embeddings is 128"):
        evaluate(cfg, drope_checkpoint=None, base_checkpoint=str(base), output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_eval_config_takes_lm_eval_tasks_and_names_a_typo():
    assert EvalConfig(tasks=["lm_eval:arc_easy", "perplexity"]).tasks[0] == "lm_eval:arc_easy"
    with pytest.raises(SpecError, match=r"evaluate.tasks='niah_singel_1'.*lm_eval:<task or group>"):
        EvalConfig(tasks=["niah_singel_1"])
    with pytest.raises(SpecError, match=r"evaluate.lm_eval_limit=0"):
        EvalConfig(tasks=["lm_eval:arc_easy"], lm_eval_limit=0)


@pytest.mark.parametrize("preset", ["smollm-135m", "smollm-360m", "smollm-1.7b", "smollm2-135m", "llama-2-7b"])
def test_gpu_presets_run_the_papers_in_context_set(preset):
    from drope_ops.evals.harness import PAPER_SET
    from workflows.spec import load_spec

    spec = load_spec(preset)
    assert {f"lm_eval:{t}" for t in PAPER_SET} <= set(spec.evaluate.tasks)
    assert {"drope", "rope"} <= set(spec.evaluate.variants)


@pytest.mark.parametrize("preset", ["debug", "smollm2-135m-cpu", "micro-repro"])
def test_cpu_presets_have_no_lm_eval_task(preset):  # no data offline: lm-eval's tasks read the hub
    from workflows.spec import load_spec

    assert not [t for t in load_spec(preset).evaluate.tasks if t.startswith("lm_eval:")]
