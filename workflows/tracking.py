"""MLflow tracking for workflow runs: a parent run per workflow run, a child run per stage attempt,
every checkpoint an MLflow 3 external LoggedModel whose lineage (source run, parent model, data) is
recorded, datasets logged as run inputs, system metrics on.

Only the driver (and rank 0 of a training run, through MlflowMetricsSink) writes. Secrets never reach
MLflow: params come from the spec, which holds none, and are scrubbed by `redact` anyway (by what a
value is: secret fields, HF/AWS key shapes, URI passwords; not by a word such as "token" in its key).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from drope_ops.errors import SpecError
from workflows.tracking_outage import (MetricsBuffer, PatientClient, bound_retries, call_with_timeout, is_outage,
                                       patiently)

# Redaction by what a value is, not by a word in its key: fields that hold a secret (their last key
# component), and values shaped like one (HF tokens, AWS keys, a password inside a URI).
_SECRET_FIELDS = re.compile(
    r"(^|_)(hf_token|api_key|secret|secret_key|secret_access_key|access_key_id|password|passwd|"
    r"credentials?|session_token|auth_token|access_token)$", re.I)
_SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}|\b(AKIA|ASIA)[0-9A-Z]{16}\b|(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+=]*[A-Z])(?=[A-Za-z0-9/+=]*[a-z])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])")
_URI_PASSWORD = re.compile(r"(://[^/:@\s]+:)[^@\s/]+@")
# The tag MLflow's UI reads to open an experiment in the model-training view (not the GenAI one).
EXPERIMENT_KIND = "mlflow.experimentKind"
STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def resolve_tracking_uri(configured: str, home: Path) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        home.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{(home / 'mlflow.db').resolve()}"
    return uri


def check_reachable(uri: str) -> None:
    """Fail fast with one line when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
            if r.status == 200:
                return
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise SpecError(
            f"tracking.uri {uri} is unreachable ({reason}): start the server (cluster/local-up.sh) "
            "or set tracking.uri / MLFLOW_TRACKING_URI to a running one"
        ) from None
    raise SpecError(f"tracking.uri {uri} answered /health with an error: check the MLflow server")


def redact_value(key: str, value: str) -> str:
    if _SECRET_FIELDS.search(key.rsplit(".", 1)[-1]):
        return "***"
    value = _URI_PASSWORD.sub(r"\1***@", value)
    return _SECRET_VALUE.sub("***", value)


def redact(params: dict) -> dict:
    return {k: redact_value(k, v) if isinstance(v, str) else v for k, v in params.items()}


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return redact({k: v[:6000] for k, v in out.items()})


def git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


OUTAGE_BACKOFF_S = 30  # after a failed call, buffer without trying the server for this long


