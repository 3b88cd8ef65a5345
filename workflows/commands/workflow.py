"""`drope presets | plan | run | submit | resume | status | lineage`: the workflow's command faces.

Runs live under a storage root (spec `storage.root`, default $DROPE_HOME/runs; DROPE_HOME defaults
to ./.drope) at <root>/<run_id>; $DROPE_HOME/index/<run_id>.json remembers where, so `drope status
RUN_ID` needs no flags on the box that started the run (elsewhere: --storage ROOT).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import yaml

from drope_ops import storage
from drope_ops.errors import SpecError
from workflows import stages
from workflows.commands.parser import Parser
from workflows.config import PRESETS_DIR, apply_overrides, from_dict, load_yaml, preset_names, to_dict
from workflows.ledger import Ledger
from workflows.pipeline import run_pipeline, stage_names
from workflows.runs import check_run_id, drope_home, find_run, remember, storage_root
from workflows.spec import WorkflowSpec, load_spec, spec_from_yaml


def _new_run(spec: WorkflowSpec, run_id: str = "") -> tuple[str, str]:
    run_id = check_run_id(run_id) if run_id else f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_uri = storage.join(storage_root(spec), run_id)
    ledger = Ledger(run_uri)
    if not ledger.exists():
        ledger.write_spec(yaml.safe_dump(to_dict(spec), sort_keys=False))
        ledger.create_run({"run_id": run_id, "name": spec.name, "attempts": 0, "status": "created"})
    remember(run_id, run_uri, storage_root=storage_root(spec))
    return run_id, run_uri


def _spec_args(p: Parser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set recalibrate.steps=10 (repeatable)")


def _force_arg(p: Parser) -> None:
    p.add_argument("--force", action="store_true",
                   help="start even though `drope plan` says recalibration does not fit the GPU memory")


def _take_over_arg(p: Parser) -> None:
    p.add_argument("--take-over", action="store_true",
                   help="drive the run even though another driver holds its lease (that driver is told it lost it)")


def _execute(spec: WorkflowSpec, run_id: str, run_uri: str, take_over: bool = False) -> int:
    print(f"[drope] run {run_id}  (storage {run_uri})", flush=True)
    records = run_pipeline(spec, run_id, run_uri, drope_home(), take_over=take_over)
    run = Ledger(run_uri).read_run()
    print(f"\n[drope] run {run_id} succeeded. Where to look:")
    ev = records.get("evaluate")
    if ev is not None:
        print(f"  results table:   {ev.result.get('table_md', storage.join(ev.output, 'results.md'))}")
        print(f"  heatmaps, plots: {ev.output}")
    print(f"  lineage:         drope lineage {run_id}")
    print(f"  stages:          drope status {run_id}")
    uri = run.get("tracking_uri", "")
    if uri.startswith("sqlite"):
        print(f"  MLflow UI:       .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    else:
        print(f"  MLflow UI:       {uri}  (experiment {spec.tracking.experiment or spec.name})")
    return 0


def main_presets(argv: list[str]) -> int:
    Parser(prog="drope presets", description="list the workflow presets").parse_args(argv)
    for name in preset_names():
        first = (PRESETS_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ").strip()
        print(f"{name:<20} {first}")
    return 0


def main_plan(argv: list[str]) -> int:
    p = Parser(prog="drope plan", description="print stages, resources and cost before running")
    p.add_argument("spec")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="memory of one GPU in GB (default: the spec's plan.gpu_memory_gb, 80)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs recalibration runs on (default: plan.gpus)")
    _spec_args(p)
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    if args.gpu_memory is not None:
        overrides.append(f"plan.gpu_memory_gb={args.gpu_memory}")
    if args.gpus is not None:
        overrides.append(f"plan.gpus={args.gpus}")
    spec = load_spec(args.spec, overrides)
    from workflows.plan import describe

    print(describe(spec))
    return 0


def main_run(argv: list[str]) -> int:
    p = Parser(prog="drope run", description="run the DroPE workflow here (embedded defaults)")
    p.add_argument("spec", help="a preset name (drope presets) or a YAML spec file")
    p.add_argument("--run-id", default="", help="name the run (default: <name>-<time>-<random>)")
    _take_over_arg(p)
    _spec_args(p)
    _force_arg(p)
    args = p.parse_args(argv)
    spec = load_spec(args.spec, args.overrides)
    from workflows.plan import refuse_unless_fits
    from workflows.tracking import check_reachable, resolve_tracking_uri

    refuse_unless_fits(spec, args.force)  # before a run record exists

    check_reachable(resolve_tracking_uri(spec.tracking.uri, drope_home()))  # before a run record exists
    run_id, run_uri = _new_run(spec, args.run_id)
    return _execute(spec, run_id, run_uri, args.take_over)


def _load_run_spec(run_uri: str, overrides: list[str]) -> WorkflowSpec:
    """The run's spec.yaml with --set overrides applied."""
    tree = load_yaml(Ledger(run_uri).read_spec())
    return from_dict(WorkflowSpec, apply_overrides(tree, overrides))


