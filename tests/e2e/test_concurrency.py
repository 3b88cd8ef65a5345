"""Faults of several drivers and of the tracking server, through the real CLI on real services (MLflow
server processes, the moto S3 server, a local Ray per driver or one Ray head); the tiny `debug` preset.

- two drivers of one run started together (local storage, moto S3): exactly one runs, the other exits
  non-zero at once with one line naming the holder;
- four runs of one preset submitted together (`drope submit`) to one Ray head and one MLflow server,
  into a new experiment: all finish, in one experiment (on the head's 2 CPUs their training workers
  queue, which Ray Train waits out);
- a driver whose lease another driver took over (`drope resume --take-over`) stops its stage and
  exits with one line, writing nothing more to the ledger;
- the MLflow server killed (SIGKILL) and restarted mid-recalibration: the run finishes, no MLflow run
  is left RUNNING, and every step's loss is there after the replay of the buffered metrics.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.fixtures.logs import tracebacks
from tests.fixtures.services import free_port, s3_env_vars
from tests.fixtures.workflow_services import (VENV_BIN, evaluation_cells, run_drope, start_mlflow_server,
                                             stop_mlflow_server)
from workflows.spec import load_spec


@pytest.fixture
def env(tmp_path):
    e = {**os.environ, "DROPE_HOME": str(tmp_path / "home"), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
         "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    e.pop("RAY_ADDRESS", None)
    return e


def drope(args, env, log: Path):
    return subprocess.Popen([sys.executable, "-m", "workflows.cli", *args], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=900) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def status(run_id, env) -> dict:
    return json.loads(run_drope(["status", run_id, "--json"], env, timeout=120, check=True).stdout)


def workflow_runs(client, experiment: str, run_id: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`drope.run_id` = '{run_id}'", max_results=100)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_of_one_run(where, env, mlflow_server, tmp_path, request):
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    args = ["run", "debug", "--run-id", "race", "--set", f"tracking.experiment=race-{where}"]
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        env.update(s3_env_vars(request.getfixturevalue("moto_server")))
        args += ["--set", f"storage.root=s3://{bucket}/runs"]
    procs = [drope(args, env, tmp_path / f"driver{i}.log") for i in range(2)]
    codes = [finish(p) for p in procs]
    logs = [(tmp_path / f"driver{i}.log").read_text() for i in range(2)]
    assert sorted(c == 0 for c in codes) == [False, True], (codes, logs)
    loser = logs[0] if codes[0] != 0 else logs[1]
    lines = [ln for ln in loser.strip().splitlines() if ln.strip()]
    assert "is being driven by" in lines[-1] and "--take-over" in lines[-1], loser
    assert "Traceback" not in loser and "running (attempt" not in loser, loser  # it touched nothing
    run = status("race", env)["run"]
    assert run["status"] == "succeeded" and run["attempts"] == 1, run
    client = MlflowClient(mlflow_server)
    runs = workflow_runs(client, f"race-{where}", "race")
    assert [r.data.tags.get("drope.stage") for r in runs].count("recalibrate") == 1
    assert all(r.info.status == "FINISHED" for r in runs)


def test_runs_of_one_preset_submitted_at_once_to_one_head(env, ray_head, mlflow_server, tmp_path):
    """Four `drope submit` of one preset at once to one Ray head (2 CPUs: their training workers queue)
    and one MLflow server, into an experiment none of them has seen: every driver races to create it."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    env["MLFLOW_TRACKING_URI"] = mlflow_server
    experiment = f"together-{time.time_ns()}"
    ids = [f"together-{c}" for c in "abcd"]
    small = ["--set", f"tracking.experiment={experiment}", "--set", "evaluate.variants=[drope]",
             "--set", "evaluate.tasks=[perplexity]", "--set", "evaluate.extension_factors=[2]"]
    submits = [drope(["submit", "debug", "--run-id", rid, "--address", ray_head["address"], *small], env,
                     tmp_path / f"{rid}.submit.log") for rid in ids]
    assert [finish(p, timeout=300) for p in submits] == [0, 0, 0, 0], [
        (tmp_path / f"{rid}.submit.log").read_text()[-2000:] for rid in ids]
    jobs = JobSubmissionClient(ray_head["address"])
    runs = {rid: Path(env["DROPE_HOME"]) / "runs" / rid / "run.json" for rid in ids}
    deadline = time.monotonic() + 1500
    pending = set(ids)
    while pending:  # each until its job ends; a job that ends with its run not closed fails at once
        for rid in sorted(pending):
            job = jobs.get_job_status(f"drope-{rid}-a1")
            if job in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                run = json.loads(runs[rid].read_text())
                assert job == JobStatus.SUCCEEDED and run["status"] == "succeeded", (
                    rid, job, run, jobs.get_job_logs(f"drope-{rid}-a1")[-3000:])
                pending.discard(rid)
        assert time.monotonic() < deadline, {rid: json.loads(runs[rid].read_text()).get("status") for rid in pending}
        time.sleep(3)
    client = MlflowClient(mlflow_server)
    assert len([e for e in client.search_experiments() if e.name == experiment]) == 1
    for rid in ids:
        stages = status(rid, env)["stages"]
        assert [s["status"] for s in stages] == ["succeeded"] * len(stages) and len(stages) == 5, stages
        mlflow_runs = workflow_runs(client, experiment, rid)
        assert len(mlflow_runs) == 6 and all(r.info.status == "FINISHED" for r in mlflow_runs), rid  # parent + 5

    # `drope compare`: two of them side by side, from their ledgers and the evaluate runs' MLflow metrics
    out = json.loads(run_drope(["compare", ids[0], ids[1], "--json"], env, check=True).stdout)
    debug = load_spec("debug", [])
    assert [r["run_id"] for r in out["runs"]] == ids[:2]
    text = run_drope(["compare", ids[0], ids[1]], env, check=True).stdout
    assert text.splitlines()[0].split() == ids[:2]
    for r in out["runs"]:
        stages = {st["stage"]: st for st in status(r["run_id"], env)["stages"]}
        recal = stages["recalibrate"]["result"]
        assert (r["logit_scale_c"], r["final_loss"]) == (stages["fit_temperature"]["result"]["c"], recal["final_loss"])
        assert r["recalibration_tokens"] == recal["steps"] * debug.recalibrate.global_batch * debug.data.seq_len
        assert r["cells_from"] == "mlflow"
        cells = {(key, int(length)): v for key, by_length in r["cells"].items() for length, v in by_length.items()}
        assert cells == evaluation_cells(stages["evaluate"]["output"]) and ("perplexity/drope", 256) in cells
        assert f"{r['logit_scale_c']:.4g}" in next(ln for ln in text.splitlines() if ln.startswith("logit_scale_c"))
    assert "perplexity/drope @256" in text  # the small evaluation above: drope's perplexity at 2 x 128
    unknown = run_drope(["compare", ids[0], "no-such-run"], env)
    assert unknown.returncode != 0 and unknown.stdout == ""
    assert unknown.stderr.strip().count("\n") == 0 and "unknown run id 'no-such-run'" in unknown.stderr


