"""hf:// sources without the hub: a real Hugging Face cache on disk (offline), laid out as the hub's
client writes it (blobs named by their etag: sha256 for LFS files, git sha1 otherwise; snapshots of
relative symlinks; refs/main), so huggingface_hub's own snapshot_download resolves it.
"""

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
import pytest

from drope_ops import manifest as mf
from drope_ops.errors import CheckpointError, StorageError
from drope_ops.fetch import fetch

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS = (".safetensors", ".bin", ".gguf")


def add_to_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Write `files` as snapshot `commit` (branch main) of model repo_id in the HF cache at `cache`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        if name.endswith(LFS):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    # huggingface_hub reads these at import time; its functions look them up on each call
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def hub_repo(hf_cache, debug_checkpoint):
    files = {p.name: p.read_bytes() for p in debug_checkpoint.iterdir() if p.is_file()}
    files.update({"README.md": b"# tiny", ".gitattributes": b"*.safetensors filter=lfs",
                  "modeling_tiny.py": b"raise SystemExit('executed')", "pytorch_model.bin": b"not loaded"})
    return add_to_hf_cache(hf_cache, "drope-test/tiny-llama", files)


def test_fetch_from_hf_cache_takes_only_safe_files(hub_repo, debug_checkpoint, tmp_path):
    res = fetch("hf://drope-test/tiny-llama", str(tmp_path / "dst"), progress=False)
    dst = tmp_path / "dst"
    names = {p.name for p in dst.iterdir()}
    assert names == {p.name for p in debug_checkpoint.iterdir()} | {mf.MANIFEST_NAME}
    assert mf.verify_manifest(dst) == [] and mf.read_manifest(dst)["source"] == "hf://drope-test/tiny-llama"
    assert (dst / "model.safetensors").read_bytes() == (debug_checkpoint / "model.safetensors").read_bytes()
    pinned = fetch(f"hf://drope-test/tiny-llama@{COMMIT}", str(tmp_path / "pinned"), progress=False)
    assert pinned.manifest_digest == res.manifest_digest


