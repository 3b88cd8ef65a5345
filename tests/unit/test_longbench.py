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


def _reference_greedy(model, tok, record, task, budget):
    """Greedy decoding written out the slow way (full forward per token, no KV cache), on the prompt
    LongBench defines, middle-truncated to budget - max_new tokens."""
    import torch

    max_new = longbench.MAX_NEW_TOKENS[task]
    ids = tok(longbench.PROMPTS[task].format(context=record["context"], input=record["input"])).input_ids
    keep = budget - max_new
    if len(ids) > keep:
        ids = ids[:keep // 2] + ids[-(keep // 2):]
    ids, new = torch.tensor([ids]), []
    with torch.no_grad():
        while len(new) < max_new:
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(new, skip_special_tokens=True)


def test_greedy_run_on_the_tiny_model(debug_checkpoint, tmp_path):
    """Records whose answer is what the model greedily writes score 100, records whose answer is
    another record's output score 0, and a mix scores LongBench's mean. triviaqa: its prompt ends with
    the question, and the random tiny model repeats a prompt's last character, so each record gets
    its own one-word answer ("kkkk..."), which survives qa_f1's normalisation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(debug_checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(debug_checkpoint)
    budget = 300
    context = "Question: Which city hosts the tower?\nAnswer: Paris\n\n" * 12  # over the budget: truncated
    probe = [{"input": f"Question: {q}\nAnswer: {last}", "context": context, "answers": ["unused"], "_id": f"p{i}"}
             for i, (q, last) in enumerate([("Who wrote Hamlet?", "k"), ("Where is the bridge?", "m"),
                                            ("Which river?", "w")])]
    first = longbench.evaluate_task(model, tok, probe, "triviaqa", budget=budget)
    preds = first["predictions"]
    # the predictions are greedy decoding of LongBench's truncated prompt (checked the slow way)
    assert preds == [_reference_greedy(model, tok, r, "triviaqa", budget) for r in probe]
    words = [longbench.normalize_answer(p.lstrip("\n").split("\n")[0]) for p in preds]
    assert all(words) and len(set(words)) == 3, preds  # three different, scorable answers

    hit = [{**r, "answers": [p]} for r, p in zip(probe, preds)]
    swapped = [{**r, "answers": [preds[(i + 1) % 3]]} for i, r in enumerate(probe)]
    assert longbench.evaluate_task(model, tok, hit, "triviaqa", budget=budget)["score"] == 100.0
    assert longbench.evaluate_task(model, tok, swapped, "triviaqa", budget=budget)["score"] == 0.0
    mixed = longbench.evaluate_task(model, tok, [hit[0], swapped[1], hit[2], swapped[0]], "triviaqa", budget=budget)
    assert mixed["score"] == 50.0 and mixed["n"] == 4
    # best over a record's answers; `limit` evaluates only the first records
    both = {**probe[1], "answers": [preds[0], preds[1]]}
    assert longbench.evaluate_task(model, tok, [both, swapped[2]], "triviaqa", budget=budget, limit=1) == {
        "score": 100.0, "n": 1, "predictions": preds[1:2]}

    # the same through load_records, and the words-vs-punctuation QA records of the other tests score 0
    with open(tmp_path / "triviaqa.jsonl", "w") as f:
        for r in hit + swapped:
            f.write(json.dumps({**r, "dataset": "triviaqa"}) + "\n")
    assert longbench.evaluate_task(model, tok, longbench.load_records(tmp_path, "triviaqa"), "triviaqa",
                                   budget=budget)["score"] == 50.0
    qa = longbench.evaluate_task(model, tok, RECORDS, "hotpotqa", budget=budget)
    assert qa["n"] == 2 and qa["score"] == 0.0, qa["predictions"]
