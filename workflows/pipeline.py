"""The DroPE workflow driver: a loop over the stages of workflows/stages, the ledger deciding what runs.

    fetch (or pretrain) -> drop_rope -> recalibrate -> fit_temperature -> evaluate

The driver knows no stage by name: each stage module's STAGE says which spec sections make its
fingerprint, which stages it reads, which LoggedModel it writes and which dataset it logs. Each stage
runs as a Ray task (recalibrate launches a Ray Train run from its task; fit_temperature and evaluate
fan out as Ray tasks). Stages hand each other URIs and fingerprints only. A stage whose ledger record
says succeeded with the same fingerprint is skipped; anything else runs (again). Ctrl-C / SIGTERM
mark the running stage and its MLflow runs KILLED before exiting. A DropeError raised in a stage
task (or a Ray Train worker under it) reaches the user as itself: one line.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import yaml

from drope_ops import storage
from drope_ops.errors import DropeError, SpecError, one_line
from workflows import stages
from workflows.attempt import RunBooks, StageAttempt
from workflows.lease import LeaseLost, RunLease
from workflows.ray_errors import raised
from workflows.ledger import FAILED, KILLED, RUNNING, SUCCEEDED, Ledger, StageRecord, fingerprint
from workflows.spec import WorkflowSpec, to_dict
from workflows.stage import Stage
from workflows.tracking import Tracker, check_reachable, resolve_tracking_uri

log = logging.getLogger("drope.pipeline")


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception so the running stage is marked killed, like Ctrl-C."""


def stage_names(spec: WorkflowSpec) -> list[str]:
    return [s.name for s in stages.enabled(spec)]


def stage_spec(spec: WorkflowSpec, stage: str) -> dict:
    """The spec sections that make `stage`'s fingerprint, as plain values."""
    tree, out = to_dict(spec), {}
    for section in stages.by_name(stage).sections:
        node = tree
        for key in section.split("."):
            node = node[key]
        out[section] = node
    return out


def chain(spec: WorkflowSpec) -> list[tuple[Stage, dict, str]]:
    """The stages this spec runs, in order, each with its spec sections and its fingerprint: its own
    sections and its inputs' fingerprints, so a changed section invalidates that stage and everything
    downstream of it, nothing upstream (what resume compares with the ledger)."""
    out, fps = [], {}
    for stage in stages.enabled(spec):
        params = stage_spec(spec, stage.name)
        fps[stage.name] = fingerprint(stage.name, params, [fps[name] for name in stage.inputs])
        if stage.role:
            fps[stage.role] = fps[stage.name]
        out.append((stage, params, fps[stage.name]))
    return out


def _resolve_ray(spec: WorkflowSpec):
    """Join spec.ray.address, else the cluster of the Ray job we run in, else start a local Ray."""
    import ray

    if not ray.is_initialized():
        if spec.ray.address:
            from workflows.submit import check_ray_address

            if spec.ray.address not in ("auto", "local"):
                check_ray_address(spec.ray.address)  # bounded: ray.init retries an absent head for minutes
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


def check_cluster_reach(spec: WorkflowSpec, run_uri: str, tracking_uri: str, nodes: int) -> None:
    """On several nodes, only what every node can reach may be used: S3 storage, a tracking server."""
    if nodes < 2:
        return
    if not storage.is_s3(run_uri) and not spec.storage.shared_filesystem:
        raise SpecError(f"storage.root {run_uri.rsplit('/', 1)[0]} is a local directory, but the Ray cluster has "
                        f"{nodes} nodes that do not share it: set storage.root to s3://BUCKET/PREFIX (or set "
                        f"storage.shared_filesystem: true if every node mounts it)")
    if not tracking_uri.startswith(("http://", "https://", "databricks")):
        raise SpecError(f"tracking.uri {tracking_uri} is a file only this node can open, but the Ray cluster has "
                        f"{nodes} nodes: run an MLflow server (cluster/local-up.sh) and set tracking.uri to it")


def _alive_nodes(ray) -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def run_pipeline(spec: WorkflowSpec, run_id: str, run_uri: str, home: Path, take_over: bool = False) -> dict:
    """Run (or resume) the workflow `run_id` whose records live at `run_uri`. Returns the records.

    The run's lease is taken first: a second driver of the same run stops here, touching nothing."""
    with RunLease(run_uri, run_id).acquire(take_over=take_over) as lease:
        try:
            return _drive(spec, run_id, run_uri, home, lease)
        except BaseException:
            if lease.lost:  # taken over: its heartbeat stopped the stage (KeyboardInterrupt); say why, in one line
                raise LeaseLost(lease.lost_line()) from None
            raise


