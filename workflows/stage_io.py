"""Moving stage inputs and outputs between the run's storage (local or s3://) and a node's local disk.

On local storage a stage reads its input in place and writes its output straight to the output path
(atomically, temporary name then rename). On S3 it downloads the input checkpoint (verified against
its manifest) into node-local scratch, computes into scratch, then uploads objects first and the
manifest last.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from drope_ops import storage
from drope_ops.errors import CheckpointError


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def scratch_root() -> Path:
    root = Path(os.environ.get("DROPE_SCRATCH", Path(tempfile.gettempdir()) / "drope-scratch"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def materialize(uri: str) -> Path:
    """A local directory holding the complete checkpoint at `uri` (cached per URI on this node)."""
    if not is_remote(uri):
        path = Path(uri)
        if not storage.checkpoint_complete(uri):
            raise CheckpointError(f"{uri} is not a complete checkpoint (no manifest or files missing): rerun its stage")
        return path
    local = scratch_root() / "inputs" / uri.replace("s3://", "").replace("/", "__")
    return storage.get_checkpoint(uri, local)


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
