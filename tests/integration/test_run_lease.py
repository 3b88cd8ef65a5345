"""One driver per run (the lease in the run's storage, local and moto S3) and get-or-create of the MLflow
experiment by several drivers at once (a real MLflow server)."""

import json
import threading
import time

import pytest
from mlflow import MlflowClient

from drope_ops import storage
from tests.fixtures.services import free_port
from workflows.lease import LeaseLost, RunBusy, RunLease
from workflows.ledger import Ledger
from workflows.tracking import Tracker
from workflows.tracking_outage import MetricsBuffer


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs" / "r1")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/r1"


def together(fn, n: int, expected=Exception) -> tuple[list, list]:
    """Call fn in n threads started at once: (results, str of the `expected` exceptions raised)."""
    results, errors = [], []

    def call():
        try:
            results.append(fn())
        except expected as e:
            errors.append(str(e))

    threads = [threading.Thread(target=call) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_second_lease_is_refused_naming_the_holder(run_uri):
    first = RunLease(run_uri, "r1").acquire()
    try:
        with pytest.raises(RunBusy) as e:
            RunLease(run_uri, "r1").acquire()
        line = str(e.value)
        assert "\n" not in line and "is being driven by" in line and "--take-over" in line
        held = json.loads(storage.read_bytes(first.uri))
        assert f"pid {held['pid']}" in line and held["token"] == first.token
    finally:
        first.release()
    assert not storage.exists(first.uri)
    RunLease(run_uri, "r1").acquire().release()  # free again once released


def test_expired_lease_is_taken_over_by_exactly_one(run_uri):
    dead = RunLease(run_uri, "r1", ttl_s=1)
    storage.write_bytes(dead.uri, dead._body())  # a driver that took the lease and hung: no heartbeat
    time.sleep(1.5)
    winners, losers = together(lambda: RunLease(run_uri, "r1").acquire(), 4, RunBusy)
    assert len(winners) == 1 and len(losers) == 3, (winners, losers)
    dead.renew()
    assert dead.lost  # the old holder learns it no longer owns the run
    winners[0].release()


def test_take_over_replaces_a_live_lease(run_uri):
    first = RunLease(run_uri, "r1").acquire()
    second = RunLease(run_uri, "r1").acquire(take_over=True)
    first.renew()
    assert first.lost and json.loads(storage.read_bytes(second.uri))["token"] == second.token
    first.release()  # not its lease any more: left alone
    assert storage.exists(second.uri)
    second.release()


def test_a_driver_taken_over_writes_nothing_more_to_the_ledger(run_uri):
    first = RunLease(run_uri, "r1").acquire()
    ledger = Ledger(run_uri, guard=first.check)
    ledger.update_run(status="running", attempts=1)  # its own: written
    second = RunLease(run_uri, "r1").acquire(take_over=True)
    try:
        with pytest.raises(LeaseLost) as e:
            ledger.update_run(status="killed")
        line = str(e.value)
        assert "\n" not in line and "took over" in line and f"drope status r1" in line, line
        with pytest.raises(LeaseLost):
            ledger.write_spec("name: x\n")
        assert Ledger(run_uri).read_run()["status"] == "running"  # untouched by the driver that lost it
        Ledger(run_uri, guard=second.check).update_run(status="succeeded")  # the new holder writes
    finally:
        first.release()
        second.release()


def test_heartbeat_keeps_the_lease(tmp_path):
    lease = RunLease(str(tmp_path / "r"), "r", ttl_s=0.8).acquire()
    try:
        time.sleep(2)  # > ttl: only the heartbeat keeps it
        with pytest.raises(RunBusy):
            RunLease(str(tmp_path / "r"), "r").acquire()
    finally:
        lease.release()


@pytest.mark.parametrize("existing", ["none", "untagged"])
def test_experiment_created_by_concurrent_drivers(mlflow_server, existing):
    """Six drivers get-or-create one experiment at once: a new one, or one made without drope's
    experiment-kind tag (each driver then tags it; the server refuses all inserts but the first)."""
    name = f"race-{existing}-{time.time_ns()}"
    if existing == "untagged":
        MlflowClient(mlflow_server).create_experiment(name)
    ids, errors = together(lambda: Tracker(mlflow_server, name).experiment_id, 6)
    assert not errors and len(set(ids)) == 1 and len(ids) == 6, (errors, ids)
    assert MlflowClient(mlflow_server).get_experiment(ids[0]).tags["mlflow.experimentKind"] == "custom_model_development"


def test_buffer_replays_into_mlflow_and_empties(mlflow_server, tmp_path):
    tracker = Tracker(mlflow_server, "buffer-replay", run_uri=str(tmp_path / "run"))
    rid = tracker.client.create_run(tracker.experiment_id).info.run_id
    buf = MetricsBuffer(str(tmp_path / "run"))
    model = tracker.register_checkpoint(rid, "temperature-fitted", str(tmp_path / "ckpt"), fingerprint="f")
    buf.put(rid, [("loss", 2.5, 1, 1), ("loss", 2.0, 2, 2)])
    buf.put(rid, [("niah_single_1/drope", 50.0, 3, 512, model)])  # an evaluation cell keeps its model
    buf.put_close(rid, "KILLED", "driver lost")
    tracker.replay_buffered()
    client = MlflowClient(mlflow_server)
    assert sorted((m.step, m.value) for m in client.get_metric_history(rid, "loss")) == [(1, 2.5), (2, 2.0)]
    assert [(m.key, m.step, m.value) for m in client.get_logged_model(model).metrics] == [("niah_single_1/drope", 512, 50.0)]
    run = client.get_run(rid)
    assert run.info.status == "KILLED" and run.data.tags["drope.error"] == "driver lost"
    assert buf.pending() == []


def test_sink_in_a_ray_train_worker_says_buffering_once(tmp_path, capfd):
    """Rank 0 of a real Ray Train run logs to a tracking server that is not there: the metrics are
    buffered and the line saying so is printed once (Ray Train patches print() to write it twice)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from workflows.tracking import MlflowMetricsSink

    def train_func(config):
        for step in (1, 2, 3):
            config["sink"].log_metrics({"loss": 1.0 / step}, step=step)

    sink = MlflowMetricsSink(f"http://127.0.0.1:{free_port()}", "abc123", str(tmp_path / "run"))
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=True)
    try:
        TorchTrainer(train_func, train_loop_config={"sink": sink}, scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(storage_path=str(tmp_path / "rt"), name="sink")).fit()
        time.sleep(2)  # the worker's last lines reach the driver
    finally:
        ray.shutdown()
    out = capfd.readouterr()
    assert (out.out + out.err).count("are buffered to") == 1, out.out[-3000:]
    assert sum(len(json.loads(storage.read_bytes(u))) for u in MetricsBuffer(str(tmp_path / "run")).pending("abc123")) == 3