def _drive(spec: WorkflowSpec, run_id: str, run_uri: str, home: Path, lease: RunLease) -> dict:
    ledger = Ledger(run_uri, guard=lease.check)  # a driver taken over writes nothing more
    tracking_uri = resolve_tracking_uri(spec.tracking.uri, home)
    run = ledger.read_run() if ledger.exists() else {"run_id": run_id, "name": spec.name, "attempts": 0}
    attempts = run.get("attempts", 0) + 1
    try:  # anything failing before the first stage still ends in a FAILED run record, one line
        check_reachable(tracking_uri)
        ray = _resolve_ray(spec)
        spec_yaml = yaml.safe_dump(to_dict(spec), sort_keys=False)
        tracker = Tracker(tracking_uri, spec.tracking.experiment or spec.name, home / "mlartifacts", run_uri=run_uri)
        parent = tracker.start_parent(run_id, to_dict(spec), spec_yaml, run.get("parent_run_id", ""))
        _tidy_earlier_attempts(tracker, ledger, run_id, parent, stage_names(spec))
    except BaseException as e:
        err = raised(e)
        stopped = isinstance(e, (KeyboardInterrupt, SystemExit))  # Ctrl-C, SIGTERM (Ray's handler exits)
        ledger.update_run(run_id=run_id, name=spec.name, attempts=attempts, tracking_uri=tracking_uri,
                          status=KILLED if stopped else FAILED, error=one_line(err))
        if stopped or isinstance(err, DropeError):
            raise err from None
        raise DropeError(f"run {run_id} could not start: {type(err).__name__}: {one_line(err)}") from None
    run = ledger.update_run(run_id=run_id, name=spec.name, attempts=attempts, parent_run_id=parent,
                            status=RUNNING, tracking_uri=tracking_uri, experiment_id=tracker.experiment_id, error="")
    ledger.write_spec(spec_yaml)
    books = RunBooks(spec, run_id, run_uri, ledger, tracker, parent)

    def on_sigterm(signum, frame):
        raise Terminated(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    records: dict[str, StageRecord] = {}
    status, error = SUCCEEDED, ""
    try:
        # refused with the run and its MLflow parent marked FAILED, before any stage ran
        check_cluster_reach(spec, run_uri, tracking_uri, _alive_nodes(ray))
        for stage, params, fp in chain(spec):
            inputs = {name: records[name] for name in stage.inputs}
            done = ledger.should_skip(stage.name, fp)
            if done is not None:
                log.info("[%s] already succeeded with this fingerprint: skipped (output %s)", stage.name, done.output)
                print(f"[drope] {stage.name}: skipped, done in an earlier attempt ({done.output})", flush=True)
            else:
                done = _run_stage(ray, books, stage, inputs, params, fp)
            records[stage.name] = done
            if stage.role:
                records[stage.role] = done
    except BaseException as e:
        status = KILLED if isinstance(e, KeyboardInterrupt) else FAILED
        error = one_line(raised(e))
        raise raised(e) from None
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        if not lease.lost:  # the run and its parent MLflow run belong to the driver that took over
            ledger.update_run(status=status, error=error)
            tracker.end_run(parent, status)
    return records


def _tidy_earlier_attempts(tracker, ledger, run_id: str, parent: str, names: list[str]) -> None:
    """On resume: replay metrics buffered during a tracking outage, and close the MLflow runs an
    earlier attempt left RUNNING, in the status its ledger record says (KILLED when it says running)."""
    tracker.replay_buffered()
    statuses = {r.mlflow_run_id: r.status for r in ledger.records(names) if r.status in (FAILED, KILLED)}
    tracker.close_stale(run_id, parent, statuses)


def _run_stage(ray, books: RunBooks, stage: Stage, inputs: dict, params: dict, fp: str) -> StageRecord:
    """Start the stage's attempt (ledger record + MLflow run), run it as a Ray task, record how it ended."""
    attempt = StageAttempt.start(books, stage, inputs, params, fp)
    task = ray.remote(num_cpus=0, max_retries=0)(stage.run).remote(books.spec, attempt.context())
    try:
        result = ray.get(task)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        ray.cancel(task, force=True)
        attempt.killed(e)
        raise
    except BaseException as e:
        attempt.fail(raised(e))
        raise
    return attempt.succeed(result)
