"""lm-evaluation-harness as a backend (drope_ops/evals/harness.py) on the tiny debug model: tiny task sets
on disk (tests/fixtures/lm_eval_tasks.py) scored by lm-eval itself, a model that always answers one letter
scoring the fraction of documents whose gold is that letter; names, data and lengths refused in one line."""

import pytest
import torch

from drope_ops.errors import SpecError
from drope_ops.evals import harness
from tests.fixtures.lm_eval_tasks import expected_fraction


@pytest.fixture(scope="module")
def debug_model(debug_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(debug_checkpoint).eval(), AutoTokenizer.from_pretrained(debug_checkpoint)


def always(model, tok, letter: str):
    """A hook on lm_head that makes `model` answer `letter` (its byte token +100 logits); returns the handle."""
    token = tok.convert_tokens_to_ids(letter)

    def favour(module, args, logits):
        return logits + 100.0 * torch.nn.functional.one_hot(torch.tensor(token), logits.shape[-1]).to(logits.dtype)

    return model.lm_head.register_forward_hook(favour)


@pytest.mark.parametrize("letter", ["A", "B"])
def test_multiple_choice_scores_the_fraction_of_the_letter_a_model_always_answers(debug_model, lm_eval_tasks, letter):
    model, tok = debug_model
    handle = always(model, tok, letter)
    try:
        res = harness.evaluate_task(model, tok, "toy_mc", length=128, long_context=False, include_path=str(lm_eval_tasks))
    finally:
        handle.remove()
    assert res["metric"] == "acc" and res["n"] == 8
    assert res["score"] == pytest.approx(expected_fraction(letter))  # 2/8 for A, 3/8 for B


def test_long_context_task_runs_at_each_length_on_the_last_length_tokens(debug_model, lm_eval_tasks):
    model, tok = debug_model
    seen = []
    hooks = [always(model, tok, "B"), model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["input_ids"]).shape[-1]), with_kwargs=True)]
    try:
        for length in (256, 512):  # the passage is ~1100 tokens: lm-eval keeps its last `length`
            seen.clear()
            res = harness.evaluate_task(model, tok, "toy_long", length=length, long_context=True,
                                        include_path=str(lm_eval_tasks), tokenizer_path=None)
            assert max(seen) == length
            assert res["score"] == pytest.approx(expected_fraction("B"))
    finally:
        for h in hooks:
            h.remove()


def test_task_kinds_and_unknown_names(lm_eval_tasks):
    kinds = harness.check_tasks(["toy_mc", "toy_long", "arc_easy", "ai2_arc", "ruler", "longbench_musique"],
                                str(lm_eval_tasks))
    assert kinds == {"toy_mc": False, "toy_long": True, "arc_easy": False, "ai2_arc": False, "ruler": True,
                     "longbench_musique": True}
    with pytest.raises(SpecError, match=r"lm_eval:arc_eazy: lm-eval has no task.*did you mean arc_easy"):
        harness.check_tasks(["arc_eazy"], str(lm_eval_tasks))


def test_data_not_there_is_one_line_naming_the_task_and_the_fix(debug_model, lm_eval_tasks):
    model, tok = debug_model
    with pytest.raises(SpecError) as e:
        harness.evaluate_task(model, tok, "toy_offline", length=128, long_context=False, include_path=str(lm_eval_tasks))
    line = str(e.value)
    assert "\n" not in line and "lm_eval:toy_offline" in line and "missing/toy.jsonl" in line
    assert "evaluate.lm_eval_include_path" in line


def test_rope_past_its_positions_on_a_long_context_task_is_refused():
    harness.check_rope_lengths(["toy_long"], [128, 256], max_positions=256)
    harness.check_rope_lengths([], [4096], max_positions=256)  # in-context tasks run at C_train only
    with pytest.raises(SpecError, match=r"lm_eval:toy_long at 512 tokens.*max_position_embeddings is 256"):
        harness.check_rope_lengths(["toy_long"], [256, 512], max_positions=256)


def test_a_tag_scores_the_mean_of_its_tasks_and_ruler_reports_its_length():
    tag = harness.summarize({"arc_easy": {"acc,none": 0.5, "acc_norm,none": 0.6, "acc_norm_stderr,none": "N/A"},
                             "arc_challenge": {"acc,none": 0.2, "acc_norm,none": 0.3}}, "ai2_arc", 2048)
    assert tag["score"] == pytest.approx(0.45) and tag["subtasks"] == {"arc_easy": 0.6, "arc_challenge": 0.3}
    ruler = harness.summarize({"niah_single_1": {"4096,none": 0.75, "8192,none": -1}}, "niah_single_1", 4096)
    assert (ruler["metric"], ruler["score"]) == ("4096", 0.75)
    absent = harness.summarize({"niah_single_1": {"4096,none": -1}}, "niah_single_1", 4096)
    assert absent["score"] is None and "no score" in absent["skipped"]
