"""The workflow end to end through the real CLI, on real services: a Ray head started with `ray start`,
an MLflow server on sqlite, the moto S3 server; the tiny `debug` preset."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.fixtures.services import s3_env_vars
from tests.fixtures.workflow_services import VENV_BIN, evaluation_cells, run_drope

STAGES = ["fetch", "drop_rope", "recalibrate", "fit_temperature", "evaluate"]


@pytest.fixture
def env(tmp_path, mlflow_server):
    e = {**os.environ, "DROPE_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": mlflow_server,
         "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
         "RAY_AUTH_MODE": "disabled"}
    e.pop("RAY_ADDRESS", None)
    return e


def status(run_id, env) -> dict:
    proc = run_drope(["status", run_id, "--json"], env, timeout=120, check=True)
    out = json.loads(proc.stdout)
    out["by_stage"] = {s["stage"]: s for s in out["stages"]}
    return out


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ray_job(address, *args):
    return subprocess.run([str(VENV_BIN / "ray"), "job", *args, "--address", address], capture_output=True,
                          text=True, timeout=120)


def job_state(address, submission_id) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(address).get_job_status(submission_id).value)


def child_runs(client, parent) -> dict[str, list]:
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags["drope.stage"], []).append(r)
    return by_stage


def parent_run(client, run_id):
    exp = client.get_experiment_by_name("debug")
    runs = client.search_runs([exp.experiment_id], f"tags.`drope.run_id` = '{run_id}' and tags.`drope.kind` = 'workflow'")
    assert len(runs) == 1, runs
    return runs[0]


def check_evaluation_in_mlflow(client, parent, ev, models, eval_output, tmp_path):
    """Every scored cell a metric `{task}/{variant}` of the evaluate run at step = length, linked to the
    model it scored; headline numbers on the parent run; the table as an MLflow table artifact."""
    cells = evaluation_cells(eval_output)
    assert {("niah_single_1/drope", 512), ("perplexity/yarn", 256), ("perplexity/crop", 512)} <= set(cells), cells
    logged = {(k, m.step): m.value for k in {k for k, _ in cells}
              for m in client.get_metric_history(ev.info.run_id, k)}
    assert logged == cells
    linked = {name: {(m.key, m.step): m.value for m in client.get_logged_model(models[name].model_id).metrics}
              for name in ("temperature-fitted", "base")}
    assert linked["temperature-fitted"] == {c: v for c, v in cells.items() if c[0].endswith("/drope")}
    assert linked["base"] == {c: v for c, v in cells.items() if not c[0].endswith("/drope")}  # rope, yarn, crop

    headline = {k: v for k, v in parent.data.metrics.items() if k.startswith("headline/")}
    assert headline["headline/niah_mean_x4/drope"] == cells[("niah_single_1/drope", 512)]
    assert headline["headline/perplexity_x2/yarn"] == cells[("perplexity/yarn", 256)]
    assert headline["headline/perplexity_x4/crop"] == cells[("perplexity/crop", 512)]

    table = json.loads(Path(client.download_artifacts(ev.info.run_id, "results_table.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    in_table = {(f"{r['task']}/{r['variant']}", r["length"]): r["score"] for r in rows if r["score"] is not None}
    assert in_table == pytest.approx(cells, rel=1e-9)  # MLflow writes the table's floats with 10 decimals


def test_submit_kill_resume_and_lineage(env, ray_head, mlflow_server, tmp_path):
    address = ray_head["address"]
    proc = run_drope(["submit", "debug", "--address", address, "--run-id", "wf-submit",
                      "--set", "recalibrate.steps=10", "--set", "recalibrate.checkpoint_every=2"], env, check=True)
    run_id = proc.stdout.strip().splitlines()[-1]
    assert run_id == "wf-submit"
    sub1 = "drope-wf-submit-a1"

    # kill the driver (the Ray job) while recalibrate runs, once it has a checkpoint
    def recalibrating_with_checkpoint():
        s = status(run_id, env)["by_stage"]
        if s["recalibrate"]["status"] != "running":
            return False
        return any(Path(env["DROPE_HOME"]).glob("runs/wf-submit/ray-train/**/checkpoint_*"))
    wait_for(recalibrating_with_checkpoint, 1500, "recalibrate to checkpoint")
    assert ray_job(address, "stop", sub1).returncode == 0
    wait_for(lambda: job_state(address, sub1) in ("STOPPED", "FAILED"), 120, "job to stop")
    # the driver turns Ray's SIGTERM into KILLED marks before it exits: ledger (stage and run) and MLflow
    # (the stage's child run and the parent); a bounded wait, as the stop returns before the driver ends
    s = wait_for(lambda: (lambda st: st if st["by_stage"]["recalibrate"]["status"] != "running" else None)(
        status(run_id, env)), 60, "the ledger to mark recalibrate after the stop")
    assert s["by_stage"]["recalibrate"]["status"] == "killed", s["by_stage"]["recalibrate"]
    assert s["by_stage"]["recalibrate"]["attempts"] == 1
    assert s["run"]["status"] == "killed", s["run"]
    assert [s["by_stage"][k]["status"] for k in ("fetch", "drop_rope")] == ["succeeded", "succeeded"]
    assert [s["by_stage"][k]["status"] for k in ("fit_temperature", "evaluate")] == ["pending", "pending"]
    client = MlflowClient(mlflow_server)
    parent = parent_run(client, run_id)
    killed = child_runs(client, parent)["recalibrate"]
    assert [r.info.status for r in killed] == ["KILLED"]
    assert killed[0].info.end_time is not None
    assert parent.info.status == "KILLED"

    # resume as a new Ray job: fetch and drop_rope are not run again, recalibrate continues
    proc = run_drope(["resume", run_id, "--address", address], env, check=True)
    sub2 = proc.stdout.strip().splitlines()[-1]
    assert sub2 == "drope-wf-submit-a2"
    wait_for(lambda: job_state(address, sub2) in ("SUCCEEDED", "FAILED", "STOPPED"), 1500, "resumed job")
    assert job_state(address, sub2) == "SUCCEEDED", ray_job(address, "logs", sub2).stdout[-4000:]
    s = status(run_id, env)
    assert s["run"]["status"] == "succeeded" and s["job"] == "SUCCEEDED"
    attempts = {k: v["attempts"] for k, v in s["by_stage"].items()}
    assert attempts == {"fetch": 1, "drop_rope": 1, "recalibrate": 2, "fit_temperature": 1, "evaluate": 1}
    assert all(v["status"] == "succeeded" for v in s["by_stage"].values())
    assert s["by_stage"]["recalibrate"]["result"]["start_step"] >= 2  # continued from its checkpoint

    # MLflow: parent, one child per stage attempt, logged models with lineage, metrics, artifacts
    parent = parent_run(client, run_id)
    assert parent.info.status == "FINISHED"
    children = child_runs(client, parent)
    assert {k: len(v) for k, v in children.items()} == attempts
    assert sorted(r.info.status for r in children["recalibrate"]) == ["FINISHED", "KILLED"]
    recal = next(r for r in children["recalibrate"] if r.info.status == "FINISHED")
    # the resumed attempt's run holds the whole curve: restored steps and the ones it ran, once each
    assert sorted(m.step for m in client.get_metric_history(recal.info.run_id, "loss")) == list(range(1, 11))
    assert "loss_curve.png" in [a.path for a in client.list_artifacts(recal.info.run_id)]
    ev = children["evaluate"][0]
    names = [a.path for a in client.list_artifacts(ev.info.run_id)]
    assert any(n.endswith(".md") for n in names) and any(n.endswith(".png") for n in names), names
    # the experiment is shared with the other `debug` runs on this server: keep this run's models
    ours = {r.info.run_id for rs in children.values() for r in rs}
    logged = client.search_logged_models([parent.info.experiment_id], max_results=1000)
    models = {m.name: m for m in logged if m.source_run_id in ours}
    assert len(models) == len([m for m in logged if m.source_run_id in ours])  # one model per name
    assert {"base", "dropped", "recalibrated", "temperature-fitted"} <= set(models)
    assert models["dropped"].tags["drope.parent_model_id"] == models["base"].model_id
    assert models["recalibrated"].tags["drope.parent_model_id"] == models["dropped"].model_id
    assert models["temperature-fitted"].tags["drope.parent_model_id"] == models["recalibrated"].model_id
    assert models["recalibrated"].source_run_id == recal.info.run_id
    check_evaluation_in_mlflow(client, parent, ev, models, s["by_stage"]["evaluate"]["output"], tmp_path)
    lineage = run_drope(["lineage", run_id], env, check=True).stdout
    for word in ["base model", "dropped", "recalibrated", "temperature-fitted", "evaluation",
                 models["recalibrated"].model_id, parent.info.run_id]:
        assert word in lineage

    # change only an evaluation setting: only evaluate reruns
    proc = run_drope(["resume", run_id, "--address", address, "--set", "evaluate.samples_per_cell=2"], env, check=True)
    sub3 = proc.stdout.strip().splitlines()[-1]
    wait_for(lambda: job_state(address, sub3) in ("SUCCEEDED", "FAILED", "STOPPED"), 1200, "eval-only job")
    assert job_state(address, sub3) == "SUCCEEDED"
    after = {k: v["attempts"] for k, v in status(run_id, env)["by_stage"].items()}
    assert after == {**attempts, "evaluate": 2}


def test_failed_stage_is_marked_and_resume_after_fix(env, mlflow_server):
    proc = run_drope(["run", "debug", "--run-id", "wf-nan", "--set", "recalibrate.inject_nan_at_step=2"], env)
    assert proc.returncode != 0
    err_lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("drope run: error:")]
    assert len(err_lines) == 1 and "step 2" in err_lines[0], proc.stderr[-3000:]
    s = status("wf-nan", env)
    assert s["run"]["status"] == "failed"
    assert s["by_stage"]["recalibrate"]["status"] == "failed" and "step 2" in s["by_stage"]["recalibrate"]["error"]
    client = MlflowClient(mlflow_server)
    parent = parent_run(client, "wf-nan")
    assert parent.info.status == "FAILED"
    recal = child_runs(client, parent)["recalibrate"][0]
    assert recal.info.status == "FAILED" and "step 2" in recal.data.tags["drope.error"]

    proc = run_drope(["resume", "wf-nan", "--set", "recalibrate.inject_nan_at_step=null"], env, check=True)
    s = status("wf-nan", env)
    assert {k: v["attempts"] for k, v in s["by_stage"].items()} == {
        "fetch": 1, "drop_rope": 1, "recalibrate": 2, "fit_temperature": 1, "evaluate": 1}
    assert "lineage:" in proc.stdout and "MLflow UI" in proc.stdout
    # rank 0's progress line, once (a worker's print() would reach the driver twice)
    assert (proc.stdout + proc.stderr).count("[recalibrate] step 4/4 loss=") == 1, proc.stdout[-3000:]


def test_s3_storage_works_like_local(env, s3_bucket, s3_env):
    env = {**env, **s3_env}
    root = f"s3://{s3_bucket}/runs"
    run_drope(["run", "debug", "--run-id", "wf-s3", "--set", f"storage.root={root}",
               "--set", "recalibrate.steps=2"], env, check=True)
    s = status("wf-s3", env)
    assert all(v["status"] == "succeeded" for v in s["by_stage"].values())
    assert all(v["output"].startswith(root + "/wf-s3/") for v in s["by_stage"].values())
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="runs/wf-s3/ledger/")["Contents"]]
    assert sorted(Path(k).stem for k in keys) == sorted(STAGES)
    # a second run of the same spec on another box finds everything done through --storage
    proc = run_drope(["resume", "wf-s3", "--storage", root], {**env, "DROPE_HOME": env["DROPE_HOME"] + "-other"},
                     check=True)
    assert proc.stdout.count("skipped") == len(STAGES)
