"""Evaluation commands: fit-temperature and eval (thin faces over workflows/stages).

    drope fit-temperature ckpt/smollm2-drope-recal ckpt/smollm2-drope-fitted --factors 2 4 --sequences 4
    drope eval out/eval --drope ckpt/smollm2-drope-fitted --base ckpt/smollm2 --original-context 2048 \
        --variants drope rope pi ntk yarn --tasks niah_single_1 perplexity --factors 1 2 4 --samples 4
    drope eval out/eval-base --base ckpt/smollm2 --variants rope --tasks niah_single_1 --original-context 2048
    drope eval out/eval-mc --drope ckpt/smollm2-drope-fitted --base ckpt/smollm2 --variants drope rope \
        --tasks lm_eval:arc_easy lm_eval:hellaswag --lm-eval-include-path tasks/offline --lm-eval-limit 200
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from drope_ops.errors import SpecError
from workflows.commands.parser import Parser


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="shakespeare",
                   help="held-out text: 'shakespeare', a .txt/.jsonl/.parquet path or glob, or hf://dataset[:config]")
    p.add_argument("--text-field", default="text", help="column with the text (jsonl / parquet)")
    p.add_argument("--heldout-fraction", type=float, default=0.02, help="fraction of documents held out")


def _data_config(args):
    from drope_ops.data import DataConfig

    return DataConfig(source=args.data, text_field=args.text_field, heldout_fraction=args.heldout_fraction)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)


def main_fit_temperature(argv: list[str]) -> int:
    from workflows.stages.fit_temperature import TemperatureConfig, fit_temperature

    p = Parser(prog="drope fit-temperature",
                description="Fit the DroPE logit scale beta per length and c in beta = 1 + c ln s.")
    p.add_argument("checkpoint", help="DroPE checkpoint directory (model_type drope)")
    p.add_argument("output", help="new directory: the same weights with logit_scale_c set (must not exist)")
    p.add_argument("--factors", type=float, nargs="+", default=[2, 4], help="extension factors s > 1")
    p.add_argument("--sequences", type=int, default=4, help="held-out sequences per length")
    p.add_argument("--bounds", type=float, nargs=2, default=[0.5, 3.0], metavar=("LOW", "HIGH"))
    p.add_argument("--max-evals", type=int, default=12, help="loss evaluations per length (<= 12)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    _data_args(p)
    args = p.parse_args(argv)
    _logging()
    cfg = TemperatureConfig(extension_factors=args.factors, sequences_per_length=args.sequences,
                            bounds=list(args.bounds), max_evals=args.max_evals, dtype=args.dtype)
    res = fit_temperature(cfg, _data_config(args), args.checkpoint, args.output)
    print(f"c = {res['c']:.4f}  (beta(s) = 1 + c ln s; paper: 0.103 SmolLM-DroPE, 0.412 from scratch)")
    for s, beta in res["betas"].items():
        print(f"  s={s:g}  L={res['lengths'][s]}  beta={beta:.4f}  loss={res['losses'][s]:.4f}")
    print(f"fitted checkpoint: {res['output']}")
    return 0


def _check_eval_paths(args) -> None:
    """Refuse, before any model loads, an existing OUTPUT (as every command does) and checkpoints
    that are not directories or have no tokenizer."""
    from pathlib import Path

    from drope_ops.checkpoint_policy import tokenizer_problem

    out = Path(args.output)
    if (out.is_file() or (out.is_dir() and any(out.iterdir()))) and not args.overwrite:
        raise SpecError(f"{out}: already exists; choose a new destination, remove it first, or pass --overwrite")
    baselines = [v for v in args.variants if v != "drope"]
    if "drope" in args.variants and args.drope is None:
        raise SpecError("--variants drope needs --drope CHECKPOINT (the fitted DroPE checkpoint), or leave drope out "
                        "of --variants")
    if baselines and args.base is None:
        raise SpecError(f"--variants {' '.join(baselines)} needs --base CHECKPOINT (the RoPE model they scale), or "
                        "leave them out of --variants")
    for flag, ckpt in (("--drope", args.drope), ("--base", args.base)):
        if ckpt is None:
            continue
        if not Path(ckpt).is_dir():
            raise SpecError(f"{flag} {ckpt}: not a checkpoint directory; give the directory drope fetch or "
                            f"drop-rope wrote")
        if problem := tokenizer_problem([p.name for p in Path(ckpt).iterdir()], f"{flag} {ckpt}"):
            raise SpecError(problem)


def main_eval(argv: list[str]) -> int:
    from workflows.stages.evaluate import EvalConfig, evaluate

    p = Parser(prog="drope eval", description="NIAH / perplexity / LongBench against RoPE-scaling baselines.")
    p.add_argument("output", help="directory for results.json, results.md and the PNGs")
    p.add_argument("--drope", help="DroPE checkpoint (fitted temperature); needed for variant drope")
    p.add_argument("--base", help="base RoPE checkpoint; needed for rope / pi / ntk / yarn")
    p.add_argument("--original-context", type=int, help="C_train (default: the DroPE config's)")
    p.add_argument("--variants", nargs="+", default=["drope", "rope", "pi", "ntk", "yarn"])
    p.add_argument("--tasks", nargs="+", default=["niah_single_1", "perplexity"])
    p.add_argument("--factors", type=float, nargs="+", default=[1, 2, 4])
    p.add_argument("--samples", type=int, default=4, help="NIAH prompts per cell")
    p.add_argument("--depths", type=int, nargs="+", default=[0, 25, 50, 75, 100])
    p.add_argument("--haystack", choices=["essay", "noise"], help="replace the tasks' own haystack")
    p.add_argument("--essay", help="essay haystack text (file, folder or glob); default Shakespeare")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ppl-sequences", type=int, default=2)
    p.add_argument("--longbench", help="LongBench data folder (jsonl / parquet) or file")
    p.add_argument("--longbench-tasks", nargs="+", default=["multifieldqa_en", "musique"])
    p.add_argument("--longbench-limit", type=int)
    p.add_argument("--lm-eval-include-path", help="folder of lm-eval task YAMLs (tasks lm_eval:<name>), e.g. local data")
    p.add_argument("--lm-eval-limit", type=int, help="documents per lm-eval task (default all)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace the results in an existing OUTPUT")
    _data_args(p)
    args = p.parse_args(argv)
    _check_eval_paths(args)
    if args.original_context is None and not args.drope:
        raise SpecError("--original-context is required without --drope (C_train of the base model, e.g. 2048 "
                        "for SmolLM2: its config says 8192)")
    _logging()
    cfg = EvalConfig(variants=args.variants, tasks=args.tasks, extension_factors=args.factors,
                     samples_per_cell=args.samples, depths=args.depths, haystack=args.haystack,
                     essay_path=args.essay, max_new_tokens=args.max_new_tokens,
                     perplexity_sequences=args.ppl_sequences, longbench_path=args.longbench,
                     longbench_tasks=args.longbench_tasks, longbench_limit=args.longbench_limit,
                     seed=args.seed, dtype=args.dtype, original_context=args.original_context,
                     lm_eval_include_path=args.lm_eval_include_path, lm_eval_limit=args.lm_eval_limit)
    res = evaluate(cfg, drope_checkpoint=args.drope, base_checkpoint=args.base, output_dir=args.output,
                   data=_data_config(args))
    print(open(res["table_md"]).read())
    print(json.dumps({k: res[k] for k in ("table_json", "table_md", "heatmaps", "ppl_plot")}, indent=1))
    return 0
