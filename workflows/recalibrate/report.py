"""What a training stage (recalibrate, pretrain) tells MLflow and the ledger when its run is done: the
whole loss curve on the attempt's run, a PNG of it, and the ledger's small facts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def report_training(ctx, res: dict) -> dict:
    """Give this attempt's MLflow run the whole curve (a resumed attempt logged only the steps it ran:
    the restored ones are filled in) and a PNG of it; return the ledger's facts."""
    history = res.get("history", [])
    if res.get("start_step") and ctx.sink is not None and hasattr(ctx.sink, "fill_history"):
        ctx.sink.fill_history(history)
    _log_curve(ctx.sink, history, ("loss", "lr", "grad_norm"), "loss_curve.png")
    return {k: v for k, v in res.items() if k in ("steps", "final_loss", "tokens_seen", "start_step")}


def _log_curve(sink, history: list[dict], keys, name: str) -> None:
    """A PNG of per-step metrics, logged to the stage's MLflow run."""
    if not history or sink is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in h for h in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(*zip(*[(h.get("step", i), h[key]) for i, h in enumerate(history) if key in h]))
        ax.set_xlabel("step")
        ax.set_title(key)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / name, dpi=100)
        sink.log_artifact(str(Path(tmp) / name))
    plt.close(fig)
