"""The workflow on a cluster whose nodes share no disk (DESIGN.md, "The cluster it runs on"), through the
real CLI: `drope submit debug --address ...` to a Ray head that does no work (--num-cpus=0) and one
worker node in its own mount namespace (private tmpfs over /tmp and the run home), run storage on the
moto S3 server, tracking on the MLflow server (fixture tests/fixtures/cluster.py). Then the worker node
dies mid-recalibration, a fresh one (empty disk) joins, and `drope resume --address` finishes the run:
recalibration goes on from its last checkpoint and no finished stage runs again. (Ray Train's own
restart of lost workers within the job, recalibrate.max_failures >= 1, is turned off here so that the
resume path is the one tested.)

Both tests share one head, one moto, one MLflow server. Each prints what the stages took and what the
worker node had on its disk (`pytest -s` or -rA shows it; tests/run.sh passes -ra).
"""

from __future__ import annotations

import json
import re
import time

import boto3
import pytest
from mlflow import MlflowClient

from tests.fixtures.cluster import NoSharedDiskCluster
from tests.fixtures.logs import tracebacks
from tests.fixtures.workflow_services import run_drope

STAGES = ["fetch", "drop_rope", "recalibrate", "fit_temperature", "evaluate"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
JOB_TIMEOUT_S = 1200  # the debug workflow takes a few minutes on 2 shared cores


def _s3(cluster: NoSharedDiskCluster):
    return boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _keys(cluster, prefix: str) -> list[str]:
    pages = _s3(cluster).get_paginator("list_objects_v2").paginate(Bucket=cluster.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _ledger(cluster, run_id: str, stage: str) -> dict:
    """The stage's ledger record, read straight from S3 (cheaper than a `drope status` per poll)."""
    try:
        body = _s3(cluster).get_object(Bucket=cluster.bucket, Key=f"runs/{run_id}/ledger/{stage}.json")["Body"]
    except Exception:  # noqa: BLE001 (not written yet)
        return {}
    return json.loads(body.read())


def status(cluster, run_id: str) -> dict:
    out = json.loads(run_drope(["status", run_id, "--json"], cluster.env, timeout=180, check=True).stdout)
    out["by_stage"] = {s["stage"]: s for s in out["stages"]}
    return out


def job_state(cluster, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    try:
        return str(JobSubmissionClient(cluster.address).get_job_status(submission_id).value)
    except Exception as e:  # noqa: BLE001 (the head is busy or the job not there yet)
        return f"unknown ({type(e).__name__})"


def diagnostics(cluster, run_id: str, *submission_ids: str) -> str:
    """Where the run stands, why it failed (job logs, the worker node's error lines), what is on disk."""
    out = []
    try:
        s = status(cluster, run_id)
        out.append(f"run {run_id}: {s['run'].get('status')}, job {s['job']}")
        for r in s["stages"]:
            dur = f"{r['duration']:.0f}s" if r.get("duration") is not None else "-"
            out.append(f"  {r['stage']:<16} {r['status']:<10} attempts {r['attempts']}  {dur:>6}  {r.get('error') or ''}")
    except Exception as e:  # noqa: BLE001
        out.append(f"(drope status {run_id} failed: {e})")
    for sub in submission_ids:
        out.append(f"--- ray job logs {sub} ({job_state(cluster, sub)}), tail:\n{cluster.job_logs(sub)[-6000:]}")
    out.append(f"--- worker node {cluster.worker.name}, error lines of its Ray logs:\n{cluster.worker.error_lines()}")
    out.append(cluster.worker.disk_report())
    return "\n".join(out)


def wait_job(cluster, run_id: str, submission_id: str, timeout: float = JOB_TIMEOUT_S) -> str:
    """Wait (bounded) for the Ray job `submission_id` to end; its final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(cluster, submission_id)
        if state in TERMINAL:
            return state
        time.sleep(3)
    raise AssertionError(f"Ray job {submission_id} (run {run_id}) still {job_state(cluster, submission_id)} after "
                         f"{timeout}s\n{diagnostics(cluster, run_id, submission_id)}")


def report(cluster, run_id: str, title: str, *submission_ids: str) -> str:
    """Each stage's time and the worker node's disk, printed and kept beside the cluster's logs (with
    the jobs' logs)."""
    for sub in submission_ids:
        (cluster.root / f"job-{sub}.log").write_text(cluster.job_logs(sub))
    s = status(cluster, run_id)
    lines = [f"== {title}: run {run_id} {s['run'].get('status')}"]
    for r in s["stages"]:
        dur = f"{r['duration']:.1f}s" if r.get("duration") is not None else "-"
        lines.append(f"  {r['stage']:<16} {r['status']:<10} attempts {r['attempts']}  {dur:>8}  {r.get('output') or ''}")
    lines.append(f"  recalibrate result: {s['by_stage']['recalibrate'].get('result')}")
    lines.append(cluster.worker.disk_report())
    text = "\n".join(lines)
    print(text)
    files = "".join(f"{size:>12} {path}\n" for path, size in sorted(cluster.worker.disk().items()))
    (cluster.root / f"report-{run_id}.txt").write_text(f"{text}\nfiles on worker node {cluster.worker.name}:\n{files}")
    return text


def submit(cluster, run_id: str, *overrides: str) -> str:
    sets = [a for o in overrides for a in ("--set", o)]
    proc = run_drope(["submit", "debug", "--run-id", run_id, *cluster.submitter_args(), *sets], cluster.env,
                     timeout=300, check=True)
    assert proc.stdout.strip().splitlines()[-1] == run_id, proc.stdout
    return f"drope-{run_id}-a1"


def parent_run_status(cluster, run_id: str) -> str:
    client = MlflowClient(cluster.tracking_uri)
    exp = client.get_experiment_by_name("debug")
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`drope.run_id` = '{run_id}' and tags.`drope.kind` = 'workflow'")
    assert len(runs) == 1, runs
    return runs[0].info.status


def test_submit_to_nodes_without_a_shared_disk(no_shared_disk_cluster):
    cluster = no_shared_disk_cluster
    run_id = "cl-plain"
    sub = submit(cluster, run_id)
    state = wait_job(cluster, run_id, sub)
    assert state == "SUCCEEDED", diagnostics(cluster, run_id, sub)
    report(cluster, run_id, "no shared disk", sub)
    s = status(cluster, run_id)
    assert s["run"]["status"] == "succeeded" and s["job"] == "SUCCEEDED"
    assert all(s["by_stage"][k]["status"] == "succeeded" for k in STAGES), s["by_stage"]
    assert {k: s["by_stage"][k]["attempts"] for k in STAGES} == dict.fromkeys(STAGES, 1)
    root = f"{cluster.storage_root}/{run_id}/"
    assert all(s["by_stage"][k]["output"].startswith(root) for k in STAGES), s["by_stage"]
    assert parent_run_status(cluster, run_id) == "FINISHED"


@pytest.mark.timeout(2400)  # two Ray jobs and a node replacement
def test_worker_node_lost_mid_recalibration_then_resume(no_shared_disk_cluster):
    cluster = no_shared_disk_cluster
    run_id = "cl-kill"
    steps = 16  # enough steps left after the first checkpoint to kill the node mid-run
    # max_failures=0: the node's loss fails the stage (Ray Train does not restart the workers within the
    # job), so it is `drope resume` on a fresh node that has to continue from the checkpoint in S3
    sub1 = submit(cluster, run_id, f"recalibrate.steps={steps}", "recalibrate.checkpoint_every=2",
                  "recalibrate.max_failures=0")

    # the worker node dies once recalibrate runs and Ray Train has committed a checkpoint to S3
    train_prefix = f"runs/{run_id}/ray-train/"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        rec = _ledger(cluster, run_id, "recalibrate")
        keys = _keys(cluster, train_prefix) if rec.get("status") == "running" else []
        committed = [k for k in keys if k.endswith("/checkpoint_manager_snapshot.json")]
        ckpt_steps = sorted({int(part.rsplit("_", 1)[1]) for k in keys for part in k.split("/")
                             if part.startswith("checkpoint_step_")})
        if committed and ckpt_steps:
            break
        state = job_state(cluster, sub1)
        assert state not in TERMINAL and rec.get("status") not in ("succeeded", "failed", "killed"), (
            f"job {sub1} {state}, recalibrate {rec.get('status')} before a checkpoint to kill the worker after"
            f" (raise recalibrate.steps if it finished)\n{diagnostics(cluster, run_id, sub1)}")
        assert time.monotonic() < deadline, (f"timed out after {JOB_TIMEOUT_S}s waiting for recalibrate to run "
                                             f"with a checkpoint under s3://{cluster.bucket}/{train_prefix}\n"
                                             f"{diagnostics(cluster, run_id, sub1)}")
        time.sleep(1)
    assert ckpt_steps[-1] < steps, f"recalibrate had finished ({ckpt_steps}) before the kill: raise steps"
    lost = cluster.worker
    print(f"killing worker node {lost.name} at checkpoints {ckpt_steps}\n{lost.disk_report()}")
    lost.copy_logs(cluster.root)
    fresh = cluster.replace_worker()
    assert fresh.disk() == {}, fresh.disk_report()  # a fresh node, nothing on its disk

    state1 = wait_job(cluster, run_id, sub1)
    lost_rec = _ledger(cluster, run_id, "recalibrate")
    print(f"first job {state1}; recalibrate {lost_rec.get('status')}: {lost_rec.get('error')}")
    assert state1 == "FAILED" and lost_rec.get("status") == "failed", diagnostics(cluster, run_id, sub1)
    # the newest checkpoint Ray Train had committed (its snapshot names the kept ones and the latest)
    snapshot = next(k for k in _keys(cluster, train_prefix) if k.endswith("/checkpoint_manager_snapshot.json"))
    text = _s3(cluster).get_object(Bucket=cluster.bucket, Key=snapshot)["Body"].read().decode()
    committed_step = max(int(m) for m in re.findall(r"checkpoint_step_(\d+)", text))
    print(f"checkpoints in S3 at the kill: {ckpt_steps}; newest committed: {committed_step}")
    proc = run_drope(["resume", run_id, "--address", cluster.address], cluster.env, timeout=300, check=True)
    sub2 = proc.stdout.strip().splitlines()[-1]
    assert sub2 == f"drope-{run_id}-a2", proc.stdout
    state2 = wait_job(cluster, run_id, sub2)
    assert state2 == "SUCCEEDED", diagnostics(cluster, run_id, sub1, sub2)
    report(cluster, run_id, "worker node lost mid-recalibration, resumed on a fresh node", sub1, sub2)

    s = status(cluster, run_id)
    assert s["run"]["status"] == "succeeded"
    assert all(s["by_stage"][k]["status"] == "succeeded" for k in STAGES), s["by_stage"]
    attempts = {k: s["by_stage"][k]["attempts"] for k in STAGES}
    # finished stages never rerun; recalibrate ran twice: killed with its node, then resumed
    assert attempts == {"fetch": 1, "drop_rope": 1, "recalibrate": 2, "fit_temperature": 1, "evaluate": 1}
    recal = s["by_stage"]["recalibrate"]["result"]
    print(f"recalibrate result after resume: {recal}")
    # continued from the newest checkpoint it had committed before the node died, not from step 0
    assert recal["start_step"] == committed_step, (recal, committed_step, ckpt_steps)
    assert recal["steps"] == steps
    assert parent_run_status(cluster, run_id) == "FINISHED"


def test_node_local_storage_or_tracking_is_refused_before_any_stage(no_shared_disk_cluster, tmp_path):
    """On two nodes that share no disk, a local storage root or a sqlite tracking file is one line, the
    job fails, the run record says failed and no stage ran."""
    cluster = no_shared_disk_cluster
    cases = {"cl-bad-track": (f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.uri sqlite:"),
             "cl-bad-store": (f"storage.root={tmp_path}/runs", "storage.root ")}
    for run_id, (override, says) in cases.items():
        sub = submit(cluster, run_id, override)
        assert wait_job(cluster, run_id, sub, timeout=300) == "FAILED", diagnostics(cluster, run_id, sub)
        s = status(cluster, run_id)
        assert s["run"]["status"] == "failed", s["run"]
        assert says in s["run"]["error"] and "nodes" in s["run"]["error"], s["run"]
        assert all(s["by_stage"][k]["status"] == "pending" for k in STAGES), s["by_stage"]
        assert tracebacks(cluster.job_logs(sub)) == 0, cluster.job_logs(sub)[-2000:]
