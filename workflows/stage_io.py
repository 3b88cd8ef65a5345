"""Moving stage inputs and outputs between the run's storage (local or s3://) and a node's own disk.

Only URIs cross a node: whatever runs on a node (a stage task, a Ray Train worker, a fit task, an
evaluation unit) calls `materialize(uri)` there and gets a local directory. On local storage that is
the path itself (checked complete); on S3 the checkpoint is downloaded once per node into the node's
scratch (DROPE_SCRATCH, default <tmp>/drope-scratch), verified against its manifest, under a file lock
so that the workers of one node share one copy. `materialize_metadata` brings only the small files
(config, tokenizer) for code that needs no weights. Outputs are computed into scratch and published
by `output_dir`: objects first, the manifest last.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from drope_ops import storage
from drope_ops.errors import CheckpointError
from drope_ops.manifest import MANIFEST_NAME

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
LOCK_WAIT_S = 3600  # another process of this node downloading the same checkpoint (7B: minutes)


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def scratch_root() -> Path:
    root = Path(os.environ.get("DROPE_SCRATCH", Path(tempfile.gettempdir()) / "drope-scratch"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _cache_path(uri: str, kind: str) -> Path:
    return scratch_root() / kind / uri.replace("s3://", "").replace("/", "__")


@contextmanager
def _node_lock(path: Path, what: str):
    """An exclusive lock shared by this node's processes (a file lock beside `path`), bounded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as f:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CheckpointError(f"waited {LOCK_WAIT_S}s for another process on this node to finish "
                                          f"downloading {what} ({path}.lock); remove the stale lock") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def materialize(uri: str) -> Path:
    """A local directory on this node holding the complete checkpoint at `uri` (cached per node)."""
    if not is_remote(uri):
        if not storage.checkpoint_complete(uri):
            raise CheckpointError(f"{uri} is not a complete checkpoint (no manifest or files missing): rerun its stage")
        return Path(uri)
    local = _cache_path(uri, "inputs")
    with _node_lock(local, uri):
        return storage.get_checkpoint(uri, local)


def local_dir(uri: str) -> Path:
    """`uri` as a directory on this node: S3 is materialized; a local path is taken as given (a user's
    own directory may have no manifest; the caller checked it)."""
    return materialize(uri) if is_remote(uri) else Path(uri)


def materialize_metadata(uri: str) -> Path:
    """A local directory with the checkpoint's small files only (config.json, tokenizer, ...): what
    validation and tokenizer-only code need, without downloading the weights."""
    if not is_remote(uri):
        return Path(uri)
    manifest = storage.read_checkpoint_manifest(uri)
    if manifest is None:
        raise CheckpointError(f"{uri} has no {MANIFEST_NAME}: it is incomplete; rerun the stage that writes it")
    local = _cache_path(uri, "metadata")
    with _node_lock(local, uri):
        for rel in manifest["files"]:
            if not rel.endswith(WEIGHT_SUFFIXES) and not (local / rel).is_file():
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                tmp = local / f"{rel}.part"
                tmp.write_bytes(storage.read_bytes(storage.join(uri, rel)))
                os.replace(tmp, local / rel)
    return local


@contextmanager
def output_dir(uri: str):
    """Yield a local directory path that does not exist yet; the stage writes its checkpoint there
    (atomically, with a manifest). On exit it is published to `uri`."""
    if not is_remote(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        if Path(uri).exists():  # an earlier attempt that died before its manifest: never read, replace it
            shutil.rmtree(uri)
        yield Path(uri)
        return
    work = Path(tempfile.mkdtemp(dir=scratch_root(), prefix="out-"))
    try:
        yield work / "ckpt"
        storage.put_checkpoint(work / "ckpt", uri)
    finally:
        shutil.rmtree(work, ignore_errors=True)