def test_mlflow_server_restarted_mid_recalibration(env, tmp_path):
    root, port = tmp_path / "mlflow", free_port()
    root.mkdir()
    server, uri = start_mlflow_server(root, port)
    env.update(MLFLOW_TRACKING_URI=uri)
    steps = 200  # ~40 ms a step, and a failed call spends ~7 s of retries: the outage meets the loop
    proc = drope(["run", "debug", "--run-id", "outage", "--set", f"recalibrate.steps={steps}",
                  "--set", "recalibrate.checkpoint_every=50"], env, tmp_path / "driver.log")
    client = MlflowClient(uri)
    try:
        deadline = time.monotonic() + 600
        child = ""
        while True:  # rank 0 has logged its first loss: the training loop runs, most of its steps ahead
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            if not child:
                recs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          "tags.`drope.stage` = 'recalibrate'")
                child = recs[0].info.run_id if recs else ""
            if child and client.get_metric_history(child, "loss"):
                break
            time.sleep(0.2)
        stop_mlflow_server(server, sig=9)
        time.sleep(30)  # longer than the retry budget of a call: rank 0 must buffer
        server, _ = start_mlflow_server(root, port)
        code = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "driver.log").read_text()
    try:
        assert code == 0, log[-4000:]
        assert "metrics of MLflow run" in log and "buffered to" in log, log[-4000:]  # the outage was met
        assert log.count("are buffered to") == 1, log[-4000:]  # said once (Ray Train prints a print() twice)
        runs = workflow_runs(client, "debug", "outage")
        assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs), [(r.data.tags.get("mlflow.runName"), r.info.status) for r in runs]
        losses = client.get_metric_history(child, "loss")
        assert sorted({m.step for m in losses}) == list(range(1, steps + 1)), sorted(m.step for m in losses)
        assert not list((Path(env["DROPE_HOME"]) / "runs" / "outage" / "tracking-buffer").rglob("*.json"))
    finally:
        stop_mlflow_server(server)


