"""Stage evaluate: DroPE against the base RoPE model and its PI / NTK / YaRN scalings.

    drope eval --drope CKPT --base BASE_CKPT OUT --variants drope rope yarn --tasks niah_single_1 perplexity \
        --factors 1 2 4 --samples 4

Work is a list of independent units, one per (variant, task, length), each a plain dict that
`run_unit` evaluates by itself (materializes its checkpoint URI on its node, loads its model, runs,
returns a result dict). `evaluate` runs them through workflows.tasks.run_units: Ray tasks
when Ray is initialised, one per model (a variant at a length, loaded once for all its units; CPUs,
GPUs and memory from cpus_per_unit / gpus_per_unit / memory_per_unit_gb), else one after another here, then writes results.json / results.md, one NIAH
heatmap per variant and task, and perplexity_vs_length.png.

Lengths are L = s * C_train, C_train being the DroPE config's original_max_position_embeddings (or
`original_context`): SmolLM2's config says 8192 though it pretrained at 2048. The base variants get
extension factor s (PI / YaRN at factor 1 are the base model). Perplexity adds the "crop" reference:
the base model fed at most C_train tokens (sliding windows), the paper's Figure 5 comparison. Every
length's perplexity scores the first L tokens of the same held-out sequences (those of the longest
length), so the base model as is (rope, crop) scores all its lengths in one pass. They come from the
held-out test documents, never the validation ones the temperature was fitted on (drope_ops.data).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from drope_ops import storage
from drope_ops.choices import check_choices
from drope_ops.data import DataConfig
from drope_ops.errors import SpecError
from drope_ops.evals import harness
from drope_ops.hardware import Dtype, resolve_dtype
from workflows import stage_io
from workflows.stage import SOURCE, Stage
from workflows.tasks import run_units, task_device

Variant = Literal["drope", "rope", "pi", "ntk", "yarn"]
NiahTask = Literal["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                   "niah_multikey_3", "niah_multivalue", "niah_multiquery"]
Task = Literal[NiahTask, "perplexity", "longbench"]
Haystack = Literal["essay", "noise"]
VARIANTS = typing.get_args(Variant)
RESULTS_TABLE = "results_table.json"
"""The MLflow table artifact of the evaluate run: one row per cell (variant, task, factor, length, score)."""
NIAH_TASKS = typing.get_args(NiahTask)
TASKS = typing.get_args(Task)


@dataclass
class EvalConfig:
    variants: list[Variant] = field(default_factory=lambda: list(VARIANTS))
    """Models to compare: drope (the fitted DroPE checkpoint), rope (base as is), pi, ntk, yarn."""
    tasks: list[Task | str] = field(default_factory=lambda: ["niah_single_1", "perplexity"])
    """RULER NIAH task names, "perplexity", "longbench", and/or lm_eval:<task or group> (lm-evaluation-harness,
    e.g. lm_eval:arc_easy; drope_ops/evals/harness.py): in-context ones at C_train, long-context ones at
    every factor."""
    extension_factors: list[float] = field(default_factory=lambda: [1, 2, 4])
    """Lengths as multiples of C_train."""
    samples_per_cell: int = 4
    """NIAH prompts per (variant, task, length); depths cycle through `depths`."""
    depths: list[int] = field(default_factory=lambda: [0, 25, 50, 75, 100])
    """Needle depths in percent of the context."""
    haystack: Haystack | None = None
    """None: each RULER task's own haystack; "essay" or "noise" replaces it (needle haystacks stay)."""
    essay_path: str | None = None
    """Text file(s) for the essay haystack (file, directory of .txt, or glob); None = Shakespeare."""
    max_new_tokens: int = 32
    """NIAH answer budget (RULER uses 128; 32 holds a UUID). Prompts are length - this, exactly."""
    perplexity_sequences: int = 2
    """Held-out sequences per length for perplexity."""
    longbench_path: str | None = None
    """LongBench data (folder of <task>.jsonl / parquet, or one file); needed for the longbench task."""
    longbench_tasks: list[str] = field(default_factory=lambda: ["multifieldqa_en", "musique"])
    """LongBench v1 English tasks to run."""
    longbench_limit: int | None = None
    """Records per LongBench task (None = all)."""
    seed: int = 0
    """Seed of the NIAH samples."""
    dtype: Dtype = "auto"
    """Weights' dtype for evaluation: auto (bfloat16 on a GPU; on a CPU whichever a short matmul probe
    on the node measures faster, drope_ops.hardware.dtype_probe), float32 or bfloat16."""
    original_context: int | None = None
    """C_train; None = the DroPE config's original_max_position_embeddings."""
    cpus_per_unit: float = 1
    """CPUs of each evaluation task (one task per model: a variant at a length, for all its tasks)."""
    gpus_per_unit: float = 0
    """GPUs of each evaluation task; its model goes on the task's GPU (7B at 16x fits one 80 GB GPU:
    README "Running on a cluster")."""
    memory_per_unit_gb: float | None = None
    """Host memory Ray reserves for each evaluation task (None: no reservation)."""
    lm_eval_include_path: str | None = None
    """Folder of lm-eval task YAMLs indexed after lm-eval's own: tasks of your own, or copies of lm-eval's
    reading local files (dataset_path: json, dataset_kwargs.data_files) for offline runs."""
    lm_eval_limit: int | None = None
    """Documents per lm-eval task (None = all; lm-eval's --limit)."""
    lm_eval_batch_size: int = 1
    """lm-eval's batch size (1 keeps DroPE's temperature at each prompt's own length, not a padded one)."""

    def __post_init__(self):
        check_choices(self, "evaluate")
        for task in self.tasks:
            if task not in TASKS and not harness.is_lm_eval(task):
                raise SpecError(f"evaluate.tasks={task!r}: choose one of {', '.join(map(repr, TASKS))}, or "
                                f"lm_eval:<task or group> (lm-evaluation-harness)")
        if not self.variants or not self.tasks:
            raise SpecError(f"evaluate.variants / evaluate.tasks is empty: name at least one, e.g. variants: [drope, "
                            f"rope], tasks: [niah_single_1]")
        if not self.extension_factors or any(float(s) < 1 for s in self.extension_factors):
            raise SpecError(f"evaluate.extension_factors={self.extension_factors}: give factors >= 1, e.g. [1, 2, 4]")
        for name in ("variants", "tasks", "extension_factors"):
            values = [float(v) if name == "extension_factors" else v for v in getattr(self, name)]
            if len(set(values)) != len(values):
                raise SpecError(f"evaluate.{name}={getattr(self, name)} names a value twice; list each once")
        if self.samples_per_cell < 1:
            raise SpecError(f"evaluate.samples_per_cell={self.samples_per_cell}: must be >= 1")
        if any(not 0 <= d <= 100 for d in self.depths):
            raise SpecError(f"evaluate.depths={self.depths}: percentages in 0..100")
        for name in ("max_new_tokens", "perplexity_sequences", "longbench_limit", "original_context", "lm_eval_limit",
                     "lm_eval_batch_size"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise SpecError(f"evaluate.{name}={value!r}: must be a whole number >= 1"
                                + ("" if name in ("max_new_tokens", "perplexity_sequences", "lm_eval_batch_size")
                                   else " (or unset)"))
        if "longbench" in self.tasks and not self.longbench_path:
            raise SpecError("evaluate.tasks has 'longbench' but evaluate.longbench_path is empty; point it at "
                            "LongBench's data folder (jsonl or parquet), or drop the task")


def evaluation_units(cfg: EvalConfig, *, drope_checkpoint: str | None, base_checkpoint: str | None,
                     original_context: int, data: DataConfig | None = None,
                     lm_eval: dict[str, bool] | None = None) -> list[dict]:
    """Plain, picklable unit descriptions, one per (variant, task, length) (+ crop for perplexity).
    Checkpoints are named by URI (local directory or s3://): a unit materializes its own on its node.
    `lm_eval`: {lm-eval task: long_context} (harness.check_tasks); an in-context one runs at C_train only."""
    common = {"cfg": cfg, "data": data, "original_context": int(original_context)}
    tasks = [t for t in cfg.tasks if t != "longbench" and not harness.is_lm_eval(t)] + [
        f"longbench/{t}" for t in cfg.longbench_tasks if "longbench" in cfg.tasks]
    variants = list(cfg.variants) + (["crop"] if "perplexity" in cfg.tasks and base_checkpoint else [])
    units = []
    for variant in variants:
        ckpt = drope_checkpoint if variant == "drope" else base_checkpoint
        if not ckpt:
            raise SpecError(f"variant {variant!r} needs {'drope' if variant == 'drope' else 'base'}_checkpoint")
        for factor in cfg.extension_factors:
            for task in tasks:
                if variant == "crop" and task != "perplexity":
                    continue
                units.append({**common, "variant": variant, "task": task, "factor": float(factor),
                              "length": int(round(float(factor) * original_context)), "checkpoint": str(ckpt)})
        for name, long_context in (lm_eval or {}).items() if variant != "crop" else ():
            for factor in cfg.extension_factors if long_context else [1.0]:
                units.append({**common, "variant": variant, "task": harness.result_name(name), "lm_eval": name,
                              "long_context": long_context, "factor": float(factor), "checkpoint": str(ckpt),
                              "length": int(round(float(factor) * original_context))})
    return units


_MODEL_CACHE: dict[tuple, tuple] = {}


def model_key(unit: dict) -> tuple:
    """(checkpoint, variant, factor) of the model a unit runs on: crop is the base RoPE model as is, and
    so is rope at any factor: its perplexity units all run on it at the longest factor (one pass of the
    held-out sequences scores every length, perplexity_units)."""
    if unit["variant"] == "crop":
        return unit["checkpoint"], "rope", 1.0
    if unit["variant"] == "rope" and unit["task"] == "perplexity":
        return unit["checkpoint"], "rope", max(map(float, unit["cfg"].extension_factors))
    return unit["checkpoint"], unit["variant"], unit["factor"]


def _model_for(unit: dict):
    """(model, tokenizer) of a unit's variant at its factor; the last one stays cached in-process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import drope_ops  # noqa: F401  (registers model_type "drope")
    from drope_ops import rope_scaling

    _, variant, factor = model_key(unit)
    key = (unit["checkpoint"], variant, factor, unit["cfg"].dtype)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        dtype = resolve_dtype(unit["cfg"].dtype, "evaluate.dtype")
        ckpt = str(stage_io.local_dir(unit["checkpoint"]))
        if variant == "drope":
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, use_safetensors=True).eval()
        else:
            model = rope_scaling.load_variant(ckpt, variant, factor, unit["original_context"], dtype=dtype)
        model = model.to(task_device(unit["cfg"].gpus_per_unit))
        _MODEL_CACHE[key] = (model, AutoTokenizer.from_pretrained(ckpt))
    return _MODEL_CACHE[key]


@functools.lru_cache(maxsize=2)
def _essay_sentences(path: str | None) -> list[str]:
    import glob

    from drope_ops import assets
    from drope_ops.evals.niah import load_essay_sentences

    if path is None:
        files = assets.shakespeare_texts()
    elif Path(path).is_dir():
        files = sorted(Path(path).rglob("*.txt"))
    else:
        files = sorted(glob.glob(str(Path(path).expanduser()))) or [path]
    return load_essay_sentences(files)


def run_unit(unit: dict) -> dict:
    """Evaluate one unit; returns {"variant", "task", "factor", "length", "score", ...}."""
    import torch

    from drope_ops.evals import longbench, niah

    cfg = unit["cfg"]
    model, tok = _model_for(unit)
    task, length = unit["task"], unit["length"]
    out = {k: unit[k] for k in ("variant", "task", "factor", "length")}
    say = lambda msg: print(f"[evaluate] {unit['variant']}: {msg}", flush=True)  # noqa: E731
    with torch.inference_mode():
        if "lm_eval" in unit:
            out.update(harness.evaluate_task(
                model, tok, unit["lm_eval"], length=length, long_context=unit["long_context"],
                tokenizer_path=str(stage_io.local_dir(unit["checkpoint"])), include_path=cfg.lm_eval_include_path,
                limit=cfg.lm_eval_limit, batch_size=cfg.lm_eval_batch_size))
            say(f"{task} L={length}: {out['metric']} {out['score']}")
        elif task in NIAH_TASKS and not _fits(task, tok, length, cfg):
            out.update(metric="string_match_all", score=None, skipped=f"{length} tokens cannot hold the prompt frame")
        elif task in NIAH_TASKS:
            task_haystack = niah.TASKS[task].haystack if cfg.haystack is None else cfg.haystack
            essay = _essay_sentences(cfg.essay_path) if task_haystack == "essay" else None
            res = niah.evaluate_cell(model, tok, task, length, depths=cfg.depths, samples=cfg.samples_per_cell,
                                     max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, haystack=cfg.haystack,
                                     essay_sentences=essay, progress=say)
            out.update(metric="string_match_all", score=res["score"], by_depth=res["by_depth"], samples=res["samples"])
        elif task == "perplexity":
            out = perplexity_units([unit])[0]
        else:
            name = task.split("/", 1)[1]
            records = longbench.load_records(cfg.longbench_path, name)
            res = longbench.evaluate_task(model, tok, records, name, budget=length, limit=cfg.longbench_limit,
                                          progress=say)
            out.update(metric=longbench.METRIC[name], score=res["score"], n=res["n"])
    return out


def perplexity_units(units: list[dict]) -> list[dict]:
    """The perplexity units of one model and variant, every length from one pass over the held-out
    sequences: each length scores the first L tokens of the same sequences (those of the stage's longest
    length), full context in one forward a row, or crop's C_train windows in one pass."""
    from drope_ops.data import heldout_blocks
    from drope_ops.evals import perplexity

    first = units[0]
    if first["data"] is None:
        raise SpecError("the perplexity task needs held-out text: pass data= (a DataConfig)")
    model, tok = _model_for(first)
    C, cfg = first["original_context"], first["cfg"]
    blocks = heldout_blocks(first["data"], tok, int(round(max(map(float, cfg.extension_factors)) * C)),
                            cfg.perplexity_sequences, split="test")  # not the fit's ("validation")
    points = perplexity.perplexity_points(model, blocks, [u["length"] for u in units],
                                          crop_to=C if first["variant"] == "crop" else None)
    results = []
    for u in units:
        res = points[u["length"]]
        print(f"[evaluate] {u['variant']}: perplexity L={u['length']}: {res['ppl']:.3f}", flush=True)
        results.append({**{k: u[k] for k in ("variant", "task", "factor", "length")}, "metric": "perplexity",
                        "score": res["ppl"], "loss": res["loss"], "tokens": res["tokens"]})
    return results


def _fits(task: str, tok, length: int, cfg: EvalConfig) -> bool:
    """Whether a NIAH prompt of `length` tokens has room for its frame and needles (short C_train)."""
    from drope_ops.evals import niah

    try:
        niah.make_sample(task, tok, length=length, depth=0, max_new_tokens=cfg.max_new_tokens,
                         haystack="noise" if niah.TASKS[task].haystack == "essay" else cfg.haystack)
        return True
    except SpecError:
        return False


def evaluate(cfg: EvalConfig, *, drope_checkpoint: str | None, base_checkpoint: str | None, output_dir: str,
             data: DataConfig | None = None, metrics_sink=None, model_ids: dict | None = None) -> dict:
    """Run every unit (Ray tasks if Ray is initialised), then write table, heatmaps and plot. Each
    cell goes to `metrics_sink` as it finishes, linked to the LoggedModel `model_ids[variant]`."""
    from drope_ops.evals import report

    C = cfg.original_context or _original_context(drope_checkpoint, base_checkpoint)
    units = evaluation_units(cfg, drope_checkpoint=drope_checkpoint, base_checkpoint=base_checkpoint,
                             original_context=C, data=data, lm_eval=_check_lm_eval(cfg, base_checkpoint, C))
    log_cell = functools.partial(_log_score, metrics_sink, model_ids or {})
    results = _run_deduplicated(units, cfg, log_cell, C)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table_json, table_md = report.write_table(results, out, notes={"original_context": C, "config": dataclasses.asdict(cfg)})
    return {"table_json": str(table_json), "table_md": str(table_md),
            "heatmaps": [str(p) for p in report.niah_heatmaps(results, out)],
            "ppl_plot": (lambda p: str(p) if p else None)(report.perplexity_plot(results, out, C)),
            "results": results}


def _check_lm_eval(cfg: EvalConfig, base_checkpoint: str | None, original_context: int) -> dict[str, bool]:
    """{lm-eval task: long_context}, refused here, before any model loads, for a name lm-eval does not know
    or a RoPE model asked past its max_position_embeddings."""
    names = [harness.harness_name(t) for t in cfg.tasks if harness.is_lm_eval(t)]
    if not names:
        return {}
    kinds = harness.check_tasks(names, cfg.lm_eval_include_path)
    if base_checkpoint and "rope" in cfg.variants and any(kinds.values()):
        import json

        positions = json.loads((stage_io.materialize_metadata(base_checkpoint) / "config.json").read_text())
        harness.check_rope_lengths([n for n, long in kinds.items() if long], [
            int(round(float(s) * original_context)) for s in cfg.extension_factors], positions["max_position_embeddings"])
    return kinds


def _original_context(drope_checkpoint, base_checkpoint) -> int:
    from transformers import AutoConfig

    import drope_ops  # noqa: F401
    from drope_ops.rope_scaling import original_context_of

    if drope_checkpoint:
        meta = stage_io.materialize_metadata(drope_checkpoint)
        return int(AutoConfig.from_pretrained(meta).original_max_position_embeddings)
    return original_context_of(AutoConfig.from_pretrained(stage_io.materialize_metadata(base_checkpoint)))


def compute_key(unit: dict, original_context: int) -> tuple:
    """Units with equal keys compute the same numbers: at factor 1, PI / NTK / YaRN are the base RoPE
    model (their frequencies reduce to RoPE's), and crop at length <= C_train crops nothing."""
    same_as_rope = (unit["variant"] in ("pi", "ntk", "yarn") and unit["factor"] == 1.0) or (
        unit["variant"] == "crop" and unit["length"] <= original_context)
    return (unit["checkpoint"], "rope" if same_as_rope else unit["variant"], unit["task"], unit["length"])


def _run_deduplicated(units: list[dict], cfg: EvalConfig, log_cell, original_context: int) -> list[dict]:
    """Run one unit per compute_key, the longest first (the last ones to finish are then short), and
    give every unit its key's result under its own variant name and factor."""
    groups: dict[tuple, list[dict]] = {}
    for u in units:
        groups.setdefault(compute_key(u, original_context), []).append(u)
    firsts = sorted((g[0] for g in groups.values()), key=lambda u: -u["length"])
    print(f"[evaluate] {len(units)} cells, {len(firsts)} to compute (C_train = {original_context})", flush=True)
    computed = {compute_key(u, original_context): r  # _run_all returns results in its units' order
                for u, r in zip(firsts, _run_all(firsts, cfg, log_cell))}
    results = []
    for u in units:
        r = computed[compute_key(u, original_context)]
        if r["variant"] != u["variant"]:
            r = {**r, "variant": u["variant"], "factor": u["factor"], "same_as": r["variant"]}
            log_cell(r)
        results.append(r)
    return results


def _log_score(metrics_sink, model_ids: dict, r: dict) -> None:
    """One result as the MLflow metric `{task}/{variant}`, its step the length in tokens (so MLflow
    charts score against length), linked to the LoggedModel it scored: model_ids[variant]."""
    from drope_ops.evals.report import cell_key

    if metrics_sink is not None and r["score"] is not None:
        metrics_sink.log_metrics({cell_key(r): r["score"]}, r["length"], model_id=model_ids.get(r["variant"], ""))


def run_group(units: list[dict]) -> list[dict]:
    """The units that share one model, in one task: the model is loaded once for all of them, and the
    perplexity units of one variant score all their lengths in one pass (perplexity_units)."""
    sweeps: dict[str, list[dict]] = {}
    for u in units:
        if u["task"] == "perplexity":
            sweeps.setdefault(u["variant"], []).append(u)
    swept = {id(u): r for group in sweeps.values() for u, r in zip(group, perplexity_units(group))}
    return [swept[id(u)] if id(u) in swept else run_unit(u) for u in units]


def _run_all(units: list[dict], cfg: EvalConfig, log_cell) -> list[dict]:
    """run_unit for every unit, one task per model (longest first), in the units' order; progress and
    the metric as each one finishes."""
    groups: dict[tuple, list[dict]] = {}
    for u in units:
        groups.setdefault(model_key(u), []).append(u)
    ordered = sorted(groups.values(), key=lambda g: -max(u["length"] for u in g))
    finished = []

    def record(rs):
        for r in rs:
            finished.append(r)
            done = r["score"] if r["score"] is not None else r.get("skipped")
            print(f"[evaluate] {len(finished)}/{len(units)} {r['variant']} {r['task']} L={r['length']} -> {done}",
                  flush=True)
            log_cell(r)

    per_group = run_units(run_group, [(g,) for g in ordered], cpus=cfg.cpus_per_unit, gpus=cfg.gpus_per_unit,
                          memory=int(cfg.memory_per_unit_gb * 2**30) if cfg.memory_per_unit_gb else None,
                          on_result=record, what="evaluate.cpus_per_unit / gpus_per_unit / memory_per_unit_gb")
    by_unit = {(r["variant"], r["task"], r["length"]): r for rs in per_group for r in rs}
    return [by_unit[(u["variant"], u["task"], u["length"])] for u in units]


def run(spec, ctx) -> dict:
    """The stage: every cell an MLflow metric of this run (drope's linked to the temperature-fitted
    LoggedModel, the baselines' and crop's to the base model they are derived from), the table as an
    MLflow table artifact, and the headline numbers for the parent run (workflows/stage.py)."""
    from drope_ops.evals import report
    from drope_ops.manifest import write_manifest

    base_model = ctx.input_models.get(SOURCE, "")
    model_ids = {v: base_model for v in (*VARIANTS, "crop")} | {"drope": ctx.input_models.get("fit_temperature", "")}
    with stage_io.output_dir(ctx.output) as out:
        res = evaluate(spec.evaluate, drope_checkpoint=ctx.inputs["fit_temperature"], base_checkpoint=ctx.inputs[SOURCE],
                       output_dir=str(out), data=spec.data, metrics_sink=ctx.sink, model_ids=model_ids)
        write_manifest(out)
        if ctx.sink is not None:
            for path in [res.get("table_md"), res.get("table_json"), res.get("ppl_plot"), *res.get("heatmaps", [])]:
                if path:
                    ctx.sink.log_artifact(str(path))
            ctx.sink.log_table(report.table_rows(res["results"]), RESULTS_TABLE)
    return {"table_md": storage.join(ctx.output, Path(res["table_md"]).name) if res.get("table_md") else "",
            "cells": len(res.get("results", [])), "headline": report.headline(res["results"])}


STAGE = Stage(name="evaluate", run=run, sections=("evaluate", "data", "model.original_context"),
              inputs=("fit_temperature", SOURCE), label="evaluation")
