"""Where runs live: the storage root, and this box's index of run ids.

Runs live under a storage root (spec `storage.root`, default $DROPE_HOME/runs; DROPE_HOME defaults
to ./.drope) at <root>/<run_id>; $DROPE_HOME/index/<run_id>.json remembers where, so `drope status
RUN_ID` needs no flags on the box that started the run (elsewhere: --storage ROOT).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from drope_ops import storage
from drope_ops.errors import DropeError, SpecError
from workflows.ledger import Ledger


def drope_home() -> Path:
    home = Path(os.environ.get("DROPE_HOME") or ".drope").resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def storage_root(spec) -> str:
    return spec.storage.root or str(drope_home() / "runs")


def check_run_id(run_id: str) -> str:
    """A run id names a directory under the storage root and an index file: a plain name, never a path."""
    if not run_id or run_id.startswith(".") or not all(c.isalnum() or c in "-_." for c in run_id):
        raise SpecError(f"run id {run_id!r}: use letters, digits, '-', '_' or '.' (not first), e.g. smollm2-try1; "
                        "it names the run's directory under storage.root")
    return run_id


def _index_path(run_id: str) -> Path:
    return drope_home() / "index" / f"{run_id}.json"


def remember(run_id: str, run_uri: str, **extra) -> None:
    path = _index_path(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = json.loads(path.read_text()) if path.exists() else {}
    entry.update(run_id=run_id, run_uri=run_uri, **extra)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry, indent=1))
    os.replace(tmp, path)


def find_run(run_id: str, storage_flag: str = "") -> tuple[str, dict]:
    check_run_id(run_id)
    if storage_flag:
        uri = storage.join(storage_flag, run_id)
        if Ledger(uri).exists():
            return uri, {}
    elif _index_path(run_id).exists():
        entry = json.loads(_index_path(run_id).read_text())
        return entry["run_uri"], entry
    raise DropeError(f"unknown run id {run_id!r}: no such run under {storage_flag or drope_home()}; "
                     "check the id (drope prints it at start) or pass --storage ROOT where the run lives")
