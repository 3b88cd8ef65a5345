"""The DroPE workflow driver: a straight line over the stages, with the ledger deciding what runs.

    fetch (or pretrain) -> drop_rope -> recalibrate -> fit_temperature -> evaluate

Each stage runs as a Ray task (recalibrate launches a Ray Train run from its task; evaluate fans out
over (variant, task, length) as parallel Ray tasks). Stages hand each other URIs and fingerprints
only. A stage whose ledger record says succeeded with the same fingerprint is skipped; anything else
runs (again). Ctrl-C / SIGTERM mark the running stage and its MLflow runs KILLED before exiting.
"""

from __future__ import annotations

import logging
import re
import signal
import time
from pathlib import Path

import yaml

from drope_ops import errors, storage
from drope_ops.errors import DropeError
from workflows import stages as stage_fns
from workflows.ledger import FAILED, KILLED, RUNNING, SUCCEEDED, Ledger, fingerprint
from workflows.spec import WorkflowSpec, to_dict
from workflows.tracking import MlflowMetricsSink, Tracker, check_reachable, resolve_tracking_uri

log = logging.getLogger("drope.pipeline")

# stage -> (spec sections that define it, upstream stages, LoggedModel name of its checkpoint or None)
STAGES = {
    "pretrain": (("pretrain", "data"), (), "pretrained"),
    "fetch": (("model",), (), "base"),
    "drop_rope": (("drop_rope", "model.original_context"), ("source",), "dropped"),
    "recalibrate": (("recalibrate", "data"), ("drop_rope",), "recalibrated"),
    "fit_temperature": (("fit_temperature", "data"), ("recalibrate",), "temperature-fitted"),
    "evaluate": (("evaluate", "data", "model.original_context"), ("fit_temperature", "source"), None),
}


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception so the running stage is marked killed, like Ctrl-C."""


def stage_names(spec: WorkflowSpec) -> list[str]:
    first = "pretrain" if spec.pretrain.enabled else "fetch"
    return [first, "drop_rope", "recalibrate", "fit_temperature", "evaluate"]


def stage_spec(spec: WorkflowSpec, stage: str) -> dict:
    tree = to_dict(spec)
    out = {}
    for section in STAGES[stage][0]:
        node = tree
        for key in section.split("."):
            node = node[key]
        out[section] = node
    return out


def _resolve_ray(spec: WorkflowSpec):
    """Join spec.ray.address, else the cluster of the Ray job we run in, else start a local Ray."""
    import os

    import ray

    if not ray.is_initialized():
        if spec.ray.address:
            kwargs = {"address": spec.ray.address}
        elif os.environ.get("RAY_ADDRESS"):
            kwargs = {}  # inside a Ray job (drope submit): the job's cluster
        else:
            # the dashboard (loopback only) serves the state API Ray Train's placement-group cleaner
            # polls: without it, that cleaner logs a warning every second of training. None: start
            # it, but a dashboard that fails to come up does not stop the run.
            kwargs = {"address": "local", "num_cpus": spec.ray.num_cpus, "include_dashboard": None,
                      "dashboard_host": "127.0.0.1"}
        try:
            ray.init(log_to_driver=True, **kwargs)
        except (ConnectionError, ValueError) as e:
            raise DropeError(f"ray.address {spec.ray.address!r}: nothing answers there ({e}); start a head "
                             "(cluster/local-up.sh) or leave ray.address empty for a local Ray") from None
    return ray


def _unwrap(e: BaseException) -> BaseException:
    """A DropeError raised inside a Ray task comes back wrapped: give the user the one line."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, DropeError):
        return cause
    # Ray Train reports a worker's DropeError only as traceback text: recover its one line
    found = re.findall(r"drope_ops\.errors\.(\w+Error): ([^\n]+)", str(e))
    cls = getattr(errors, found[-1][0], None) if found else None
    if isinstance(cls, type) and issubclass(cls, DropeError):
        return cls(found[-1][1].strip())
    return e


