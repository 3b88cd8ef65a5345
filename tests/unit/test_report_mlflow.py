"""The evaluation results as MLflow names them (drope_ops.evals.report): cell keys, the headline
numbers of the runs list, and the table artifact's rows."""

import json

import pytest

from drope_ops.evals.report import cell_key, headline, table_rows


def cell(variant, task, factor, score, c_train=128, **extra):
    return {"variant": variant, "task": task, "factor": float(factor), "length": int(factor * c_train),
            "score": score, **extra}


RESULTS = [
    cell("drope", "niah_single_1", 1, 100.0), cell("drope", "niah_single_1", 4, 50.0),
    cell("drope", "niah_multikey_1", 1, 80.0), cell("drope", "niah_multikey_1", 4, 0.0),
    cell("drope", "perplexity", 1, 12.0), cell("drope", "perplexity", 2, 13.0), cell("drope", "perplexity", 4, 15.0),
    cell("rope", "niah_single_1", 1, 100.0), cell("rope", "niah_single_1", 4, None, skipped="no room"),
    cell("rope", "perplexity", 1, 11.0), cell("rope", "perplexity", 4, 900.0),
    cell("crop", "perplexity", 4, 14.0),
    # in-context (scored at C_train only) and a long-context lm-eval task (every factor)
    cell("drope", "lm_eval_arc_easy", 1, 0.5), cell("drope", "lm_eval_piqa", 1, 0.7),
    cell("drope", "lm_eval_ruler", 1, 0.9), cell("drope", "lm_eval_ruler", 4, 0.1),
]


def test_cell_key_is_task_then_variant():
    assert cell_key(RESULTS[0]) == "niah_single_1/drope"
    assert cell_key(cell("yarn", "longbench/musique", 2, 1.0)) == "longbench/musique/yarn"


def test_headline_means_per_factor_and_perplexity_at_both_ends():
    h = headline(RESULTS)
    assert h["headline/niah_mean_x1/drope"] == pytest.approx(90.0)  # (100 + 80) / 2
    assert h["headline/niah_mean_x4/drope"] == pytest.approx(25.0)
    assert h["headline/perplexity_x1/drope"] == 12.0 and h["headline/perplexity_x4/drope"] == 15.0
    assert "headline/perplexity_x2/drope" not in h  # only the ends of the range
    # a cell without a score is left out, not counted as 0; no NIAH score at 4x: no key
    assert h["headline/niah_mean_x1/rope"] == 100.0 and "headline/niah_mean_x4/rope" not in h
    assert h["headline/perplexity_x4/rope"] == 900.0 and h["headline/perplexity_x4/crop"] == 14.0
    # in-context: the lm_eval tasks scored only at C_train (ruler, scored at 4x too, is long-context)
    assert h["headline/in_context_mean/drope"] == pytest.approx(0.6)
    assert [k for k in h if k.startswith("headline/in_context_mean/")] == ["headline/in_context_mean/drope"]
    assert all(k.count("/") == 2 for k in h)


def test_table_rows_are_flat_and_keep_every_cell():
    nested = cell("drope", "niah_single_1", 2, 50.0, by_depth={0: 100.0, 100: 0.0}, samples=[{"answer": "x"}])
    rows = table_rows([nested, RESULTS[8]])
    assert rows[0] == {"variant": "drope", "task": "niah_single_1", "factor": 2.0, "length": 256, "score": 50.0}
    assert rows[1]["score"] is None and rows[1]["skipped"] == "no room"
    json.dumps(rows)  # what MLflow's log_table writes
