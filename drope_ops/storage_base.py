"""The low layer of the run's storage: URIs, the S3 client, one-line errors, object sizes, and the
checkpoint manifest at a URI.

drope_ops.storage (the functions stages call), drope_ops.transfer and drope_ops.ranged_get all build on
this module, and it imports none of them, so the import graph stays a DAG:
storage -> transfer -> ranged_get -> storage_base (and storage -> storage_base, transfer -> storage_base).

S3 access is plain boto3: endpoint, credentials, region and profile come from the usual AWS_* env and
config files (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_PROFILE, ...). Credentials are never logged.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from drope_ops import manifest as mf
from drope_ops.errors import StorageError

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


def s3_call(uri: str, fn, *args, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (ClientError, BotoCoreError) as e:
        raise s3_error(e, uri) from None


def is_missing(exc: Exception) -> bool:
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



def s3_sizes(uri: str) -> dict[str, int]:
    """Relative key -> size for every object under the prefix."""
    base = split_s3(uri)[1]
    cut = len(base) + 1 if base else 0
    bucket = split_s3(uri)[0]
    pages = s3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{base}/" if base else "")
    return {o["Key"][cut:]: o["Size"] for page in s3_call(uri, list, pages)
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
        if is_missing(e):
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
        sizes = s3_sizes(uri)
        return all(sizes.get(rel) == meta["size"] for rel, meta in manifest["files"].items())
    root = Path(uri)
    return all((root / rel).is_file() and (root / rel).stat().st_size == meta["size"]
               for rel, meta in manifest["files"].items())