def test_resume_after_a_killed_driver_closes_its_runs(env, mlflow_server, tmp_path):
    """A driver killed -9 mid-recalibration leaves its lease and MLflow runs behind: `drope resume`
    at once (the lease's pid is gone on this host) finishes the run and closes the left-over run KILLED."""
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    experiment = f"killed-{time.time_ns()}"
    proc = drope(["run", "debug", "--run-id", "killed", "--set", f"tracking.experiment={experiment}",
                  "--set", "recalibrate.steps=100", "--set", "recalibrate.checkpoint_every=50"], env,
                 tmp_path / "driver.log")
    record = Path(env["DROPE_HOME"]) / "runs" / "killed" / "ledger" / "recalibrate.json"
    deadline = time.monotonic() + 600
    while not (record.exists() and json.loads(record.read_text())["status"] == "running"):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
        time.sleep(0.5)
    proc.kill()
    proc.wait(timeout=60)
    assert (Path(env["DROPE_HOME"]) / "runs" / "killed" / "lease.json").exists()  # left behind
    client = MlflowClient(mlflow_server)
    assert any(r.info.status == "RUNNING" for r in workflow_runs(client, experiment, "killed"))
    proc = run_drope(["resume", "killed"], env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "closed MLflow run recalibrate#1" in proc.stdout, proc.stdout[-3000:]
    runs = {r.data.tags.get("mlflow.runName"): r.info.status for r in workflow_runs(client, experiment, "killed")}
    assert runs["recalibrate#1"] == "KILLED" and runs["recalibrate#2"] == "FINISHED", runs
    assert "RUNNING" not in runs.values(), runs
    assert status("killed", env)["run"]["status"] == "succeeded"


def test_a_driver_taken_over_stops_before_writing_the_ledger(env, mlflow_server, tmp_path):
    """`drope resume --take-over` while a driver is in recalibrate: the old driver's heartbeat sees the
    lease gone, stops its stage and exits with one line; it writes nothing more (its 'killed' records
    would land on top of the new driver's), and the new driver finishes the run."""
    env.update(MLFLOW_TRACKING_URI=mlflow_server, DROPE_LEASE_TTL_S="4")  # a heartbeat every second
    experiment = f"taken-{time.time_ns()}"
    first = drope(["run", "debug", "--run-id", "taken", "--set", f"tracking.experiment={experiment}",
                   "--set", "recalibrate.steps=80", "--set", "recalibrate.checkpoint_every=40"], env,
                  tmp_path / "first.log")
    run_dir = Path(env["DROPE_HOME"]) / "runs" / "taken"
    record = run_dir / "ledger" / "recalibrate.json"
    deadline = time.monotonic() + 600
    while not (record.exists() and json.loads(record.read_text())["status"] == "running"):
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.5)
    second = drope(["resume", "taken", "--take-over"], env, tmp_path / "second.log")
    try:
        code = finish(first, timeout=180)
        rec, run = json.loads(record.read_text()), json.loads((run_dir / "run.json").read_text())
        log = (tmp_path / "first.log").read_text()
        errors = [ln for ln in log.splitlines() if ln.startswith("drope run: error:")]
        assert code != 0 and len(errors) == 1 and "took over its lease" in errors[0], log[-3000:]
        assert tracebacks(log) == 0 and "KILLED after" not in log, log[-3000:]
        assert rec["status"] != "killed" and run["status"] != "killed", (rec, run)  # the old driver wrote nothing
        assert finish(second, timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
    final = status("taken", env)
    recal = {s["stage"]: s for s in final["stages"]}["recalibrate"]
    assert final["run"]["status"] == "succeeded" and recal["status"] == "succeeded" and recal["attempts"] == 2, final
    runs = {r.data.tags.get("mlflow.runName"): r.info.status for r in workflow_runs(MlflowClient(mlflow_server),
                                                                                   experiment, "taken")}
    assert runs["recalibrate#1"] == "KILLED" and runs["recalibrate#2"] == "FINISHED" and "RUNNING" not in runs.values(), runs