def _say(line: str) -> None:
    """One line on stdout. Not print(): in a Ray Train worker (rank 0 runs this sink) Ray Train 2.60
    patches print to tee each line to stdout and to its logger, so a print shows up twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class MlflowMetricsSink:
    """Picklable metrics sink for stages (rank 0 of training, evaluation tasks): logs to one run.

    With `buffer_uri` (the run's storage), metrics the tracking server does not take (its retry budget
    spent) go to a MetricsBuffer there and are replayed by the next call that gets through."""

    def __init__(self, tracking_uri: str, run_id: str, buffer_uri: str = ""):
        self.tracking_uri, self.run_id, self.buffer_uri = tracking_uri, run_id, buffer_uri
        self._client, self._down_until, self._buffered = None, 0.0, False

    def log_metrics(self, metrics: dict, step: int, model_id: str = "") -> None:
        """`metrics` at `step`; with `model_id`, each is also a metric of that LoggedModel (its page)."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        bound_retries()
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, int(step), model_id=model_id or None) for k, v in metrics.items()
                 if isinstance(v, (int, float))]
        if not batch:
            return
        if self.buffer_uri and time.monotonic() < self._down_until:
            return self._buffer(batch)
        try:
            if self._buffered:
                MetricsBuffer(self.buffer_uri).replay(self._client, self.run_id)
                self._buffered = False
                _say(f"[drope] tracking server {self.tracking_uri} answers again: buffered metrics replayed")
            self._client.log_batch(self.run_id, metrics=batch)
        except Exception as e:
            if not (self.buffer_uri and is_outage(e)):
                raise
            self._down_until = time.monotonic() + OUTAGE_BACKOFF_S
            self._buffer(batch)

    def _buffer(self, batch) -> None:
        buf = MetricsBuffer(self.buffer_uri)
        buf.put(self.run_id, [(m.key, m.value, m.timestamp, m.step, m.model_id) for m in batch])
        if not self._buffered:
            _say(f"[drope] tracking server {self.tracking_uri} is not answering: metrics of MLflow run {self.run_id} "
                 f"are buffered to {buf.root} and replayed when it answers (or by `drope resume`)")
        self._buffered = True

    def fill_history(self, history: list[dict]) -> None:
        """Log the rows of `history` ({"step": N, metric: value, ...}) whose step this run lacks."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        bound_retries()
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        keys = {k for h in history for k in h if k != "step"}
        try:
            have = {k: {m.step for m in self._client.get_metric_history(self.run_id, k)} for k in keys}
        except Exception as e:
            if not (self.buffer_uri and is_outage(e)):
                raise
            print(f"[drope] tracking server {self.tracking_uri} is not answering: the restored loss history is "
                  "not back-filled in MLflow this attempt", flush=True)
            return
        ts = int(time.time() * 1000)
        rows = [Metric(k, float(v), ts, int(h["step"])) for h in history for k, v in h.items()
                if k != "step" and isinstance(v, (int, float)) and int(h["step"]) not in have[k]]
        for i in range(0, len(rows), 1000):  # MLflow's log_batch limit
            self._client.log_batch(self.run_id, metrics=rows[i : i + 1000])

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        from mlflow import MlflowClient

        bound_retries()
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        try:
            self._client.log_artifact(self.run_id, path, artifact_path)
        except Exception as e:
            if not (self.buffer_uri and is_outage(e)):
                raise
            print(f"[drope] tracking server {self.tracking_uri} is not answering: {Path(path).name} not logged to "
                  f"MLflow run {self.run_id} (the stage's output in storage has it)", flush=True)

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        """`rows` (one dict a row) as an MLflow table artifact: the run's Artifacts tab shows it as a
        table, and mlflow.load_table reads it back."""
        from mlflow import MlflowClient

        bound_retries()
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        try:
            self._client.log_table(self.run_id, {c: [r.get(c) for r in rows] for c in columns}, artifact_file)
        except Exception as e:
            if not (self.buffer_uri and is_outage(e)):
                raise
            print(f"[drope] tracking server {self.tracking_uri} is not answering: table {artifact_file} not logged "
                  f"to MLflow run {self.run_id} (the stage's output in storage has results.json)", flush=True)

    def __getstate__(self):
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "buffer_uri": self.buffer_uri,
                "_client": None, "_down_until": 0.0, "_buffered": self._buffered}


END_RUN_TIMEOUT_S = 10  # end_run (system-metrics monitor included) never holds the driver longer


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None, run_uri: str = ""):
        import mlflow
        from mlflow import MlflowClient

        bound_retries()
        self.uri, self.run_uri = uri, run_uri
        mlflow.set_tracking_uri(uri)
        self.client = PatientClient(MlflowClient(uri), uri)
        location = None
        if artifact_root is not None and not uri.startswith(("http://", "https://")):
            artifact_root.mkdir(parents=True, exist_ok=True)
            location = artifact_root.resolve().as_uri()
        self.experiment_id = self._get_or_create_experiment(experiment, location)
        self._monitors = {}

    def _get_or_create_experiment(self, name: str, location: str | None) -> str:
        """The experiment's id; another driver creating it at the same moment is fine (re-get it)."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:  # created with its kind in one step: a separate set_experiment_tag races the other drivers
                self.client.create_experiment(name, artifact_location=location,
                                              tags={EXPERIMENT_KIND: "custom_model_development"})
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(e).lower():
                    raise
            exp = self.client.get_experiment_by_name(name)
        if EXPERIMENT_KIND not in exp.tags:  # an experiment made without it; a kind the user chose is kept
            try:
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, "custom_model_development")
            except MlflowException:  # two drivers tagging at once: the server refuses the second insert
                if EXPERIMENT_KIND not in self.client.get_experiment(exp.experiment_id).tags:
                    raise
        return exp.experiment_id

    def sink(self, rid: str) -> MlflowMetricsSink:
        return MlflowMetricsSink(self.uri, rid, self.run_uri)

    def replay_buffered(self, patient: bool = True) -> None:
        """Log what was buffered while the server was away (`drope resume`; after each stage, impatiently)."""
        if self.run_uri:
            buf = MetricsBuffer(self.run_uri)
            if buf.pending():
                n = buf.replay(self.client if patient else self.client.raw)
                print(f"[drope] replayed {n} buffered metrics from {buf.root} to {self.uri}", flush=True)

    def close_stale(self, run_id: str, keep: str, statuses: dict[str, str]) -> None:
        """End every MLflow run of workflow run `run_id` left RUNNING by an earlier attempt (except
        `keep`): as the ledger says (`statuses`: MLflow run id -> failed / killed), else KILLED."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`drope.run_id` = '{run_id}' and "
                                       "attributes.status = 'RUNNING'", max_results=1000)
        for r in runs:
            if r.info.run_id != keep:
                status = statuses.get(r.info.run_id, "killed")
                self.client.set_terminated(r.info.run_id, status=STATUS.get(status, "KILLED"))
                print(f"[drope] closed MLflow run {r.data.tags.get('mlflow.runName', r.info.run_id)} an earlier "
                      f"attempt left RUNNING: {STATUS.get(status, 'KILLED')}", flush=True)

    # -- runs -------------------------------------------------------------------------------------
    def start_parent(self, run_id: str, spec_tree: dict, spec_yaml: str, existing: str = "") -> str:
        if existing:
            self.client.update_run(existing, status="RUNNING")
            return existing
        run = self.client.create_run(
            self.experiment_id, run_name=run_id,
            tags={"drope.run_id": run_id, "drope.kind": "workflow", "mlflow.source.git.commit": git_revision()},
        )
        rid = run.info.run_id
        for chunk in _chunks(flatten(spec_tree)):
            self.client.log_batch(rid, params=chunk)
        self.log_text(rid, spec_yaml, "spec.yaml")
        return rid

    def start_stage(self, parent_id: str, run_id: str, stage: str, attempt: int, params: dict) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=f"{stage}#{attempt}",
            tags={"mlflow.parentRunId": parent_id, "drope.run_id": run_id, "drope.stage": stage,
                  "drope.attempt": str(attempt)},
        )
        rid = run.info.run_id
        for chunk in _chunks(flatten(params)):
            self.client.log_batch(rid, params=chunk)
        self._start_system_metrics(rid)
        return rid

    def end_run(self, rid: str, status: str, error: str = "") -> None:
        """Close the run within END_RUN_TIMEOUT_S; a server that does not answer gets the close buffered
        (replayed by `drope resume`), never a driver blocked on it."""
        monitor = self._monitors.pop(rid, None)
        if monitor is not None:  # system metrics are best effort; never mask the stage's own outcome
            call_with_timeout(monitor.finish, END_RUN_TIMEOUT_S / 2, "system-metrics")

        def close():
            if error:
                self.client.raw.set_tag(rid, "drope.error", error[:4000])
            self.client.raw.set_terminated(rid, status=STATUS.get(status, status))

        if not call_with_timeout(close, END_RUN_TIMEOUT_S, "end-run"):
            if self.run_uri:
                MetricsBuffer(self.run_uri).put_close(rid, STATUS.get(status, status), error)
            print(f"[drope] tracking server {self.uri} did not take the end of MLflow run {rid} "
                  f"({STATUS.get(status, status)}) within {END_RUN_TIMEOUT_S}s: `drope resume` closes it", flush=True)

    def _start_system_metrics(self, rid: str) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(rid, sampling_interval=5, tracking_uri=self.uri)
            monitor.start()
            self._monitors[rid] = monitor
        except Exception:  # psutil missing or monitor unsupported here: training still runs
            pass

    # -- artifacts, data, models ------------------------------------------------------------------
    def log_text(self, rid: str, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(text)
            self.client.log_artifact(rid, str(p))

    def log_artifact(self, rid: str, path: str, artifact_path: str | None = None) -> None:
        if path and Path(path).exists():
            self.client.log_artifact(rid, path, artifact_path)

    def log_metrics(self, rid: str, metrics: dict, step: int = 0) -> None:
        self.sink(rid).log_metrics(metrics, step)

    def log_dataset(self, rid: str, name: str, source: str, digest: str, context: str) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest[:36], source_type="drope", source=json.dumps({"uri": source}))
        self.client.log_inputs(rid, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])

    def register_checkpoint(self, rid: str, name: str, uri: str, *, fingerprint: str,
                            parent_model_id: str = "", data: str = "", extra: dict | None = None) -> str:
        """An external LoggedModel for a checkpoint that stays in the run's storage."""
        import mlflow
        from mlflow.entities import LoggedModelInput, LoggedModelOutput

        tags = {"drope.uri": uri, "drope.fingerprint": fingerprint, "drope.parent_model_id": parent_model_id,
                "drope.data": data}
        model = patiently(self.uri, "create_external_model", mlflow.create_external_model,
            name=name, source_run_id=rid, tags=tags, params=flatten(extra or {}), model_type="drope-checkpoint",
            experiment_id=self.experiment_id,
        )
        self.client.log_outputs(rid, [LoggedModelOutput(model.model_id, step=0)])
        if parent_model_id:
            self.client.log_inputs(rid, models=[LoggedModelInput(parent_model_id)])
        return model.model_id


def _chunks(params: dict, n: int = 90):
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), n):
        yield items[i : i + n]
