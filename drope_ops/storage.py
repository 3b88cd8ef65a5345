"""The run's storage: one set of functions for a local directory and for `s3://bucket/prefix`.

Every stage reads and writes through these, so the same code runs on a laptop (local disk) and on a
Ray cluster whose nodes share S3. Small records (the ledger's JSON) go through write_bytes / read_bytes
/ list_prefix; checkpoints go through put_checkpoint / get_checkpoint, which keep the sha256 manifest
of drope_ops.manifest and are complete or absent:

- local: files are written into a hidden staging directory beside the target, then renamed;
- S3: objects first, `drope-manifest.json` last; a prefix without its manifest is never read.

URIs, the S3 client, error translation and manifest reads live in drope_ops.storage_base (re-exported
here); the file movers in drope_ops.transfer / drope_ops.ranged_get build on that layer, not on this
module, so storage -> transfer -> ranged_get -> storage_base is a DAG.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from drope_ops import manifest as mf
from drope_ops import transfer
from drope_ops.errors import CheckpointError, StorageError
# The low layer, re-exported: callers keep writing storage.join / storage.is_s3 / storage.checkpoint_complete.
from drope_ops.storage_base import (checkpoint_complete, disk_error, is_missing, is_s3, join,  # noqa: F401
                                    read_checkpoint_manifest, s3_call, s3_client, s3_error, s3_sizes,
                                    split_s3)

log = logging.getLogger("drope.storage")


# ---------------------------------------------------------------- small objects (the ledger)

def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: local temp file + rename; on S3 a single PUT (atomic there)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_call(uri, s3_client().put_object, Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if "tmp" in locals() and os.path.exists(tmp):
            os.unlink(tmp)
        raise disk_error(e, path) from None


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_call(uri, s3_client().get_object, Bucket=bucket, Key=key)["Body"].read()
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise StorageError(f"{uri} does not exist") from None


def exists(uri: str) -> bool:
    """True for an existing file / object, or a directory / prefix holding at least one object."""
    if not is_s3(uri):
        return Path(uri).exists()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    client = s3_client()
    if key:
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if not is_missing(e):
                raise s3_error(e, uri) from None
    prefix = f"{key}/" if key else ""
    resp = s3_call(uri, client.list_objects_v2, Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return resp.get("KeyCount", 0) > 0


def list_prefix(uri: str) -> list[str]:
    """Full URIs of every file under a directory / prefix, recursively, sorted.

    `s3://b/runs/r1` lists `s3://b/runs/r1/...` and never `s3://b/runs/r10/...`. Temporary files of
    write_bytes are left out. A missing directory / prefix lists as [].
    """
    if not is_s3(uri):
        root = Path(uri)
        if not root.is_dir():
            return []
        return sorted(str(p) for p in root.rglob("*")
                      if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp")))
    bucket, key = split_s3(uri)
    prefix = f"{key}/" if key else ""
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    out = []
    for page in s3_call(uri, list, pages):
        out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
    return sorted(out)


def put_checkpoint(local_dir: str | os.PathLike, uri: str, *, progress: bool = False) -> str:
    """Publish a local checkpoint directory to `uri`; returns its manifest digest.

    The directory's own manifest is used when it has one (and is verified first), else one is built.
    Local: staging dir + rename. S3: objects first (skipping those already there with the same
    sha256), manifest last. A destination already holding the same checkpoint transfers nothing.
    """
    local_dir = Path(local_dir)
    manifest = mf.read_manifest(local_dir)
    if manifest is None:
        manifest = mf.build_manifest(local_dir)
    elif bad := mf.verify_manifest(local_dir, manifest):
        raise CheckpointError(f"{local_dir} does not match its own {mf.MANIFEST_NAME} "
                              f"({len(bad)} files, first {bad[0]}); re-create it")
    files = {rel: local_dir / rel for rel in manifest["files"]}
    manifest = {k: v for k, v in manifest.items() if k != "fetched_from"}  # where *this* copy came from
    transfer.publish(files, manifest, uri, progress=progress)
    return mf.manifest_digest(manifest)


def get_checkpoint(uri: str, local_dir: str | os.PathLike, *, progress: bool = False) -> Path:
    """Materialise the checkpoint at `uri` (local or S3) as the local directory `local_dir`.

    Refuses a source without its manifest. Verifies every file's sha256; resumes an interrupted
    call (only missing chunks are fetched again); a complete `local_dir` costs no transfer.
    """
    if not is_s3(uri) and Path(uri).resolve() == Path(local_dir).resolve():
        if mf.verify_manifest(uri):
            raise CheckpointError(f"{uri} is not a complete checkpoint (missing or mismatching "
                                  f"{mf.MANIFEST_NAME}); re-create it")
        return Path(uri)
    manifest = read_checkpoint_manifest(uri)
    if manifest is None:
        raise CheckpointError(f"{uri} has no {mf.MANIFEST_NAME}: it is incomplete or not a drope "
                              f"checkpoint; re-run the stage that writes it")
    local = mf.read_manifest(local_dir) if Path(local_dir).is_dir() else None
    if local is not None and local.get("fetched_from") == uri.rstrip("/") \
            and mf.manifest_digest(local) != mf.manifest_digest(manifest):
        log.info("%s holds an older copy of %s: replacing it", local_dir, uri)
        remove_tree(local_dir)  # a stale copy of this same URI (rewritten since): ours to replace
    transfer.download_checkpoint(uri.rstrip("/"), manifest, Path(local_dir), progress=progress)
    return Path(local_dir)


def remove_tree(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)
