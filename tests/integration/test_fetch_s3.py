"""Checkpoints through a real S3 API: a moto_server process on 127.0.0.1 (tests/fixtures/services.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch

from drope_ops import manifest as mf
from drope_ops import storage, transfer
from drope_ops.errors import CheckpointError, StorageError
from drope_ops.fetch import fetch

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY-9f3c"
KEY_ID = "AKIADROPETESTKEY7Q2X"


def _s3(s3_env):
    return boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=Path(__file__).parents[2])


def test_sharded_roundtrip_and_complete_destination_transfers_nothing(
        s3_bucket, sharded_debug_checkpoint, tmp_path):
    uri = f"s3://{s3_bucket}/models/debug"
    digest = storage.put_checkpoint(sharded_debug_checkpoint, uri)
    assert storage.checkpoint_complete(uri)
    assert digest == mf.manifest_digest(mf.build_manifest(sharded_debug_checkpoint))
    local = storage.get_checkpoint(uri, tmp_path / "back")
    assert mf.verify_manifest(local) == []
    for p in sharded_debug_checkpoint.iterdir():
        assert (local / p.name).read_bytes() == p.read_bytes()
    assert storage.put_checkpoint(sharded_debug_checkpoint, uri) == digest  # no-op rewrite
    again = fetch(uri, str(tmp_path / "fetched"), progress=False)
    again2 = fetch(uri, str(tmp_path / "fetched"), progress=False)
    assert again.files_transferred > 5 and (again2.files_transferred, again2.bytes_transferred) == (0, 0)


def test_interrupted_upload_resumes_with_only_missing_objects(s3_bucket, s3_env, sharded_debug_checkpoint):
    uri = f"s3://{s3_bucket}/up"
    storage.put_checkpoint(sharded_debug_checkpoint, uri)
    shard = sorted(p.name for p in sharded_debug_checkpoint.glob("model-*.safetensors"))[2]
    # as if the uploader died after some objects and before the manifest
    _s3(s3_env).delete_object(Bucket=s3_bucket, Key=f"up/{mf.MANIFEST_NAME}")
    _s3(s3_env).delete_object(Bucket=s3_bucket, Key=f"up/{shard}")
    manifest = mf.build_manifest(sharded_debug_checkpoint)
    files = {rel: sharded_debug_checkpoint / rel for rel in manifest["files"]}
    stats = transfer.publish(files, manifest, uri)
    assert (stats.files, stats.bytes) == (1, (sharded_debug_checkpoint / shard).stat().st_size)
    assert storage.checkpoint_complete(uri)


def test_interrupted_download_resumes_with_only_missing_chunks(
        s3_bucket, sharded_debug_checkpoint, tmp_path, monkeypatch):
    uri = f"s3://{s3_bucket}/models/debug"
    storage.put_checkpoint(sharded_debug_checkpoint, uri)
    manifest = storage.read_checkpoint_manifest(uri)
    total = sum(m["size"] for m in manifest["files"].values())
    monkeypatch.setattr(transfer, "CHUNK", 8 << 10)  # several chunks per ~45 KB shard
    monkeypatch.setattr(transfer, "CONCURRENCY", 2)
    got = []

    def interrupt(nbytes):  # what a Ctrl-C or a lost node does half-way through
        got.append(nbytes)
        if sum(got) > total // 2:
            raise KeyboardInterrupt

    dest = tmp_path / "dest"
    with pytest.raises(KeyboardInterrupt):
        transfer.download_checkpoint(uri, manifest, dest, on_chunk=interrupt)
    assert not dest.exists(), "an interrupted download must not leave a destination"
    assert transfer.staging_dir(dest).exists()
    before = sum(got)
    res = fetch(uri, str(dest), progress=False)
    assert mf.verify_manifest(dest) == [] and not transfer.staging_dir(dest).exists()
    remaining = total - before
    assert res.bytes_transferred <= remaining + 2 * (8 << 10), (res.bytes_transferred, remaining)
    assert res.bytes_transferred < total
    # a damaged file in a complete destination: only that file is fetched again
    shard = sorted(dest.glob("model-*.safetensors"))[1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 3)
    fixed = fetch(uri, str(dest), progress=False)
    assert (fixed.files_transferred, fixed.bytes_transferred) == (1, size)
    assert mf.verify_manifest(dest) == []


def test_corrupted_object_is_detected_and_nothing_is_left(s3_bucket, s3_env, sharded_debug_checkpoint, tmp_path):
    uri = f"s3://{s3_bucket}/models/debug"
    storage.put_checkpoint(sharded_debug_checkpoint, uri)
    shard = sorted(p.name for p in sharded_debug_checkpoint.glob("model-*.safetensors"))[0]
    body = bytearray((sharded_debug_checkpoint / shard).read_bytes())
    body[-10] ^= 0xFF  # same size, one flipped byte: only the sha256 can tell
    _s3(s3_env).put_object(Bucket=s3_bucket, Key=f"models/debug/{shard}", Body=bytes(body))
    dest = tmp_path / "dest"
    with pytest.raises(CheckpointError, match=f"sha256 mismatch persists after a retry for {shard}"):
        fetch(uri, str(dest), progress=False)
    assert list(tmp_path.iterdir()) == [], "a failed fetch left files behind"


def _upload_plain(s3_env, bucket, prefix, ckpt, skip=()):
    """A checkpoint as another tool leaves it in S3: its files, no drope-manifest.json."""
    for p in ckpt.iterdir():
        if p.is_file() and p.name != mf.MANIFEST_NAME and p.name not in skip:
            _s3(s3_env).upload_file(str(p), bucket, f"{prefix}/{p.name}")
    return f"s3://{bucket}/{prefix}"


def test_plain_hugging_face_checkpoint_in_s3_is_fetched_and_verified(
        s3_bucket, s3_env, sharded_debug_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    uri = _upload_plain(s3_env, s3_bucket, "plain", sharded_debug_checkpoint)
    assert not storage.checkpoint_complete(uri)
    with pytest.raises(CheckpointError, match="has no drope-manifest.json"):
        storage.get_checkpoint(uri, tmp_path / "x")  # a stage output without manifest is still half-written
    r = _cli("fetch", uri, str(tmp_path / "y"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert mf.verify_manifest(tmp_path / "y") == []  # the manifest written locally matches every file
    assert mf.read_manifest(tmp_path / "y")["source"] == uri
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "y")
    theirs = AutoModelForCausalLM.from_pretrained(sharded_debug_checkpoint)
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def _one_line_fetch_error(uri, dest):
    r = _cli("fetch", uri, str(dest), "--no-progress")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and not dest.exists()
    return r.stderr


def test_plain_checkpoint_with_a_missing_or_foreign_shard_is_refused(
        s3_bucket, s3_env, sharded_debug_checkpoint, tmp_path):
    shards = sorted(p.name for p in sharded_debug_checkpoint.glob("model-*.safetensors"))
    uri = _upload_plain(s3_env, s3_bucket, "missing", sharded_debug_checkpoint, skip=(shards[1],))
    err = _one_line_fetch_error(uri, tmp_path / "a")
    assert shards[1] in err and "index" in err
    # every shard there, but one is another save's (its tensors are not the ones the index puts in it)
    uri = _upload_plain(s3_env, s3_bucket, "foreign", sharded_debug_checkpoint)
    _s3(s3_env).upload_file(str(sharded_debug_checkpoint / shards[0]), s3_bucket, f"foreign/{shards[1]}")
    err = _one_line_fetch_error(uri, tmp_path / "b")
    assert shards[1] in err and "tensor" in err
    # a truncated shard: shorter than its header says
    uri = _upload_plain(s3_env, s3_bucket, "cut", sharded_debug_checkpoint)
    body = (sharded_debug_checkpoint / shards[0]).read_bytes()
    _s3(s3_env).put_object(Bucket=s3_bucket, Key=f"cut/{shards[0]}", Body=body[:-16])
    err = _one_line_fetch_error(uri, tmp_path / "c")
    assert shards[0] in err and "truncated" in err


def test_plain_checkpoint_without_tokenizer_is_refused(s3_bucket, s3_env, debug_checkpoint, tmp_path):
    uri = _upload_plain(s3_env, s3_bucket, "notok", debug_checkpoint, skip=("tokenizer.json",))
    err = _one_line_fetch_error(uri, tmp_path / "d")
    assert "no tokenizer files" in err and "tokenizer.json" in err and uri in err


def test_missing_bucket_and_unknown_scheme_are_one_line_errors(s3_env, tmp_path, debug_checkpoint):
    r = _cli("fetch", "s3://no-such-bucket-drope/x", str(tmp_path / "d"), "--no-progress")
    assert r.returncode == 2 and "bucket 'no-such-bucket-drope' does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    with pytest.raises(StorageError, match="does not exist"):
        fetch(str(debug_checkpoint), "s3://no-such-bucket-drope/x", progress=False)
    with pytest.raises(StorageError, match="unknown destination scheme"):
        fetch(str(debug_checkpoint), "gs://b/x", progress=False)


def test_pickle_only_checkpoint_on_s3(s3_bucket, debug_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "pickled"
    shutil.copytree(debug_checkpoint, src, ignore=shutil.ignore_patterns("*.safetensors*"))
    ours = AutoModelForCausalLM.from_pretrained(debug_checkpoint)
    torch.save(ours.state_dict(), src / "pytorch_model.bin")
    uri = f"s3://{s3_bucket}/pickled"
    storage.put_checkpoint(src, uri)  # storage moves any bytes; fetch is where the policy lives
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        fetch(uri, str(tmp_path / "refused"), progress=False)
    assert not (tmp_path / "refused").exists()
    fetch(uri, str(tmp_path / "converted"), allow_pickle=True, progress=False)
    out = tmp_path / "converted"
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    theirs = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(theirs(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_ledger_bytes_api_is_the_same_on_local_and_s3(where, tmp_path, request):
    root = str(tmp_path / "ledger") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/ledger"
    storage.write_bytes(storage.join(root, "r1", "fetch.json"), b'{"state": "done"}')
    storage.write_bytes(storage.join(root, "r1", "sub", "x.json"), b"{}")
    storage.write_bytes(storage.join(root, "r10", "fetch.json"), b"{}")
    assert storage.read_bytes(storage.join(root, "r1", "fetch.json")) == b'{"state": "done"}'
    assert storage.list_prefix(storage.join(root, "r1")) == [
        storage.join(root, "r1", "fetch.json"), storage.join(root, "r1", "sub", "x.json")]
    assert storage.exists(storage.join(root, "r1")) and storage.exists(storage.join(root, "r1", "fetch.json"))
    assert not storage.exists(storage.join(root, "r2")) and storage.list_prefix(storage.join(root, "r2")) == []
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes(storage.join(root, "r2", "nope.json"))


def test_credentials_never_reach_logs_or_manifests(s3_bucket, s3_env, debug_checkpoint, tmp_path):
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}  # moto accepts any keys
    uri = f"s3://{s3_bucket}/cred"
    calls = [["fetch", str(debug_checkpoint), uri], ["fetch", uri, str(tmp_path / "dest")],
             ["fetch", f"s3://{s3_bucket}/missing", str(tmp_path / "x")]]
    # three CLI calls in one interpreter (one start-up), exit codes printed last
    code = (f"import sys; from workflows.cli import main; rcs = [main(a) for a in {calls!r}]; "
            f"print('RCS', rcs)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, **env}, cwd=Path(__file__).parents[2])
    assert "RCS [0, 0, 2]" in r.stdout, r.stdout + r.stderr
    written = [p.read_bytes() for p in (tmp_path / "dest").rglob("*") if p.is_file()]
    written += [storage.read_bytes(u) for u in storage.list_prefix(uri)]
    written += [(r.stdout + r.stderr).encode()]
    for blob in written:
        assert SECRET.encode() not in blob and KEY_ID.encode() not in blob


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    return ok


def test_disk_full_is_one_line_and_leaves_nothing(s3_bucket, sharded_debug_checkpoint, tmp_path):
    uri = f"s3://{s3_bucket}/models/debug"
    storage.put_checkpoint(sharded_debug_checkpoint, uri)
    small = tmp_path / "small"
    if _tmpfs(small, "128k"):  # a real full disk (needs root)
        try:
            with pytest.raises(StorageError, match="disk full"):
                fetch(uri, str(small / "dest"), progress=False)
            assert list(small.iterdir()) == []
        finally:
            r = subprocess.run(["umount", str(small)], capture_output=True, text=True)
            if r.returncode != 0:  # never leave a mount behind, then say why (an fd left open)
                subprocess.run(["umount", "-l", str(small)])
            assert r.returncode == 0, r.stderr
        return
    # no mount rights: a per-process file-size quota (RLIMIT_FSIZE) gives the same EFBIG path
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
            "from workflows.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "fetch", uri, str(small / "dest"), "--no-progress"],
                       capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert r.returncode == 2 and "disk full or quota exceeded" in r.stderr, r.stderr
    assert list(small.iterdir()) == []


def test_get_checkpoint_replaces_its_stale_copy_of_a_rewritten_uri(s3_bucket, debug_checkpoint, tmp_path):
    from drope_ops.debugmodel import make_debug_checkpoint

    uri = f"s3://{s3_bucket}/stage-out"
    storage.put_checkpoint(debug_checkpoint, uri)
    local = storage.get_checkpoint(uri, tmp_path / "cache")
    newer = make_debug_checkpoint(tmp_path / "newer", seed=1)
    digest = storage.put_checkpoint(newer, uri)  # the stage ran again and rewrote its output
    assert mf.manifest_digest(storage.read_checkpoint_manifest(uri)) == digest
    local = storage.get_checkpoint(uri, tmp_path / "cache")
    assert (local / "model.safetensors").read_bytes() == (newer / "model.safetensors").read_bytes()
    # a different checkpoint that did not come from this URI is never overwritten
    with pytest.raises(StorageError, match="different checkpoint"):
        fetch(str(debug_checkpoint), str(tmp_path / "cache"), progress=False)


def test_no_access_is_a_one_line_error(tmp_path, monkeypatch):
    from tests.fixtures.services import s3_env_vars, start_moto_server

    proc, endpoint = start_moto_server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # moto enforcing IAM
    try:
        for k, v in s3_env_vars(endpoint).items():
            monkeypatch.setenv(k, v)
        with pytest.raises(StorageError, match="no access to s3://locked/ckpt"):
            fetch("s3://locked/ckpt", str(tmp_path / "dst"), progress=False)
        assert list(tmp_path.iterdir()) == []
    finally:
        proc.terminate()
        proc.wait()


def test_yarn_scaled_checkpoint_keeps_its_pretraining_context(s3_bucket, s3_env, yarn_checkpoint, tmp_path):
    """A checkpoint already extended with YaRN (factor 4 over 128): fetch and drop-rope take C_train = 128,
    the pre-scaling context, not the extended 512, and record the scaling they removed."""
    import json

    uri = _upload_plain(s3_env, s3_bucket, "yarn", yarn_checkpoint)
    r = _cli("fetch", uri, str(tmp_path / "base"), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = _cli("drop-rope", str(tmp_path / "base"), str(tmp_path / "drope"), "--no-progress")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "drope" / "config.json").read_text())
    assert out["original_max_position_embeddings"] == 128
    assert out["rope_parameters"]["rope_type"] == "default"  # layers that keep RoPE get the pretraining RoPE
    assert out["source_rope_parameters"]["rope_type"] == "yarn" and out["source_rope_parameters"]["factor"] == 4.0
    # linear scaling that does not say its pretraining context: one line asking for it
    linear = shutil.copytree(yarn_checkpoint, tmp_path / "linear-src")  # the session's fixture stays as it is
    cfg = json.loads((linear / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    (linear / "config.json").write_text(json.dumps(cfg))
    r = _cli("drop-rope", str(linear), str(tmp_path / "linear"), "--no-progress")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "'linear'" in r.stderr and "--original-context" in r.stderr and not (tmp_path / "linear").exists()
    r = _cli("drop-rope", str(linear), str(tmp_path / "linear"), "--no-progress", "--original-context", "128")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "linear" / "config.json").read_text())["original_max_position_embeddings"] == 128
