"""The run's storage: one set of functions for a local directory and for `s3://bucket/prefix`.

Every stage reads and writes through these, so the same code runs on a laptop (local disk) and on a
Ray cluster whose nodes share S3. Small records (the ledger's JSON) go through write_bytes / read_bytes
/ list_prefix; checkpoints go through put_checkpoint / get_checkpoint, which keep the sha256 manifest
of drope_ops.manifest and are complete or absent:

- local: files are written into a hidden staging directory beside the target, then renamed;
- S3: objects first, `drope-manifest.json` last; a prefix without its manifest is never read.

S3 access is plain boto3: endpoint, credentials, region and profile come from the usual AWS_* env and
config files (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_PROFILE, ...). Credentials are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from drope_ops import manifest as mf
from drope_ops.errors import CheckpointError, StorageError

log = logging.getLogger("drope.storage")

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


# ---------------------------------------------------------------- URIs

def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b') (no leading or trailing slash on the key)."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; write s3://BUCKET/PREFIX")
    return bucket, key.strip("/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or s3:// URI."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        key = "/".join(p.strip("/") for p in (key, *parts) if p.strip("/"))
        return f"s3://{bucket}/{key}"
    return str(Path(uri, *parts))


# ---------------------------------------------------------------- S3 client and errors

def s3_client(max_pool_connections: int = 16):
    """A boto3 S3 client honouring AWS_* env and profiles; cached per (env, pool size)."""
    import boto3
    from botocore.config import Config

    # boto3 reads AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 itself; the env is part of the cache key so
    # that a changed endpoint (tests, a second storage) gets a fresh client.
    keys = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID",
            "AWS_DEFAULT_REGION", "AWS_REGION")
    cache_key = (max_pool_connections,) + tuple(os.environ.get(k) for k in keys)
    with _clients_lock:
        if cache_key not in _clients:
            try:
                session = boto3.session.Session()
            except Exception as e:  # botocore ProfileNotFound and friends
                raise StorageError(f"AWS configuration error: {type(e).__name__}: {e}") from None
            cfg = Config(max_pool_connections=max_pool_connections,
                         retries={"max_attempts": 5, "mode": "standard"})
            region = session.region_name or "us-east-1"
            _clients[cache_key] = session.client("s3", region_name=region, config=cfg)
        return _clients[cache_key]


def s3_error(exc: Exception, uri: str) -> StorageError:
    """Translate a botocore exception into a one-line StorageError (no secrets in it)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StorageError(f"no AWS credentials for {uri}: set AWS_ACCESS_KEY_ID / "
                            f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"cannot reach the S3 endpoint for {uri}: check AWS_ENDPOINT_URL and the network")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        bucket = split_s3(uri)[0]
        if code in ("NoSuchBucket",):
            return StorageError(f"bucket {bucket!r} does not exist ({uri}); create it or fix the URI")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "ExpiredToken", "AllAccessDisabled"):
            return StorageError(f"no access to {uri} ({code}); check the AWS credentials and the "
                                f"bucket policy")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{uri} does not exist; check the prefix")
        return StorageError(f"S3 error on {uri}: {code}: {exc.response.get('Error', {}).get('Message', '')}")
    return StorageError(f"S3 error on {uri}: {type(exc).__name__}: {exc}")


def _s3_call(uri: str, fn, *args, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (ClientError, BotoCoreError) as e:
        raise s3_error(e, uri) from None


def _is_missing(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in (
        "NoSuchKey", "404", "NotFound")


def disk_error(exc: OSError, where: str | os.PathLike) -> StorageError:
    """One line for the OS errors a user can fix (full disk, quota, permissions)."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageError(f"disk full or quota exceeded writing {where} ({os.strerror(exc.errno)}); "
                            f"free space or choose another destination")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {where} ({os.strerror(exc.errno)}); check its permissions")
    return StorageError(f"cannot write {where}: {exc.strerror or exc}")


# ---------------------------------------------------------------- small objects (the ledger)

def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: local temp file + rename; on S3 a single PUT (atomic there)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(uri, s3_client().put_object, Bucket=bucket, Key=key, Body=data)
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
        return _s3_call(uri, s3_client().get_object, Bucket=bucket, Key=key)["Body"].read()
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
            if not _is_missing(e):
                raise s3_error(e, uri) from None
    prefix = f"{key}/" if key else ""
    resp = _s3_call(uri, client.list_objects_v2, Bucket=bucket, Prefix=prefix, MaxKeys=1)
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
    for page in _s3_call(uri, list, pages):
        out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
    return sorted(out)


def _s3_sizes(uri: str) -> dict[str, int]:
    """Relative key -> size for every object under the prefix."""
    base = split_s3(uri)[1]
    cut = len(base) + 1 if base else 0
    bucket = split_s3(uri)[0]
    pages = s3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{base}/" if base else "")
    return {o["Key"][cut:]: o["Size"] for page in _s3_call(uri, list, pages)
            for o in page.get("Contents", [])}


# ---------------------------------------------------------------- checkpoints

def read_checkpoint_manifest(uri: str) -> dict | None:
    """The manifest of a checkpoint at a local dir or S3 prefix, or None when it has none."""
    if not is_s3(uri):
        return mf.read_manifest(uri) if Path(uri).is_dir() else None
    from botocore.exceptions import ClientError

    bucket, key = split_s3(join(uri, mf.MANIFEST_NAME))
    try:
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        if _is_missing(e):
            return None
        raise s3_error(e, uri) from None
    except Exception as e:  # connection problems
        raise s3_error(e, uri) from None
    return json.loads(body)


def checkpoint_complete(uri: str) -> bool:
    """Manifest present and every file it lists present with its size (no hashing: cheap)."""
    manifest = read_checkpoint_manifest(uri)
    if manifest is None:
        return False
    if is_s3(uri):
        sizes = _s3_sizes(uri)
        return all(sizes.get(rel) == meta["size"] for rel, meta in manifest["files"].items())
    root = Path(uri)
    return all((root / rel).is_file() and (root / rel).stat().st_size == meta["size"]
               for rel, meta in manifest["files"].items())


def put_checkpoint(local_dir: str | os.PathLike, uri: str, *, progress: bool = False) -> str:
    """Publish a local checkpoint directory to `uri`; returns its manifest digest.

    The directory's own manifest is used when it has one (and is verified first), else one is built.
    Local: staging dir + rename. S3: objects first (skipping those already there with the same
    sha256), manifest last. A destination already holding the same checkpoint transfers nothing.
    """
    from drope_ops import transfer

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
    from drope_ops import transfer

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
