"""Fault injection for the tests, behind one hook the worker loop calls after every step.

Two faults, set by recalibrate.inject_nan_at_step / inject_kill_at_step (None in every real run):
the step's loss reads NaN (the guard rail must stop the run, naming the last good checkpoint), or the
last rank dies by SIGKILL (Ray Train must restart the workers from the last checkpoint). Kept here so
the loop reads as training, and a reader sees at once that nothing else in it is test-only.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

from workflows.recalibrate.config import RecalibrateConfig


def after_step(cfg: RecalibrateConfig, metrics: dict, *, rank: int, world: int, run_name: str) -> None:
    """The faults of step metrics["step"]: its loss reads NaN, or the last rank dies (once per run name:
    a marker in the node's temp dir stops the restarted worker from doing it again)."""
    done = metrics["step"]
    if cfg.inject_nan_at_step == done:
        metrics["loss"] = float("nan")
    if cfg.inject_kill_at_step == done and rank == world - 1:
        marker = Path(tempfile.gettempdir()) / f"drope-injected-kill-{run_name}-{done}"
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)  # a real worker death, mid-run, before any later save
