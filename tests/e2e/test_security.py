"""Security checks through the real CLI: secrets in the environment never reach MLflow (database and
artifact store), the ledger on S3, DROPE_HOME, the Ray session logs or the CLI's output; and a fetched
checkpoint's Python files never execute. (127.0.0.1-only listening of cluster/local-up.sh:
tests/integration/test_local_up.py.)"""

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.fixtures.services import s3_env_vars
from tests.fixtures.workflow_services import VENV_BIN, run_drope

# distinctive fake secrets: any occurrence in a byte stream is a leak
SECRET_KEY = f"drope-SECRET-{uuid.uuid4().hex}"
ACCESS_KEY = f"AKIADROPE{uuid.uuid4().hex[:12].upper()}"
HF_TOKEN = f"hf_dropeToken{uuid.uuid4().hex}"
SECRETS = [SECRET_KEY, ACCESS_KEY, HF_TOKEN]


def _leaks(data: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in data]


def _scan_tree(root: Path) -> dict[str, list[str]]:
    """{file: [secrets found]} over every regular file under root (sqlite db, logs, artifacts...)."""
    found = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                hits = _leaks(p.read_bytes())
            except OSError:  # a socket or a file removed while we walk (Ray session dirs)
                continue
            if hits:
                found[str(p)] = hits
    return found


@pytest.fixture
def secret_env(tmp_path, moto_server):
    """CLI env: fake AWS keys that moto accepts, an HF token, S3 on moto, MLflow embedded in
    DROPE_HOME (sqlite + local artifacts, so the database file itself is searched), and a private
    Ray temp dir so this run's session logs are the ones searched."""
    ray_tmp = tempfile.mkdtemp(prefix="rsec", dir="/tmp")  # short: Ray's unix sockets live here
    e = {**os.environ, **s3_env_vars(moto_server), "AWS_ACCESS_KEY_ID": ACCESS_KEY,
         "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "HF_TOKEN": HF_TOKEN, "HUGGING_FACE_HUB_TOKEN": HF_TOKEN,
         "DROPE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp,
         "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_PROFILE"):
        e.pop(k, None)
    yield e
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_secrets_never_recorded(secret_env, moto_server):
    import boto3

    bucket = f"drope-sec-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                      aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    s3.create_bucket(Bucket=bucket)
    run_id = "sec-run"
    proc = run_drope(["run", "debug", "--run-id", run_id, "--set", "recalibrate.steps=2",
                      "--set", f"storage.root=s3://{bucket}/runs"], secret_env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the run really used S3 and MLflow: otherwise the searches below prove nothing
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert any(k.startswith(f"runs/{run_id}/") for k in keys), keys[:20]
    home = Path(secret_env["DROPE_HOME"])
    assert (home / "mlflow.db").exists(), sorted(p.name for p in home.iterdir())

    assert _leaks(proc.stdout.encode()) == [] and _leaks(proc.stderr.encode()) == []
    # the ledger, checkpoints and results on S3: every object
    leaked = {k: _leaks(s3.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys}
    assert not {k: v for k, v in leaked.items() if v}
    # DROPE_HOME holds the MLflow sqlite database, its artifact store and the run index
    assert not _scan_tree(home)
    # the Ray session of this run: driver, worker and raylet logs
    ray_tmp = Path(secret_env["RAY_TMPDIR"])
    assert list(ray_tmp.rglob("*.log")) or list(ray_tmp.rglob("*.out")), "no Ray logs to search"
    assert not _scan_tree(ray_tmp)


EVIL_MODULE = '''
import pathlib
pathlib.Path({marker!r}).write_text("executed")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "llama"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


def _assert_clean_drope_checkpoint(path: Path, marker: Path) -> None:
    """A drop-rope output: no Python, no auto_map, a DroPE config, a verifying manifest, and it loads
    with plain transformers (no trust_remote_code) without running the planted module."""
    from transformers import AutoModelForCausalLM

    import drope_ops  # noqa: F401  (registers model_type "drope")
    from drope_ops.manifest import verify_manifest

    assert not list(path.rglob("*.py")), sorted(p.name for p in path.iterdir())
    config = json.loads((path / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "drope"
    assert verify_manifest(path) == []
    AutoModelForCausalLM.from_pretrained(path)
    assert not marker.exists(), f"{path.name}: loading it ran the planted code"


def test_fetched_python_never_executes(tmp_path, debug_checkpoint):
    """A checkpoint that ships modeling_evil.py and an auto_map pointing at it: fetch (even with
    --allow-code, which copies the file) and drop_rope load it as data; the module never runs."""
    import subprocess
    import sys

    marker = tmp_path / "EXECUTED"
    src = tmp_path / "evil-src"
    shutil.copytree(debug_checkpoint, src)
    (src / "modeling_evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    (src / "configuration_evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (src / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}

    # control: the planted module does leave its mark when something runs it, so its absence means it never ran
    control = tmp_path / "CONTROL"
    (tmp_path / "control_evil.py").write_text(EVIL_MODULE.format(marker=str(control)))
    subprocess.run([sys.executable, str(tmp_path / "control_evil.py")], env=env, check=True, timeout=300)
    assert control.read_text() == "executed"

    for flags, dest in (([], tmp_path / "fetched"), (["--allow-code"], tmp_path / "fetched-code")):
        proc = run_drope(["fetch", str(src), str(dest), "--no-progress", *flags], env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if not flags:  # the default keeps code out of the checkpoint altogether
            assert not list(dest.glob("*.py"))
            assert "auto_map" not in json.loads((dest / "config.json").read_text())
        else:  # --allow-code copies the code and its auto_map, as data
            assert sorted(p.name for p in dest.glob("*.py")) == ["configuration_evil.py", "modeling_evil.py"]
            assert json.loads((dest / "config.json").read_text())["auto_map"] == cfg["auto_map"]
        assert not marker.exists(), f"fetch {flags}: the checkpoint's Python code ran"
        out = tmp_path / f"{dest.name}-drope"
        proc = run_drope(["drop-rope", str(dest), str(out)], env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not marker.exists(), f"{dest.name}: the checkpoint's Python code ran"
        _assert_clean_drope_checkpoint(out, marker)

    # drop_rope straight off the source dir (code and auto_map present): it either transforms the
    # weights as data (today) or refuses in one line naming the custom code; never any other failure
    out = tmp_path / "direct-drope"
    proc = run_drope(["drop-rope", str(src), str(out)], env, timeout=300)
    assert not marker.exists(), "drop-rope ran the source checkpoint's Python code"
    if proc.returncode == 0:
        _assert_clean_drope_checkpoint(out, marker)
    else:
        from drope_ops.errors import CheckpointError

        assert proc.returncode == CheckpointError.exit_code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        refusal = [ln for ln in proc.stderr.splitlines() if ln.startswith("drope drop-rope: error: ")]
        assert len(refusal) == 1 and ("auto_map" in refusal[0] or ".py" in refusal[0]), proc.stderr[-3000:]
        assert not out.exists()
    assert not list((tmp_path / "hf-modules").rglob("*evil*"))  # not even copied into transformers' module cache
    assert not marker.exists()
