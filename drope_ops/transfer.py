"""Moving checkpoint files between local disk and S3: resumable, verified, atomic.

Downloads into a hidden staging directory beside the destination (`.NAME.drope-partial`), then rename.
S3 objects are fetched as ranged GETs of CHUNK bytes on a thread pool, journaled every MiB
(drope_ops.ranged_get), so a call after a kill fetches only the bytes that never landed.
(boto3's transfer manager parallelises the same way but cannot resume a half-written file, and
multi-GB shards are exactly what gets interrupted.) Uploads use boto3's transfer manager (multipart,
concurrent) with each object's sha256 in its metadata, so a re-upload skips objects already there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from drope_ops import manifest as mf
from drope_ops import storage_base
from drope_ops.errors import CheckpointError, DropeError, StorageError
from drope_ops.ranged_get import RangedDownload

log = logging.getLogger("drope.transfer")

CHUNK = 16 << 20  # bytes per ranged GET and per multipart upload part
CONCURRENCY = 8
_SOURCE_NOTE = ".drope-source.json"  # in the staging dir: which manifest the partial files belong to


@dataclass
class TransferStats:
    files: int = 0
    """Files written (downloaded or uploaded) by this call."""
    bytes: int = 0
    """Bytes moved over the wire (or copied) by this call; 0 when the destination was complete."""


def staging_dir(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.drope-partial"


def _prepare_local_dest(dest: Path, digest: str) -> tuple[bool, Path]:
    """(already_complete, staging). Moves a damaged complete dest back to staging for repair."""
    stage = staging_dir(dest)
    if dest.exists():
        have = mf.read_manifest(dest) if dest.is_dir() else None
        if have is None:
            if dest.is_dir() and not any(dest.iterdir()):
                dest.rmdir()
            else:
                raise StorageError(f"{dest} exists and is not a drope checkpoint; remove it or choose "
                                   f"another destination")
        elif mf.manifest_digest(have) != digest:
            raise StorageError(f"{dest} already holds a different checkpoint (manifest digest "
                               f"{mf.manifest_digest(have)[:12]}); remove it or choose another destination")
        elif not (damaged := mf.verify_manifest(dest, have)):
            return True, stage
        else:  # damaged: repair it in staging, only the wrong files are fetched again
            log.warning("%s: %d files missing or damaged (first %s): repairing", dest, len(damaged), damaged[0])
            shutil.rmtree(stage, ignore_errors=True)
            for rel in damaged:
                (dest / rel).unlink(missing_ok=True)
            os.replace(dest, stage)
            (stage / mf.MANIFEST_NAME).unlink()
            (stage / _SOURCE_NOTE).write_text(json.dumps({"digest": digest}))
    note = stage / _SOURCE_NOTE
    if stage.exists() and (not note.exists() or json.loads(note.read_text())["digest"] != digest):
        shutil.rmtree(stage)  # partial files of another checkpoint: useless
    stage.mkdir(parents=True, exist_ok=True)
    note.write_text(json.dumps({"digest": digest}))
    return False, stage


def _commit_local(stage: Path, dest: Path, manifest: dict) -> None:
    (stage / _SOURCE_NOTE).unlink(missing_ok=True)
    for leftover in stage.rglob("*.drope-part*"):
        leftover.unlink()
    mf_tmp = stage / mf.MANIFEST_NAME
    mf_tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(stage, dest)


def _todo(stage: Path, manifest: dict) -> list[str]:
    # A final-named file in staging was hashed before it got its name; size guards against tampering.
    return [rel for rel, meta in manifest["files"].items()
            if not ((stage / rel).is_file() and (stage / rel).stat().st_size == meta["size"])]


def download_checkpoint(uri: str, manifest: dict, dest: Path, *, progress: bool = False,
                        on_chunk: Callable[[int], None] | None = None) -> TransferStats:
    """Fetch the files of `manifest` from `uri` into local `dest` (complete or absent afterwards).

    `on_chunk(nbytes)` is called after every piece (<= 1 MiB) lands (tests interrupt with it).
    A DropeError removes the staging directory; any other interruption keeps it for the next call.
    """
    dest = Path(dest)
    digest = mf.manifest_digest(manifest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        done, stage = _prepare_local_dest(dest, digest)
    except OSError as e:
        raise storage_base.disk_error(e, dest) from None
    if done:
        log.info("%s is complete (%d files): nothing to transfer", dest, len(manifest["files"]))
        return TransferStats()
    stats = TransferStats()
    try:
        todo = _todo(stage, manifest)
        for attempt in (1, 2):  # a checksum mismatch gets one fresh retry, then it is an error
            bad = _fetch_files(uri, manifest, todo, stage, stats, progress, on_chunk)
            if not bad:
                break
            log.warning("sha256 mismatch for %s (attempt %d)", ", ".join(bad), attempt)
            todo = bad
        else:
            raise CheckpointError(f"sha256 mismatch persists after a retry for {bad[0]} from {uri}: "
                                  f"the stored object is corrupt; re-create the checkpoint at the source")
        _commit_local(stage, dest, {**manifest, "fetched_from": uri})
    except DropeError:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise storage_base.disk_error(e, dest) from None
    log.info("fetched %d files, %.1f MB into %s", stats.files, stats.bytes / 1e6, dest)
    return stats


def _fetch_files(uri, manifest, rels, stage, stats, progress, on_chunk) -> list[str]:
    """Fetch `rels` into stage; returns the ones whose sha256 did not match (their parts removed)."""
    files = manifest["files"]
    if not storage_base.is_s3(uri):
        bad = []
        for rel in tqdm(rels, desc="copy", unit="file", disable=not progress):
            out = stage / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            part = out.with_name(out.name + ".drope-part")
            if not (Path(uri) / rel).is_file():
                raise CheckpointError(f"{uri} lacks {rel}, which its manifest lists; re-create it")
            shutil.copyfile(Path(uri) / rel, part)
            stats.bytes += files[rel]["size"]
            if on_chunk:
                on_chunk(files[rel]["size"])
            if mf.sha256_file(part) != files[rel]["sha256"]:
                part.unlink()
                bad.append(rel)
            else:
                os.replace(part, out)
                stats.files += 1
        return bad
    return RangedDownload(uri, files, stage, stats, on_chunk, chunk=CHUNK, concurrency=CONCURRENCY).run(
        rels, progress)


def publish(files: dict[str, Path], manifest: dict, uri: str, *, progress: bool = False) -> TransferStats:
    """Write local `files` (relative name -> path) as the checkpoint `uri`, manifest last."""
    if not storage_base.is_s3(uri):
        src_root = {rel: p for rel, p in files.items()}
        return _publish_local(src_root, manifest, Path(uri), progress)
    return _publish_s3(files, manifest, uri, progress)


def _publish_local(files, manifest, dest: Path, progress) -> TransferStats:
    digest = mf.manifest_digest(manifest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        done, stage = _prepare_local_dest(dest, digest)
        if done:
            return TransferStats()
        stats = TransferStats()
        for rel in tqdm(_todo(stage, manifest), desc="write", unit="file", disable=not progress):
            out = stage / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[rel], out.with_name(out.name + ".drope-part"))
            os.replace(out.with_name(out.name + ".drope-part"), out)
            stats.files, stats.bytes = stats.files + 1, stats.bytes + manifest["files"][rel]["size"]
        if bad := mf.verify_manifest(stage, manifest):
            raise CheckpointError(f"{bad[0]} changed while being written to {dest}; write it again")
        _commit_local(stage, dest, manifest)
        return stats
    except OSError as e:
        shutil.rmtree(staging_dir(dest), ignore_errors=True)
        raise storage_base.disk_error(e, dest) from None
    except DropeError:
        shutil.rmtree(staging_dir(dest), ignore_errors=True)
        raise


def _publish_s3(files, manifest, uri, progress) -> TransferStats:
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    bucket, base = storage_base.split_s3(uri)
    client = storage_base.s3_client(max_pool_connections=CONCURRENCY * 2)
    key = lambda rel: f"{base}/{rel}" if base else rel  # noqa: E731
    old = storage_base.read_checkpoint_manifest(uri)
    if old is not None and mf.manifest_digest(old) == mf.manifest_digest(manifest) \
            and storage_base.checkpoint_complete(uri):
        return TransferStats()
    if old is not None:  # being rewritten: the prefix is incomplete until the new manifest lands
        storage_base.s3_call(uri, client.delete_object, Bucket=bucket, Key=key(mf.MANIFEST_NAME))
    sizes = storage_base.s3_sizes(uri)
    todo = []
    for rel, meta in manifest["files"].items():
        if sizes.get(rel) == meta["size"]:
            head = storage_base.s3_call(uri, client.head_object, Bucket=bucket, Key=key(rel))
            if head.get("Metadata", {}).get("sha256") == meta["sha256"]:
                continue
        todo.append(rel)
    stats = TransferStats(files=len(todo), bytes=sum(manifest["files"][r]["size"] for r in todo))
    cfg = TransferConfig(multipart_threshold=CHUNK, multipart_chunksize=CHUNK, max_concurrency=CONCURRENCY)
    bar = tqdm(total=stats.bytes, unit="B", unit_scale=True, desc="upload", disable=not progress)
    from s3transfer.subscribers import BaseSubscriber

    class _Progress(BaseSubscriber):
        def on_progress(self, future, bytes_transferred, **kwargs):
            bar.update(bytes_transferred)

    with create_transfer_manager(client, cfg) as tm:
        futures = [tm.upload(str(files[rel]), bucket, key(rel), subscribers=[_Progress()],
                             extra_args={"Metadata": {"sha256": manifest["files"][rel]["sha256"]}})
                   for rel in todo]
        for f in futures:
            storage_base.s3_call(uri, f.result)
    bar.close()
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    storage_base.s3_call(uri, client.put_object, Bucket=bucket, Key=key(mf.MANIFEST_NAME), Body=body)
    log.info("uploaded %d files, %.1f MB to %s", stats.files, stats.bytes / 1e6, uri)
    return stats
