"""Stage entry points as the driver calls them: `run_<stage>(spec, ctx) -> result dict`, each executed
inside a Ray task. Each one materializes its inputs from the run's storage, calls the stage's own
function (workflows/stages/<stage>.py or drope_ops), publishes its output to `ctx.output` and returns
small JSON facts for the ledger. The math lives in drope_ops; the sizing lives in the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from workflows import stage_io


@dataclass
class StageContext:
    run_id: str
    run_uri: str
    fingerprint: str
    output: str
    """Where this stage's output must appear (local dir or s3:// prefix), keyed by its fingerprint."""
    sink: object = None
    """Picklable MLflow sink of the stage's child run: .log_metrics(dict, step), .log_artifact(path)."""
    inputs: dict = field(default_factory=dict)
    """Upstream stage name -> output URI."""
    input_results: dict = field(default_factory=dict)
    """Upstream stage name -> its ledger result facts."""


def _source_of(ctx: StageContext) -> str:
    return ctx.inputs.get("fetch") or ctx.inputs["pretrain"]


def run_fetch(spec, ctx: StageContext) -> dict:
    from workflows.stages.fetch import fetch_stage

    return fetch_stage(spec.model, ctx.output)


def run_pretrain(spec, ctx: StageContext) -> dict:
    from workflows.stages.pretrain import pretrain_stage

    return _report_training(ctx, pretrain_stage(spec, ctx))


def run_drop_rope(spec, ctx: StageContext) -> dict:
    from drope_ops.surgery import drop_rope

    src = stage_io.materialize(_source_of(ctx))
    d = spec.drop_rope
    with stage_io.output_dir(ctx.output) as out:
        drop_rope(src, out, qk_norm=d.qk_norm, qk_norm_scope=d.qk_norm_scope, rope_layers=d.rope_layers or None,
                  nope_every=d.nope_every, original_context=spec.model.original_context)
    return {"qk_norm": d.qk_norm, "rope_layers": len(d.rope_layers)}


def run_recalibrate(spec, ctx: StageContext) -> dict:
    from drope_ops import storage
    from workflows.stages.recalibrate import recalibrate

    src = stage_io.materialize(ctx.inputs["drop_rope"])
    with stage_io.output_dir(ctx.output) as out:
        res = recalibrate(
            spec.recalibrate, spec.data, str(src), str(out),
            run_name=f"recalibrate-{ctx.fingerprint[:12]}",
            storage_path=storage.join(ctx.run_uri, "ray-train"),
            metrics_sink=ctx.sink,
        )
    return _report_training(ctx, res)


def _report_training(ctx: StageContext, res: dict) -> dict:
    """Give this attempt's MLflow run the whole curve (a resumed attempt logged only the steps it ran:
    the restored ones are filled in), then the PNG of it."""
    history = res.get("history", [])
    if res.get("start_step") and ctx.sink is not None and hasattr(ctx.sink, "fill_history"):
        ctx.sink.fill_history(history)
    _log_curve(ctx, history, ("loss", "lr", "grad_norm"), "loss_curve.png")
    return {k: v for k, v in res.items() if k in ("steps", "final_loss", "tokens_seen", "start_step")}


def run_fit_temperature(spec, ctx: StageContext) -> dict:
    from workflows.stages.fit_temperature import fit_temperature

    src = stage_io.materialize(ctx.inputs["recalibrate"])
    with stage_io.output_dir(ctx.output) as out:
        res = fit_temperature(spec.fit_temperature, spec.data, str(src), str(out), metrics_sink=ctx.sink)
    return {"c": res["c"], "betas": {str(k): v for k, v in res["betas"].items()}}


def run_evaluate(spec, ctx: StageContext) -> dict:
    from drope_ops.manifest import write_manifest
    from workflows.stages.evaluate import evaluate

    drope_ckpt = stage_io.materialize(ctx.inputs["fit_temperature"])
    base_ckpt = stage_io.materialize(_source_of(ctx))
    with stage_io.output_dir(ctx.output) as out:
        res = evaluate(spec.evaluate, drope_checkpoint=str(drope_ckpt), base_checkpoint=str(base_ckpt),
                       output_dir=str(out), data=spec.data)
        write_manifest(out)
        for path in [res.get("table_md"), res.get("table_json"), res.get("ppl_plot"), *res.get("heatmaps", [])]:
            if path and ctx.sink is not None:
                ctx.sink.log_artifact(str(path))
    return {"table_md": str(Path(ctx.output) / Path(res["table_md"]).name) if res.get("table_md") else "",
            "cells": len(res.get("results", []))}


def _log_curve(ctx: StageContext, history: list[dict], keys, name: str) -> None:
    """A PNG of per-step metrics, logged to the stage's MLflow run."""
    if not history or ctx.sink is None:
        return
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in h for h in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(h.get("step", i), h[key]) for i, h in enumerate(history) if key in h]
        ax.plot(*zip(*pts))
        ax.set_xlabel("step")
        ax.set_title(key)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        fig.savefig(path, dpi=100)
        ctx.sink.log_artifact(str(path))
    plt.close(fig)
