"""The sha256 manifest every checkpoint directory carries (`drope-manifest.json`).

A checkpoint is complete exactly when its manifest is present and every file matches it. Writers
write the files first and the manifest last; readers refuse a directory (or S3 prefix) without one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_NAME = "drope-manifest.json"
_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(root: str | os.PathLike, hashes: dict[str, str] | None = None) -> dict:
    """Manifest of every file under root (except the manifest itself).

    `hashes` may carry digests already computed while writing (path relative to root -> sha256).
    """
    root = Path(root)
    hashes = hashes or {}
    files = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == MANIFEST_NAME:
            continue
        rel = p.relative_to(root).as_posix()
        files[rel] = {"sha256": hashes.get(rel) or sha256_file(p), "size": p.stat().st_size}
    return {"format": "drope-manifest/1", "files": files}


def write_manifest(root: str | os.PathLike, hashes: dict[str, str] | None = None) -> dict:
    manifest = build_manifest(root, hashes)
    tmp = Path(root) / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, Path(root) / MANIFEST_NAME)
    return manifest


def read_manifest(root: str | os.PathLike) -> dict | None:
    path = Path(root) / MANIFEST_NAME
    if not path.exists():
        return None
    return json.loads(path.read_text())


def manifest_digest(manifest: dict) -> str:
    """One sha256 naming the whole checkpoint: the hash of its manifest's file table."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def verify_manifest(root: str | os.PathLike, manifest: dict | None = None) -> list[str]:
    """Relative paths that are missing or do not match the manifest (empty = complete)."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    if manifest is None:
        return [MANIFEST_NAME]
    bad = []
    for rel, meta in manifest["files"].items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
            bad.append(rel)
    return bad
