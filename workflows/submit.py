"""Submitting a workflow run to a Ray cluster as a Ray job (JobSubmissionClient).

The job's entrypoint is `drope resume RUN_ID --storage ROOT`: the same driver `drope run` uses, run on
the cluster's head, so a resubmission after any failure continues the same run. Submission ids are
deterministic per run and attempt (drope-<run_id>-a<N>). Secrets are never put in the runtime_env
(the Ray dashboard shows it): nodes get credentials from their own environment or instance profile.
"""

from __future__ import annotations

import os
import shlex
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from drope_ops.errors import DropeError, one_line
from workflows.ledger import Ledger
from workflows.runs import remember

# Non-secret environment the driver on the cluster needs to find the same services as the submitter.
PASSED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
              "HF_ENDPOINT", "HF_HUB_OFFLINE", "DROPE_CACHE")
AGENT_WAIT_S = 120
RUNTIME_ENV_FILE = Path(__file__).resolve().parent.parent / "cluster" / "runtime-env.yaml"


def check_address(address: str) -> None:
    """Fail fast when no Ray dashboard answers at `address` (a 401/403 from a token-auth head answers)."""
    try:
        with urllib.request.urlopen(address.rstrip("/") + "/api/version", timeout=5):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # Ray token auth is on: the head is there, JobSubmissionClient sends the token
            return
        reason = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
    raise DropeError(f"--address {address}: no Ray dashboard answers there ({reason}); "
                     "start one (cluster/local-up.sh) or give http://HEAD:8265 of a running cluster")


def check_ray_address(address: str, wait_s: float = 60) -> None:
    """Fail in one line, within seconds, when no Ray head answers at `address` (host:port of its GCS,
    or ray://host:port): ray.init would otherwise retry the connect for over five minutes."""
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    fix = ("start a head there (`ray start --head`, cluster/local-up.sh), give HEAD:6379 of a running "
           "cluster, or leave ray.address empty for a local Ray")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise DropeError(f"ray.address {address}: nothing answers there ({e.strerror or e}); {fix}") from None
    if address.startswith("ray://"):
        return  # a Ray Client server: ray.init's client connect has its own bounded retries
    _check_gcs(address, target, wait_s, fix)


def _check_gcs(address: str, target: str, wait_s: float, fix: str) -> None:
    """Something listens at `target`: is it a Ray head's GCS? (GcsClient blocks ~40 s on anything else.)"""
    from ray._raylet import GcsClient

    failure: list[str] = []

    def probe():
        try:
            GcsClient(address=target)
        except Exception as e:
            failure.append(one_line(e))

    thread = threading.Thread(target=probe, name="drope-gcs-probe", daemon=True)
    thread.start()
    thread.join(wait_s)
    if thread.is_alive() or failure:
        reason = failure[0] if failure else f"no answer within {wait_s:.0f}s"
        raise DropeError(f"ray.address {address}: something listens there but it is not a Ray head's GCS "
                         f"({reason}); {fix}")


def _runtime_env(run_uri: str) -> dict:
    env = {}
    if RUNTIME_ENV_FILE.exists():
        env = yaml.safe_load(RUNTIME_ENV_FILE.read_text()) or {}
    env_vars = dict(env.get("env_vars", {}))
    env_vars.update({k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)})
    env_vars["DROPE_HOME"] = os.environ.get("DROPE_HOME") or str(Path(".drope").resolve())
    env["env_vars"] = env_vars
    env.pop("working_dir", None)  # drope is installed on the nodes; the run's state lives in storage
    return env


def submit_run(spec, run_id: str, run_uri: str, address: str, take_over: bool = False) -> str:
    from ray.job_submission import JobSubmissionClient

    check_address(address)
    ledger = Ledger(run_uri)
    run = ledger.read_run()
    n = int(run.get("submissions", 0)) + 1
    submission_id = f"drope-{run_id}-a{n}"
    root = run_uri[: -len(run_id)].rstrip("/") or "."
    client = JobSubmissionClient(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(
                entrypoint=f"drope resume {shlex.quote(run_id)} --storage {shlex.quote(root)}"
                           + (" --take-over" if take_over else ""),
                submission_id=submission_id,
                runtime_env=_runtime_env(run_uri),
                metadata={"drope_run_id": run_id, "attempt": str(n)},
            )
            break
        except RuntimeError as e:
            # a head that just started answers before its job agent is up: wait for it, briefly
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise DropeError(f"--address {address}: the Ray cluster refused the job ({e})") from None
            time.sleep(2)
    ledger.update_run(submissions=n, submission_id=submission_id, address=address)
    remember(run_id, run_uri, address=address, submission_id=submission_id)
    return submission_id


def job_status(address: str, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    try:
        return str(JobSubmissionClient(address).get_job_status(submission_id).value)
    except Exception as e:  # the cluster may be gone; status still prints the ledger
        return f"unknown ({type(e).__name__})"