def run_pipeline(spec: WorkflowSpec, run_id: str, run_uri: str, home: Path) -> dict:
    """Run (or resume) the workflow `run_id` whose records live at `run_uri`. Returns the records."""
    tracking_uri = resolve_tracking_uri(spec.tracking.uri, home)
    check_reachable(tracking_uri)
    ledger = Ledger(run_uri)
    spec_yaml = yaml.safe_dump(to_dict(spec), sort_keys=False)
    run = ledger.read_run() if ledger.exists() else {"run_id": run_id, "name": spec.name, "attempts": 0}
    tracker = Tracker(tracking_uri, spec.tracking.experiment or spec.name, home / "mlartifacts")
    ray = _resolve_ray(spec)

    run["attempts"] += 1
    run["parent_run_id"] = tracker.start_parent(run_id, to_dict(spec), spec_yaml, run.get("parent_run_id", ""))
    run.update(status=RUNNING, tracking_uri=tracking_uri, experiment_id=tracker.experiment_id)
    ledger.write_spec(spec_yaml)
    ledger.write_run(run)
    parent = run["parent_run_id"]

    def on_sigterm(signum, frame):
        raise Terminated(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    records, status = {}, SUCCEEDED
    try:
        for stage in stage_names(spec):
            upstream = [("pretrain" if spec.pretrain.enabled else "fetch") if u == "source" else u
                        for u in STAGES[stage][1]]
            inputs = {u: records[u] for u in upstream}
            fp = fingerprint(stage, stage_spec(spec, stage), [r.fingerprint for r in inputs.values()])
            done = ledger.should_skip(stage, fp)
            if done is not None:
                log.info("[%s] already succeeded with this fingerprint: skipped (output %s)", stage, done.output)
                print(f"[drope] {stage}: skipped, done in an earlier attempt ({done.output})", flush=True)
                records[stage] = done
                continue
            records[stage] = _run_stage(ray, spec, stage, fp, inputs, ledger, tracker, run_id, run_uri, parent)
    except BaseException as e:
        status = KILLED if isinstance(e, KeyboardInterrupt) else FAILED
        raise _unwrap(e) from None
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        run["status"] = status
        ledger.write_run(run)
        tracker.end_run(parent, status)
    return records


def _run_stage(ray, spec, stage, fp, inputs, ledger, tracker, run_id, run_uri, parent):
    child = tracker.start_stage(parent, run_id, stage, ledger.get(stage).attempts + 1, stage_spec(spec, stage))
    rec = ledger.start(stage, fp, child)
    out_uri = storage.join(run_uri, "stages", stage, fp[:12])
    print(f"[drope] {stage}: running (attempt {rec.attempts}) -> {out_uri}", flush=True)
    t0 = time.time()
    sink = MlflowMetricsSink(tracker.uri, child)
    ctx = stage_fns.StageContext(
        run_id=run_id, run_uri=run_uri, fingerprint=fp, output=out_uri, sink=sink,
        inputs={k: v.output for k, v in inputs.items()}, input_results={k: v.result for k, v in inputs.items()},
    )
    fn = getattr(stage_fns, f"run_{stage}")
    task = ray.remote(num_cpus=0, max_retries=0)(fn).remote(spec, ctx)
    try:
        result = ray.get(task)
    except BaseException as e:
        err = _unwrap(e)
        status = KILLED if isinstance(e, KeyboardInterrupt) else FAILED
        if status == KILLED:
            ray.cancel(task, force=True)
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        ledger.finish(rec, status, error=msg)
        tracker.end_run(child, status, error=msg)
        print(f"[drope] {stage}: {status.upper()} after {time.time() - t0:.0f}s: {msg}", flush=True)
        raise
    model_id = ""
    name = STAGES[stage][2]
    if name:
        parent_model = next((r.model_id for r in inputs.values() if r.model_id), "")
        model_id = tracker.register_checkpoint(
            child, name, out_uri, fingerprint=fp, parent_model_id=parent_model,
            data=spec.data.source if stage in ("pretrain", "recalibrate", "fit_temperature") else "",
            extra={"stage": stage, "run_id": run_id},
        )
    if stage in ("pretrain", "recalibrate", "fit_temperature"):
        tracker.log_dataset(child, f"{spec.data.source}", spec.data.source, fp, "training" if stage != "fit_temperature" else "heldout")
    tracker.log_metrics(child, {k: v for k, v in result.items() if isinstance(v, (int, float))})
    ledger.finish(rec, SUCCEEDED, output=out_uri, result=result, model_id=model_id)
    tracker.end_run(child, SUCCEEDED)
    print(f"[drope] {stage}: succeeded in {time.time() - t0:.0f}s", flush=True)
    return ledger.get(stage)


def spec_from_yaml(text: str) -> WorkflowSpec:
    from workflows.spec import WorkflowSpec, from_dict

    return from_dict(WorkflowSpec, yaml.safe_load(text))

