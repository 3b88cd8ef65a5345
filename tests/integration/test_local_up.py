"""cluster/local-up.sh and local-down.sh against the real Ray head and MLflow server they start.

The security claim (issue 7): every port the local Ray head and MLflow server open listens on
127.0.0.1 only, never 0.0.0.0 or ::, and the Ray dashboard refuses callers without the token.
Then local-down.sh stops exactly what local-up.sh started and the ports close.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
UP, DOWN = REPO / "cluster" / "local-up.sh", REPO / "cluster" / "local-down.sh"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
PORT_VARS = ("RAY_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_SERVER_PORT", "RAY_DASHBOARD_AGENT_PORT",
             "MLFLOW_PORT")

# Starting both services takes ~10 s on an idle 2-core box, minutes when other work shares it.
pytestmark = pytest.mark.timeout(420)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env(tmp_path: Path, ports: dict[str, int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update({k: str(v) for k, v in ports.items()})
    env.update(
        DROPE_CLUSTER_DIR=str(tmp_path / "state"),
        # a token of the test's own, so neither ~/.ray nor another head on this box is involved
        RAY_AUTH_TOKEN_PATH=str(tmp_path / "ray_auth_token"),
        # Ray's temp dir: short (its unix sockets must fit 107 characters), known to the test
        RAY_TMPDIR=tempfile.mkdtemp(prefix="drope-ray-", dir="/tmp"),
        RAY_NUM_CPUS="1",
        DROPE_UP_TIMEOUT="300",
    )
    return env


def _process_tree(pid_file: Path) -> set[int]:
    """The service's session leader and everything it spawned (Ray workers and agents included)."""
    root = psutil.Process(int(pid_file.read_text()))
    return {root.pid} | {p.pid for p in root.children(recursive=True)}


def _listening(pids: set[int] | None = None) -> list[tuple[str, int, int | None]]:
    return [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and (pids is None or c.pid in pids)]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_local_up_binds_loopback_only_and_local_down_stops_everything(tmp_path):
    ports = dict(zip(PORT_VARS, _free_ports(len(PORT_VARS))))
    env = _env(tmp_path, ports)
    state = tmp_path / "state"
    up = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True, timeout=400)
    try:
        assert up.returncode == 0, f"local-up.sh failed:\n{up.stdout}\n{up.stderr}"

        # The env file names the two addresses a client needs and never the token itself.
        lines = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines())
        assert lines["RAY_ADDRESS"] == f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}"
        assert lines["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['MLFLOW_PORT']}"
        assert lines["RAY_AUTH_MODE"] == "token"
        token = (tmp_path / "ray_auth_token").read_text().strip()
        assert len(token) >= 32 and token not in (state / "env").read_text()

        # Every listening socket of both process trees is on loopback, and the named ports are there.
        ours = _process_tree(state / "ray.pid") | _process_tree(state / "mlflow.pid")
        listening = _listening(ours)
        exposed = [(ip, port) for ip, port, _ in listening if ip not in LOOPBACK]
        assert not exposed, f"listening beyond loopback: {exposed}"
        bound = {port for _, port, _ in listening}
        for var in ("RAY_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_SERVER_PORT", "MLFLOW_PORT"):
            assert ports[var] in bound, f"{var}={ports[var]} not opened by the started services"
        # ...and no process at all (ours or not) holds one of those ports on a wildcard address.
        wildcard = [(ip, p) for ip, p, _ in _listening() if p in ports.values() and ip not in LOOPBACK]
        assert not wildcard, f"wildcard listeners on our ports: {wildcard}"

        health = urllib.request.urlopen(f"{lines['MLFLOW_TRACKING_URI']}/health", timeout=10)
        assert health.read().decode().strip() == "OK"

        # Token auth is on: the job API refuses an anonymous caller...
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{lines['RAY_ADDRESS']}/api/jobs/", timeout=10)
        assert refused.value.code in (401, 403)
        # ...and a client with the env file's settings reaches the GCS.
        client_env = {**env, **lines}  # what `set -a; . env` gives a user's shell
        # A GCS busy on a loaded box can miss the client's connect timeout, and Ray's monitor
        # posts the first cluster status some seconds after the head answers ("No cluster
        # status. It may take a few seconds..."): ask again, for at most 90 s.
        deadline = time.monotonic() + 90
        while True:
            status = subprocess.run(
                [str(REPO / ".venv" / "bin" / "ray"), "status", "--address",
                 lines["RAY_GCS_ADDRESS"]],
                env=client_env, capture_output=True, text=True, timeout=120,
            )
            retry = "Timed out" in status.stderr or "No cluster status" in status.stdout
            if not retry or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "Active:" in status.stdout and "1.0 CPU" in status.stdout, status.stdout
    finally:
        down = subprocess.run(["bash", str(DOWN)], env=env, capture_output=True, text=True,
                              timeout=200)
    assert down.returncode == 0, f"local-down.sh failed:\n{down.stdout}\n{down.stderr}"
    still_open = {var: port for var, port in ports.items() if _port_open(port)}
    assert not still_open, f"ports still open after local-down.sh: {still_open}"
    assert not (state / "ray.pid").exists() and not (state / "mlflow.pid").exists()
    assert not (state / "env").exists(), "env file left behind: clients would submit to nothing"
    marks = (str(state), env["RAY_TMPDIR"])  # MLflow's command line names the state dir, Ray's its temp dir
    leftovers = [p.info for p in psutil.process_iter(["pid", "cmdline", "status"])
                 if p.info["status"] != psutil.STATUS_ZOMBIE
                 and any(m in " ".join(p.info["cmdline"] or []) for m in marks)]
    assert not leftovers, f"processes of this cluster still running: {leftovers}"
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def test_local_up_refuses_a_taken_port_naming_the_variable(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = dict(zip(PORT_VARS, _free_ports(len(PORT_VARS))))
        ports["MLFLOW_PORT"] = taken
        env = _env(tmp_path, ports)
        run = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True, timeout=60)
    os.rmdir(env["RAY_TMPDIR"])  # still empty: nothing started
    assert run.returncode == 2
    assert f"port {taken}" in run.stderr and "MLFLOW_PORT" in run.stderr, run.stderr
    assert not (tmp_path / "state" / "ray.pid").exists(), "started a service despite the clash"
