"""`drope compare RUN_ID [RUN_ID ...]`: runs side by side, one column each.

    drope compare smollm2-a smollm2-b            # a table in the terminal
    drope compare smollm2-a smollm2-b --json     # the same, machine-readable

Per run: the recalibration's steps and final loss and the fitted c (from the run's ledger), the
recalibration's tokens (its MLflow run's `tokens_seen`), and every evaluation cell, `{task}/{variant}`
at each length in tokens (the metrics of the evaluate stage's MLflow run; its results.json in the
run's storage when MLflow has none or does not answer).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from drope_ops import storage
from drope_ops.errors import one_line
from workflows.commands.parser import Parser
from workflows.ledger import Ledger
from workflows.runs import find_run
from workflows.spec import spec_from_yaml

FACTS = (("recalibration_steps", "recalibration steps"), ("recalibration_tokens", "recalibration tokens"),
         ("final_loss", "final loss"), ("logit_scale_c", "logit_scale_c"))


def run_summary(run_id: str, storage_flag: str = "") -> dict:
    """One run's facts: its ledger records, and from MLflow its evaluation cells {key: {length: score}}
    and the recalibration's tokens."""
    from workflows.pipeline import stage_names

    run_uri, _ = find_run(run_id, storage_flag)
    ledger = Ledger(run_uri)
    run = ledger.read_run()
    recs = {r.stage: r for r in ledger.records(stage_names(spec_from_yaml(ledger.read_spec())))}
    recal, fit, ev = (recs[s].result if s in recs else {} for s in ("recalibrate", "fit_temperature", "evaluate"))
    tracked = _from_mlflow(run.get("tracking_uri", ""), recs)
    cells, source = (tracked["cells"], "mlflow") if tracked.get("cells") else _results_json(recs.get("evaluate"))
    return {"run_id": run_id, "status": run.get("status", ""), "tracking_uri": run.get("tracking_uri", ""),
            "mlflow_parent_run_id": run.get("parent_run_id", ""),
            "recalibration_steps": recal.get("steps"), "recalibration_tokens": tracked.get("tokens_seen"),
            "final_loss": recal.get("final_loss"), "logit_scale_c": fit.get("c"),
            "cells": cells, "cells_from": source, "headline": ev.get("headline", {})}


def _from_mlflow(tracking_uri: str, recs: dict) -> dict:
    """{"cells": the evaluate run's `{task}/{variant}` metrics by length, "tokens_seen": the recalibrate
    run's last}; {} when the tracking store is not here (another box's sqlite file) or does not answer."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from workflows.tracking_outage import bound_retries, is_outage

    if not tracking_uri or (tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[10:]).is_file()):
        return {}
    bound_retries()
    client, out = MlflowClient(tracking_uri), {}
    ev, recal = recs.get("evaluate"), recs.get("recalibrate")
    try:
        if ev is not None and ev.status == "succeeded" and ev.mlflow_run_id:
            keys = [k for k in client.get_run(ev.mlflow_run_id).data.metrics if "/" in k and not k.startswith("system/")]
            out["cells"] = {k: {str(m.step): m.value for m in client.get_metric_history(ev.mlflow_run_id, k)}
                            for k in keys}
        if recal is not None and recal.mlflow_run_id:
            out["tokens_seen"] = client.get_run(recal.mlflow_run_id).data.metrics.get("tokens_seen")
    except Exception as e:
        if not (is_outage(e) or isinstance(e, MlflowException)):
            raise
        print(f"drope compare: {tracking_uri} did not give the runs ({one_line(e)[:200]}): cells from results.json",
              file=sys.stderr)
    return out


def _results_json(record) -> tuple[dict, str]:
    """The cells of an evaluate record's results.json in the run's storage, or none."""
    if record is None or record.status != "succeeded":
        return {}, ""
    cells = {}
    for r in json.loads(storage.read_bytes(storage.join(record.output, "results.json")))["results"]:
        if r.get("score") is not None:
            cells.setdefault(f"{r['task']}/{r['variant']}", {})[str(r["length"])] = r["score"]
    return cells, "results.json"


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.4g}"
    return str(int(x)) if isinstance(x, (int, float)) else str(x)


def table(summaries: list[dict]) -> str:
    """The runs as columns: status, the recalibration and temperature facts, then each cell by length."""
    rows = [("status", [s["status"] for s in summaries])]
    rows += [(label, [_fmt(s[key]) for s in summaries]) for key, label in FACTS]
    cell_rows = sorted({(key, int(length)) for s in summaries for key, by_length in s["cells"].items()
                        for length in by_length})
    rows += [(f"{key} @{length}", [_fmt(s["cells"].get(key, {}).get(str(length))) for s in summaries])
             for key, length in cell_rows]
    width = max(len(label) for label, _ in rows)
    cols = [max(len(s["run_id"]), *(len(vals[i]) for _, vals in rows)) for i, s in enumerate(summaries)]
    lines = [" " * width + "".join(f"  {s['run_id']:>{w}}" for s, w in zip(summaries, cols))]
    lines += [f"{label:<{width}}" + "".join(f"  {v:>{w}}" for v, w in zip(vals, cols)) for label, vals in rows]
    return "\n".join(lines)


def main_compare(argv: list[str]) -> int:
    p = Parser(prog="drope compare", description="runs side by side: evaluation cells, fitted c, recalibration "
                                                 "tokens and final loss")
    p.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    p.add_argument("--storage", default="", help="storage root of the runs when this box has no index entry")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    summaries = [run_summary(r, args.storage) for r in args.run_ids]
    print(json.dumps({"runs": summaries}, default=str) if args.json else table(summaries))
    return 0
