"""lm-evaluation-harness (the lm-eval package) as an evaluation backend: `lm_eval:<task or group>`.

    from drope_ops.evals import harness
    kinds = harness.check_tasks(["arc_easy", "ruler"], include_path=None)   # {"arc_easy": False, "ruler": True}
    res = harness.evaluate_task(model, tok, "arc_easy", length=2048, long_context=False)
    res["score"], res["metric"], res["metrics"]       # 0.61, "acc_norm", {"acc": 0.58, "acc_norm": 0.61}

The model is the object the evaluate stage already loaded (a DroPE model with its fitted temperature,
or the base model with a RoPE scaling), wrapped in lm-eval's own `HFLM(pretrained=model, ...)`, and
scored by `lm_eval.simple_evaluate`: prompts, few-shot handling, and scoring are the harness's, so the
numbers compare with published ones.

Lengths: HFLM's `max_length` is the unit's length L (lm-eval truncates longer inputs from the left). A
long-context task (lm-eval's RULER tasks, tagged `longcxt`; LongBench, tagged `longbench_*`; a task of
your own tagged `longcxt`) runs at every extension factor and is handed `max_seq_lengths: [L]` and
the checkpoint's tokenizer as task metadata (what RULER sizes its synthetic prompts by); any other
task is in-context and runs once, at C_train.

Offline: lm-eval's tasks fetch their data from the Hugging Face hub. `include_path` names folders of
task YAMLs lm-eval indexes after its own (a later YAML of the same name replaces lm-eval's), e.g. a
copy of arc_easy.yaml with `dataset_path: json` and `dataset_kwargs: {data_files: {test: /data/arc_easy.jsonl}}`.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math

from drope_ops.errors import SpecError, one_line

PREFIX = "lm_eval:"
"""How an evaluate.tasks entry names an lm-eval task, group or tag: lm_eval:arc_easy."""
LONG_CONTEXT_TAG = "longcxt"
"""lm-eval's tag on its RULER tasks; tag a task of your own with it to run it at every length."""
HEADLINE = ("acc_norm", "acc", "score", "exact_match", "f1")
"""The metric a task's score is, in order of preference (after the length for RULER tasks)."""
PAPER_SET = ("arc_easy", "arc_challenge", "hellaswag", "openbookqa", "piqa", "winogrande")
"""The DroPE paper's in-context check (Sec. 5, Table 2): six multiple-choice benchmarks."""


def is_lm_eval(task: str) -> bool:
    return task.startswith(PREFIX) and len(task) > len(PREFIX)


def harness_name(task: str) -> str:
    """'lm_eval:arc_easy' -> 'arc_easy' (the name lm-eval knows)."""
    return task[len(PREFIX):]


def result_name(name: str) -> str:
    """The task's name in the results table and MLflow: 'arc_easy' -> 'lm_eval_arc_easy'."""
    return "lm_eval_" + name


