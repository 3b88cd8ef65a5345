"""Stage recalibrate: train a DroPE (or any Llama-family) checkpoint at its original context length.

    drope recalibrate CKPT OUT --preset debug --run-name r1 --storage /tmp/ray-results   # alone

DeepSpeed ZeRO on Ray Train workers, resumable to the exact step; the workers write the recalibrated
checkpoint straight to the stage output (local or S3), manifest last. The machinery is the
workflows/recalibrate/ package (config, launch, loop, engine, checkpoint, weights); this module is the
workflow's face of it.
"""

from __future__ import annotations

from drope_ops import storage
from workflows.stage import Stage


def run(spec, ctx) -> dict:
    # torch and DeepSpeed load when the stage runs, not when the pipeline's stage list (or a spec) loads
    from workflows.recalibrate.launch import recalibrate
    from workflows.recalibrate.report import report_training

    # the workers write the output themselves, straight to ctx.output (local or S3), manifest last
    res = recalibrate(spec.recalibrate, spec.data, ctx.inputs["drop_rope"], ctx.output,
                      run_name=f"recalibrate-{ctx.fingerprint[:12]}",
                      storage_path=storage.join(ctx.run_uri, "ray-train"), metrics_sink=ctx.sink)
    return report_training(ctx, res)


STAGE = Stage(name="recalibrate", run=run, sections=("recalibrate", "data"), inputs=("drop_rope",),
              logged_model="recalibrated", dataset_context="training", label="recalibrated")
