"""Stage pretrain (micro reproduction only): train a small RoPE Llama from random init, so the
lineage starts at step 0. It is the recalibration loop (Ray Train + DeepSpeed) on a random-init
checkpoint; the paper's Section 5.1 setting then drops RoPE near the end of this training.

    drope run micro-repro          # runs pretrain -> drop_rope -> recalibrate -> fit_temperature -> evaluate
"""

from __future__ import annotations

import shutil
import tempfile

from drope_ops import debugmodel, storage
from drope_ops.manifest import write_manifest
from workflows import stage_io
from workflows.spec import from_dict
from workflows.stages.recalibrate import RecalibrateConfig, recalibrate


def pretrain_stage(spec, ctx) -> dict:
    cfg = from_dict(RecalibrateConfig, spec.pretrain.train, "pretrain.train.")
    init = tempfile.mkdtemp(dir=stage_io.scratch_root(), prefix="pretrain-init-")
    try:
        debugmodel.make_debug_checkpoint(f"{init}/ckpt", seed=cfg.seed, **spec.pretrain.config)
        write_manifest(f"{init}/ckpt")
        with stage_io.output_dir(ctx.output) as out:
            res = recalibrate(cfg, spec.data, f"{init}/ckpt", str(out), run_name=f"pretrain-{ctx.fingerprint[:12]}",
                              storage_path=storage.join(ctx.run_uri, "ray-train"), metrics_sink=ctx.sink)
    finally:
        shutil.rmtree(init, ignore_errors=True)
    return res