@functools.lru_cache(maxsize=2)
def _indexed(include_path: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def task_manager(include_path: str | None = None, tokenizer: str | None = None, length: int | None = None):
    """lm-eval's TaskManager over its own tasks and `include_path`, with the metadata RULER-style tasks
    read (tokenizer, max_seq_lengths). Indexing every task takes seconds, so the index is built once per
    process and shared; lm-eval 0.4.13 keeps a TaskManager's metadata in its TaskFactory."""
    from lm_eval.tasks._factory import TaskFactory

    meta = {k: v for k, v in (("tokenizer", tokenizer), ("max_seq_lengths", [length] if length else None)) if v}
    manager = copy.copy(_indexed(include_path))
    manager.metadata, manager._factory = meta or None, TaskFactory(meta=meta or None)
    return manager


def check_tasks(names: list[str], include_path: str | None = None) -> dict[str, bool]:
    """{name: long_context} for lm-eval task / group / tag names; SpecError for a name it does not know."""
    index = task_manager(include_path).task_index
    for name in names:
        if name not in index:
            near = difflib.get_close_matches(name, list(index), n=3)
            where = f" nor in evaluate.lm_eval_include_path {include_path}" if include_path else ""
            raise SpecError(f"evaluate.tasks {PREFIX}{name}: lm-eval has no task, group or tag {name!r}{where}"
                            + (f"; did you mean {', '.join(near)}?" if near else "; list them with `lm_eval ls tasks`"))
    return {name: is_long_context(name, index) for name in names}


def is_long_context(name: str, index: dict, _seen: frozenset = frozenset()) -> bool:
    """Whether a task takes its length as a parameter: tagged longcxt or longbench_*, or a group / tag
    holding one."""
    entry = index.get(name)
    if entry is None or name in _seen:
        return False
    kind = entry.kind.name
    if kind == "TAG":
        return any(is_long_context(t, index, _seen | {name}) for t in entry.tags)
    if kind == "GROUP":
        children = [c if isinstance(c, str) else c.get("task") or c.get("group") for c in (entry.cfg or {}).get("task", [])]
        return any(is_long_context(c, index, _seen | {name}) for c in children if isinstance(c, str))
    return LONG_CONTEXT_TAG in entry.tags or any(t.startswith("longbench") for t in entry.tags)


def check_rope_lengths(long_tasks: list[str], lengths: list[int], max_positions: int) -> None:
    """The RoPE variant (no scaling) is not run past its max_position_embeddings on a long-context task."""
    over = [n for n in lengths if n > max_positions]
    if long_tasks and over:
        raise SpecError(f"evaluate.tasks {PREFIX}{long_tasks[0]} at {over[0]} tokens: the base model's "
                        f"max_position_embeddings is {max_positions} and variant rope has no RoPE scaling; drop "
                        f"rope from evaluate.variants or keep evaluate.extension_factors within it "
                        f"(drope, pi, ntk and yarn extend)")


def evaluate_task(model, tokenizer, name: str, *, length: int, long_context: bool, tokenizer_path: str | None = None,
                  include_path: str | None = None, limit: int | None = None, batch_size: int = 1) -> dict:
    """Score `model` on lm-eval task / group / tag `name` at `length` tokens.

    Returns {"metric", "score", "metrics": {metric: value}, "subtasks": {task: score}, "n"}; score is
    None (with "skipped") when the task reports nothing at this length.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", max_length=int(length), batch_size=batch_size)
    tm = task_manager(include_path, *((tokenizer_path, int(length)) if long_context else (None, None)))
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tm, limit=limit, bootstrap_iters=0,
                                      log_samples=False)
    except (ConnectionError, FileNotFoundError) as e:
        raise SpecError(f"evaluate.tasks {PREFIX}{name}: its data cannot be loaded ({one_line(e)}); offline, point the "
                        f"task at local files: a task YAML in evaluate.lm_eval_include_path with dataset_path: json "
                        f"and dataset_kwargs: {{data_files: ...}}") from None
    return summarize(out["results"], name, length, n=sum(v.get("effective", 0) for v in out.get("n-samples", {}).values()))


def summarize(results: dict, name: str, length: int, n: int = 0) -> dict:
    """lm-eval's results dict -> one score for `name`: its own headline metric (a group's aggregate),
    else the mean of its tasks' headline scores."""
    subtasks = {task: headline(metrics_of(r), length) for task, r in results.items() if task != name}
    own = headline(metrics_of(results.get(name, {})), length)
    scored = [s for _, s in subtasks.values() if s is not None]
    if own[1] is None and scored:
        own = (subtasks[next(iter(subtasks))][0], sum(scored) / len(scored))
    out = {"metric": own[0], "score": own[1], "metrics": metrics_of(results.get(name, {})),
           "subtasks": {t: s for t, (_, s) in subtasks.items()}, "n": n}
    if own[1] is None:
        out["skipped"] = f"lm-eval reported no score for {name} at {length} tokens"
    return out


def metrics_of(task_result: dict) -> dict[str, float]:
    """{'acc,none': 0.5, 'acc_stderr,none': 'N/A', 'alias': ...} -> {'acc': 0.5}; other filters keep
    their name ('exact_match,strict-match')."""
    out = {}
    for key, value in task_result.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else key] = float(value)
    return out


def headline(metrics: dict[str, float], length: int) -> tuple[str | None, float | None]:
    """(metric, score): the length's score for RULER-style tasks (-1 = no sample at it), else the first of
    HEADLINE present, else the first metric."""
    if str(length) in metrics:
        value = metrics[str(length)]
        return str(length), (None if value == -1 or math.isnan(value) else value)
    for name in (*HEADLINE, *metrics):
        if name in metrics and not name.isdigit():
            return name, metrics[name]
    return None, None
