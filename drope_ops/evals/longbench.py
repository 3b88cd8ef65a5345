"""LongBench v1 (THUDM/LongBench): records, prompts, middle truncation, output lengths and metrics.

    records = load_records("/data/longbench", "hotpotqa")      # hotpotqa.jsonl or *.parquet, via datasets
    result = evaluate_task(model, tok, records, "hotpotqa", budget=4096)

Records follow LongBench's schema: input, context, answers (list), length, dataset, language,
all_classes, _id. Data is read with `datasets`' json / parquet builders from local files (no loading
scripts, no hub). Prompts, per-task output lengths and metrics are LongBench's (config/*.json,
metrics.py). Only the English tasks are supported: the Chinese ones need jieba.

Truncation is LongBench's: a prompt over the budget keeps its first and last budget/2 tokens.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path

from drope_ops.errors import SpecError

PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}
METRIC = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1", "musique": "qa_f1", "triviaqa": "qa_f1", "gov_report": "rouge", "qmsum": "rouge",
    "multi_news": "rouge", "samsum": "rouge", "trec": "classification", "passage_count": "count",
    "passage_retrieval_en": "retrieval", "lcc": "code_sim", "repobench-p": "code_sim",
}
FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum", "lsht")  # LongBench scores only their first line


def normalize_answer(s: str) -> str:
    """Lower text, drop punctuation, articles and extra whitespace (SQuAD / LongBench)."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _f1(prediction: list[str], truth: list[str]) -> float:
    same = sum((Counter(prediction) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    from rouge import Rouge

    try:
        return Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]
    except Exception:  # LongBench scores empty / unscorable predictions 0 the same way
        return 0.0


def classification_score(prediction: str, ground_truth: str, *, all_classes: list[str], **_) -> float:
    matches = [c for c in all_classes if c in prediction]
    matches = [m for m in matches if not (m in ground_truth and m != ground_truth)]
    # LongBench's `if em_match_list != 0` is always true, so its difflib fallback never runs: same here.
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def count_score(prediction: str, ground_truth: str, **_) -> float:
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == str(ground_truth) for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    target = re.findall(r"Paragraph (\d+)", ground_truth)[0]
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == target for n in numbers) / len(numbers)


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    from rapidfuzz import fuzz

    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return round(fuzz.ratio(line, ground_truth)) / 100  # fuzzywuzzy's integer ratio


METRICS = {"qa_f1": qa_f1_score, "rouge": rouge_score, "classification": classification_score,
           "count": count_score, "retrieval": retrieval_score, "code_sim": code_sim_score}


def check_task(task: str) -> str:
    if task not in PROMPTS:
        raise SpecError(f"LongBench task {task!r} is not supported; choose from {sorted(PROMPTS)} "
                        f"(the Chinese tasks need jieba and are left out)")
    return task


def score(task: str, predictions: list[str], answers: list[list[str]], all_classes: list[list[str]] | None = None) -> float:
    """LongBench's scorer: per record the best metric over its answers, mean x100, 2 decimals."""
    metric = METRICS[METRIC[check_task(task)]]
    total = 0.0
    for i, (pred, truths) in enumerate(zip(predictions, answers)):
        if task in FIRST_LINE_TASKS:
            pred = pred.lstrip("\n").split("\n")[0]
        classes = (all_classes[i] if all_classes else None) or []
        total += max(metric(pred, t, all_classes=classes) for t in truths)
    return round(100 * total / max(len(predictions), 1), 2)


def load_records(path: str | Path, task: str | None = None) -> list[dict]:
    """LongBench records from a .jsonl / .json / .parquet file, or a directory holding
    `<task>.jsonl` / `<task>.parquet` / `<task>/*.parquet` (as the hub copy lays them out)."""
    import datasets

    path = Path(path).expanduser()
    if path.is_dir():
        if task is None:
            raise SpecError(f"longbench_path={path} is a directory: name the task too")
        found = [p for p in (path / f"{task}.jsonl", path / f"{task}.json", path / f"{task}.parquet") if p.is_file()]
        found = found or sorted((path / task).glob("*.parquet")) or sorted(path.glob(f"{task}-*.parquet"))
        if not found:
            raise SpecError(f"longbench_path={path} has no {task}.jsonl, {task}.parquet or {task}/*.parquet; "
                            f"point it at LongBench's data folder")
        files = [str(p) for p in found[:1]] if found[0].suffix != ".parquet" else [str(p) for p in found]
    elif path.is_file():
        files = [str(path)]
    else:
        raise SpecError(f"longbench_path={path} does not exist; give LongBench's data folder or one file")
    builder = "parquet" if files[0].endswith(".parquet") else "json"
    datasets.disable_progress_bars()
    rows = list(datasets.load_dataset(builder, data_files=files, split="train"))
    if task is not None:
        rows = [r for r in rows if r.get("dataset", task) in (task, f"{task}_e")]
    missing = {"input", "context", "answers"} - set(rows[0]) if rows else set()
    if missing:
        raise SpecError(f"{files[0]} lacks LongBench fields {sorted(missing)}; records need input, context, answers")
    return rows


def build_prompt_ids(record: dict, task: str, tokenizer, budget: int) -> list[int]:
    """The task's prompt for `record`, middle-truncated to `budget` tokens (first and last budget/2)."""
    prompt = PROMPTS[check_task(task)].format(context=record["context"], input=record["input"])
    ids = tokenizer(prompt).input_ids
    if len(ids) > budget:
        half = budget // 2
        ids = ids[:half] + ids[-half:]
    return ids


def evaluate_task(model, tokenizer, records: list[dict], task: str, *, budget: int, limit: int | None = None,
                  progress=None) -> dict:
    """Greedy predictions for `records` with the task's output length; prompts fit `budget` - output."""
    import torch

    from drope_ops.evals.decoding import greedy_generate

    max_new = MAX_NEW_TOKENS[check_task(task)]
    preds, rows = [], records[:limit] if limit else records
    for i, record in enumerate(rows):
        ids = build_prompt_ids(record, task, tokenizer, budget - max_new)
        new = greedy_generate(model, torch.tensor(ids), max_new_tokens=max_new, eos_token_id=tokenizer.eos_token_id)
        preds.append(tokenizer.decode(new, skip_special_tokens=True))
        if progress:
            progress(f"longbench {task} {i + 1}/{len(rows)}")
    value = score(task, preds, [r["answers"] for r in rows], [r.get("all_classes") or [] for r in rows])
    return {"score": value, "n": len(rows), "predictions": preds}