def test_corrupt_cached_blob_fails_the_hubs_sha256(hub_repo, tmp_path):
    blob = Path(os.path.realpath(hub_repo / "model.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        fetch("hf://drope-test/tiny-llama", str(tmp_path / "dst"), progress=False)
    assert not (tmp_path / "dst").exists()


def test_offline_with_nothing_cached_is_one_clear_error(hf_cache, tmp_path):
    with pytest.raises(StorageError, match="not \\(completely\\) in the local Hugging Face cache"):
        fetch("hf://drope-test/absent", str(tmp_path / "dst"), progress=False)
    with pytest.raises(StorageError, match="local Hugging Face cache"):
        fetch("hf://drope-test/absent@v9", str(tmp_path / "dst"), progress=False)
    assert not (tmp_path / "dst").exists()


def test_pickle_only_hub_repo_is_refused(hf_cache, debug_checkpoint, tmp_path):
    files = {"config.json": (debug_checkpoint / "config.json").read_bytes(), "pytorch_model.bin": b"x"}
    add_to_hf_cache(hf_cache, "drope-test/pickled", files)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        fetch("hf://drope-test/pickled", str(tmp_path / "dst"), progress=False)


def test_non_rope_hub_model_is_refused(hf_cache, tmp_path):
    files = {"config.json": json.dumps({"model_type": "gpt2", "n_positions": 1024}).encode(),
             "model.safetensors": b"\0" * 16}
    add_to_hf_cache(hf_cache, "drope-test/gpt2ish", files)
    with pytest.raises(CheckpointError, match="absolute"):
        fetch("hf://drope-test/gpt2ish", str(tmp_path / "dst"), progress=False)
    assert not (tmp_path / "dst").exists()


# ---------------------------------------------------------------- a tiny hub on 127.0.0.1
# Enough of the hub's HTTP API for huggingface_hub's snapshot_download: repo info, the file tree (with
# LFS sha256), and resolve/ with the X-Repo-Commit / X-Linked-Etag / X-Linked-Size headers. Unknown
# repos and revisions answer 404 with the X-Error-Code the real hub sends.
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from urllib.parse import unquote, urlparse  # noqa: E402

HF_SECRET = "hf_drope_test_secret_token_5x9q"


class _Hub(BaseHTTPRequestHandler):
    repos: dict = {}  # repo_id -> {name: bytes}
    requests: list = []

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", headers=None, head=False):
        self.send_response(code)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj):
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _route(self, head=False):
        path = unquote(urlparse(self.path).path)
        self.requests.append((self.command, path, self.headers.get("authorization", "")))
        parts = path.strip("/").split("/")
        if parts[0] == "api" and parts[1] == "models":
            repo, rest = "/".join(parts[2:4]), parts[4:]
        else:
            repo, rest = "/".join(parts[0:2]), parts[2:]
        if repo not in self.repos:
            return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)
        files = self.repos[repo]
        rev = rest[1] if len(rest) > 1 else "main"
        if rev not in ("main", COMMIT):
            return self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound"}, head)
        if parts[0] == "api" and (not rest or rest[0] == "revision"):
            return self._json({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": n} for n in files]})
        if parts[0] == "api" and rest[0] == "tree":
            tree = []
            for n, data in files.items():
                entry = {"type": "file", "path": n, "size": len(data),
                         "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                if n.endswith(LFS):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
                tree.append(entry)
            return self._json(tree)
        if rest and rest[0] == "resolve":
            name = "/".join(rest[2:])
            if name not in files:
                return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"}, head)
            data = files[name]
            etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS) else \
                hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            return self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"',
                                          "X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}, head)
        return self._send(404, b"{}", {}, head)

    def do_GET(self):
        self._route()

    def do_HEAD(self):
        self._route(head=True)


@pytest.fixture
def hub(tmp_path, monkeypatch, debug_checkpoint):
    files = {p.name: p.read_bytes() for p in debug_checkpoint.iterdir() if p.is_file()}
    files.update({"README.md": b"# tiny", "modeling_tiny.py": b"raise SystemExit(1)", "pytorch_model.bin": b"x"})
    _Hub.repos, _Hub.requests = {"drope-test/tiny-llama": files}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)  # what HF_ENDPOINT sets at import
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    yield {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(cache)}
    server.shutdown()


def test_download_through_the_hub_api_with_allow_patterns(hub, debug_checkpoint, tmp_path):
    res = fetch("hf://drope-test/tiny-llama", str(tmp_path / "dst"), progress=False)
    dst = tmp_path / "dst"
    assert {p.name for p in dst.iterdir()} == {p.name for p in debug_checkpoint.iterdir()} | {mf.MANIFEST_NAME}
    fetched = {p.split("/")[-1] for m, p, _ in _Hub.requests if m == "GET" and "/resolve/" in p}
    assert "modeling_tiny.py" not in fetched and "pytorch_model.bin" not in fetched and "README.md" not in fetched
    assert res.files_transferred == len(list(debug_checkpoint.iterdir()))
    again = fetch("hf://drope-test/tiny-llama", str(tmp_path / "dst"), progress=False)
    assert (again.files_transferred, again.bytes_transferred) == (0, 0)


def test_hub_repo_and_revision_not_found_are_one_line_errors(hub, tmp_path):
    with pytest.raises(StorageError, match="hub repo drope-test/nope not found"):
        fetch("hf://drope-test/nope", str(tmp_path / "a"), progress=False)
    with pytest.raises(StorageError, match="revision 'v9' not found in hub repo drope-test/tiny-llama"):
        fetch("hf://drope-test/tiny-llama@v9", str(tmp_path / "b"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_honours_hf_endpoint_and_never_prints_the_token(hub, tmp_path):
    env = {**os.environ, **hub, "HF_TOKEN": HF_SECRET}
    r = subprocess.run([sys.executable, "-m", "workflows.cli", "fetch", "hf://drope-test/tiny-llama",
                        str(tmp_path / "dst")], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).parents[2])
    assert r.returncode == 0, r.stderr
    assert any(auth == f"Bearer {HF_SECRET}" for _, _, auth in _Hub.requests), "HF_TOKEN was not used"
    for blob in [r.stdout, r.stderr] + [p.read_text(errors="replace") for p in (tmp_path / "dst").iterdir()]:
        assert HF_SECRET not in blob
