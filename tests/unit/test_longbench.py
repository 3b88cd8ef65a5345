"""LongBench v1 on hand-made records in LongBench's schema: loading through datasets (jsonl and
parquet), prompts, middle truncation, the metrics, and a real greedy run on the tiny model."""

import json

import pytest

from drope_ops import debugmodel
from drope_ops.errors import SpecError
from drope_ops.evals import longbench

RECORDS = [
    {"input": "Which city hosts the tower?", "context": "Passage 1: The tower stands in Paris. " * 30,
     "answers": ["Paris"], "length": 200, "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": "a1"},
    {"input": "Where is the bridge?", "context": "Passage 2: The bridge is in London. " * 30,
     "answers": ["London", "in London"], "length": 200, "dataset": "hotpotqa", "language": "en",
     "all_classes": None, "_id": "a2"},
]


@pytest.fixture
def longbench_dir(tmp_path):
    with open(tmp_path / "hotpotqa.jsonl", "w") as f:
        for r in RECORDS:
            f.write(json.dumps(r) + "\n")
    return tmp_path


def test_load_jsonl_and_parquet_through_datasets(longbench_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = longbench.load_records(longbench_dir, "hotpotqa")
    assert [r["_id"] for r in rows] == ["a1", "a2"] and rows[1]["answers"] == ["London", "in London"]
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "copy.parquet")
    assert [r["_id"] for r in longbench.load_records(tmp_path / "copy.parquet", "hotpotqa")] == ["a1", "a2"]
    with pytest.raises(SpecError, match="longbench_path"):
        longbench.load_records(tmp_path / "nowhere", "hotpotqa")
    with pytest.raises(SpecError, match="not supported"):
        longbench.check_task("dureader")


def test_prompt_is_longbenchs_and_middle_truncation_keeps_both_ends():
    tok = debugmodel.byte_level_tokenizer()
    r = RECORDS[0]
    ids = longbench.build_prompt_ids(r, "hotpotqa", tok, budget=10_000)
    assert tok.decode(ids) == (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n" + r["context"] + "\n\nAnswer the question based on the "
        "given passages. Only give me the answer and do not output any other words.\n\nQuestion: "
        "Which city hosts the tower?\nAnswer:")
    short = longbench.build_prompt_ids(r, "hotpotqa", tok, budget=200)
    assert len(short) == 200 and short[:100] == ids[:100] and short[100:] == ids[-100:]
    assert longbench.MAX_NEW_TOKENS["hotpotqa"] == 32 and longbench.MAX_NEW_TOKENS["gov_report"] == 512


def test_metrics_match_longbench_definitions():
    assert longbench.qa_f1_score("The Paris.", "paris") == 1.0
    assert longbench.qa_f1_score("Paris France", "Paris") == pytest.approx(2 / 3)
    assert longbench.count_score("There are 7 or 8", "7") == 0.5
    assert longbench.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert longbench.retrieval_score("Paragraph 3", "Paragraph 12") == 0.0
    assert longbench.classification_score("Type: Location", "Location", all_classes=["Location", "Person"]) == 1.0
    assert longbench.classification_score("Location or Person", "Person", all_classes=["Location", "Person"]) == 0.5
    assert longbench.code_sim_score("# comment\nx = 1", "x = 1") == 1.0
    assert longbench.rouge_score("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert longbench.rouge_score("", "the cat") == 0.0
    # LongBench's scorer: best over answers, first line only for few-shot tasks, mean x100
    assert longbench.score("hotpotqa", ["London", "Rome"], [["Paris", "London"], ["Rome"]]) == 100.0
    assert longbench.score("triviaqa", ["\nRome\nParis"], [["Paris"]]) == 0.0


def test_greedy_run_on_the_tiny_model(debug_checkpoint, longbench_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(debug_checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(debug_checkpoint)
    rows = longbench.load_records(longbench_dir, "hotpotqa")
    result = longbench.evaluate_task(model, tok, rows, "hotpotqa", budget=300)
    assert result["n"] == 2 and len(result["predictions"]) == 2
    assert 0.0 <= result["score"] <= 100.0