def main_resume(argv: list[str]) -> int:
    p = Parser(prog="drope resume", description="finish a run: finished stages are skipped")
    p.add_argument("run_id")
    p.add_argument("--storage", default="", help="storage root of the run when this box has no index entry")
    p.add_argument("--address", default="", help="resubmit to this Ray cluster as a job instead of running here")
    _take_over_arg(p)
    _spec_args(p)
    args = p.parse_args(argv)
    run_uri, _ = find_run(args.run_id, args.storage)
    spec = _load_run_spec(run_uri, args.overrides)
    if args.overrides:
        Ledger(run_uri).write_spec(yaml.safe_dump(to_dict(spec), sort_keys=False))
    if args.address:
        from workflows.submit import submit_run

        print(submit_run(spec, args.run_id, run_uri, args.address, take_over=args.take_over))
        return 0
    remember(args.run_id, run_uri)
    return _execute(spec, args.run_id, run_uri, args.take_over)


def main_submit(argv: list[str]) -> int:
    p = Parser(prog="drope submit", description="submit the workflow to a Ray cluster as a job")
    p.add_argument("spec")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--run-id", default="")
    _spec_args(p)
    _force_arg(p)
    args = p.parse_args(argv)
    spec = load_spec(args.spec, args.overrides)
    from workflows.plan import refuse_unless_fits
    from workflows.submit import check_address, submit_run

    refuse_unless_fits(spec, args.force)

    check_address(args.address)
    run_id, run_uri = _new_run(spec, args.run_id)
    submit_run(spec, run_id, run_uri, args.address)
    print(run_id)
    return 0


def main_status(argv: list[str]) -> int:
    p = Parser(prog="drope status", description="each stage's state, attempt, duration, output")
    p.add_argument("run_id")
    p.add_argument("--storage", default="")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    run_uri, entry = find_run(args.run_id, args.storage)
    ledger = Ledger(run_uri)
    run = ledger.read_run()
    spec = spec_from_yaml(ledger.read_spec())
    recs = ledger.records(stage_names(spec))
    job = None
    if entry.get("address") and entry.get("submission_id"):
        from workflows.submit import job_status

        job = job_status(entry["address"], entry["submission_id"])
    if args.json:
        print(json.dumps({"run": run, "job": job, "stages": [vars(r) | {"duration": r.duration} for r in recs]}, default=str))
        return 0
    print(f"run {args.run_id}: {run.get('status')} (attempts {run.get('attempts')})" + (f", ray job {job}" if job else ""))
    print(f"{'stage':<16} {'status':<10} {'attempt':>7} {'duration':>9}  output")
    for r in recs:
        dur = f"{r.duration:.0f}s" if r.duration is not None else "-"
        line = f"{r.stage:<16} {r.status:<10} {r.attempts:>7} {dur:>9}  {r.output or '-'}"
        print(line + (f"\n{'':<16} error: {r.error}" if r.error else ""))
    return 0


def main_lineage(argv: list[str]) -> int:
    p = Parser(prog="drope lineage", description="base model -> ... -> evaluation, with MLflow ids")
    p.add_argument("run_id")
    p.add_argument("--storage", default="")
    args = p.parse_args(argv)
    run_uri, _ = find_run(args.run_id, args.storage)
    ledger = Ledger(run_uri)
    run = ledger.read_run()
    spec = spec_from_yaml(ledger.read_spec())
    print(f"run {args.run_id}  MLflow experiment {run.get('experiment_id', '?')}, parent run {run.get('parent_run_id', '?')}")
    source = "" if spec.pretrain.enabled else f" <- {spec.model.source}"
    for i, r in enumerate(ledger.records(stage_names(spec))):
        arrow = "   " if i == 0 else "-> "
        model = f" model {r.model_id}" if r.model_id else ""
        print(f"{arrow}{stages.by_name(r.stage).label:<20} [{r.status}] run {r.mlflow_run_id or '-'}{model}  {r.output or ''}"
              + (source if i == 0 else ""))
    return 0
