"""When the MLflow server goes away: bounded retries, metrics buffered to the run's storage, replay.

- Every MLflow HTTP call gets a bounded retry budget (MLflow's own MLFLOW_HTTP_REQUEST_MAX_RETRIES /
  _BACKOFF_FACTOR / _TIMEOUT, defaulted here to about 15 s against a refused port instead of MLflow's
  minutes; a user's own values win).
- The driver's calls that a stage cannot go on without (create a run, register a model) wait for the
  server up to DROPE_TRACKING_WAIT_S (default 180 s), saying once what they wait for, then fail in one line.
- Metrics that cannot be logged go to {run_uri}/tracking-buffer/{mlflow_run_id}/*.json (one object a
  batch, so S3 needs no append), announced in one line; the sink's next successful call and `drope
  resume` replay them and delete what was replayed. A run that could not be closed is recorded
  there too and closed on replay.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from drope_ops import storage

RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
BUFFER_DIR = "tracking-buffer"
CLOSES = "_closes"


def bound_retries() -> None:
    for k, v in RETRY_ENV.items():
        os.environ.setdefault(k, v)


def is_outage(e: BaseException) -> bool:
    """True for 'the server did not answer' (connection refused, reset, timeout, 5xx after retries)."""
    import requests

    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    text = str(e)
    return "API request to" in text and ("failed with" in text or "Max retries" in text)


def wait_s() -> float:
    return float(os.environ.get("DROPE_TRACKING_WAIT_S", "180"))


class PatientClient:
    """An MlflowClient whose calls wait (bounded, said once) for a tracking server that went away."""

    def __init__(self, client, uri: str):
        self.raw, self.uri = client, uri

    def __getattr__(self, name):
        fn = getattr(self.raw, name)
        if not callable(fn):
            return fn
        return lambda *a, **kw: patiently(self.uri, name, fn, *a, **kw)


def patiently(uri: str, what: str, fn, *args, **kwargs):
    deadline, said = time.monotonic() + wait_s(), False
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_outage(e):
                raise
            if time.monotonic() > deadline:
                from drope_ops.errors import DropeError

                raise DropeError(f"tracking server {uri} did not answer for {wait_s():.0f}s ({what}): restart it "
                                 "(cluster/local-up.sh), then `drope resume` the run") from None
            if not said:
                print(f"[drope] tracking server {uri} is not answering ({what}): waiting up to {wait_s():.0f}s "
                      "for it (DROPE_TRACKING_WAIT_S)", flush=True)
                said = True
            time.sleep(2)


def call_with_timeout(fn, timeout_s: float, what: str) -> bool:
    """Run fn in a daemon thread; False (and fn left behind) when it takes longer than timeout_s."""
    box = {}

    def target():
        try:
            fn()
            box["ok"] = True
        except Exception as e:  # reported below as not done
            box["error"] = e

    t = threading.Thread(target=target, name=f"drope-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    return bool(box.get("ok"))


class MetricsBuffer:
    """Metrics (and run closes) MLflow did not take, kept in the run's storage until replayed."""

    def __init__(self, run_uri: str):
        self.root = storage.join(run_uri, BUFFER_DIR)

    def put(self, mlflow_run_id: str, rows: list[tuple]) -> str:
        """rows: (key, value, timestamp_ms, step[, model_id]). Returns the URI written."""
        uri = storage.join(self.root, mlflow_run_id, f"{time.time_ns()}-{os.getpid()}-{threading.get_ident()}.json")
        storage.write_bytes(uri, json.dumps([list(r) for r in rows]).encode())
        return uri

    def put_close(self, mlflow_run_id: str, status: str, error: str = "") -> None:
        storage.write_bytes(storage.join(self.root, CLOSES, f"{mlflow_run_id}.json"),
                            json.dumps({"status": status, "error": error}).encode())

    def pending(self, mlflow_run_id: str = "") -> list[str]:
        return storage.list_prefix(storage.join(self.root, mlflow_run_id) if mlflow_run_id else self.root)

    def replay(self, client, mlflow_run_id: str = "") -> int:
        """Log every buffered batch (closes last) and delete it; returns the number of metrics logged."""
        from mlflow.entities import Metric

        n, closes = 0, []
        for uri in self.pending(mlflow_run_id):
            rel = uri[len(self.root):].strip("/")
            rid = rel.split("/")[0]
            if rid == CLOSES:
                closes.append(uri)
                continue
            rows = [Metric(k, float(v), int(ts), int(step), model_id=model[0] if model else None)
                    for k, v, ts, step, *model in json.loads(storage.read_bytes(uri))]
            for i in range(0, len(rows), 1000):  # MLflow's log_batch limit
                client.log_batch(rid, metrics=rows[i : i + 1000])
            n += len(rows)
            _delete(uri)
        for uri in closes:
            close = json.loads(storage.read_bytes(uri))
            rid = Path(uri).name[: -len(".json")]
            if close.get("error"):
                client.set_tag(rid, "drope.error", close["error"][:4000])
            if client.get_run(rid).info.status == "RUNNING":
                client.set_terminated(rid, status=close["status"])
            _delete(uri)
        return n


def _delete(uri: str) -> None:
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        storage.s3_call(uri, storage.s3_client().delete_object, Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)
