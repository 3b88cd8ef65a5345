"""Stage drop_rope: remove RoPE from the base checkpoint and insert QK-norm (streams shards).

    drope drop-rope ckpt/smollm2 ckpt/smollm2-drope --qk-norm qk --original-context 2048   # alone

The math is drope_ops.surgery.drop_rope; this stage materializes the source checkpoint on its node,
writes the DroPE checkpoint (manifest last) and publishes it to the run's storage. The source is a stage
output (written once, never rewritten in place), so its shards are hard-linked where the filesystem
allows: the stage reads them once, to check them against their manifest, and writes no weight bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from drope_ops.choices import check_choices
from drope_ops.errors import SpecError
from drope_ops.surgery import QkNorm, QkNormScope, drop_rope
from workflows import stage_io
from workflows.stage import SOURCE, Stage


@dataclass
class DropRopeConfig:
    qk_norm: QkNorm = "qk"
    """QK-norm inserted after dropping RoPE: none | qk | q (paper: qk for long recalibrations)."""
    qk_norm_scope: QkNormScope = "full"
    """full: RMSNorm over num_heads*head_dim (the paper); head: per-head RMSNorm (Qwen3)."""
    rope_layers: list[int] = field(default_factory=list)
    """Layers that keep RoPE (empty: all layers NoPE, the paper's DroPE)."""
    nope_every: int | None = None
    """SmolLM3-style: every Nth layer is NoPE, the rest keep RoPE (exclusive with rope_layers)."""

    def __post_init__(self):
        check_choices(self, "drop_rope")
        negative = [i for i in self.rope_layers if not isinstance(i, int) or isinstance(i, bool) or i < 0]
        if negative:
            raise SpecError(f"drop_rope.rope_layers={list(self.rope_layers)}: layer {negative[0]!r} is not a layer index; "
                            "give indices from 0 (the first layer), e.g. [0, 4]")
        if self.nope_every is not None and (self.nope_every < 1 or self.rope_layers):
            raise SpecError("drop_rope.nope_every: must be >= 1 and not combined with drop_rope.rope_layers")


def run(spec, ctx) -> dict:
    src = stage_io.materialize(ctx.inputs[SOURCE])
    d = spec.drop_rope
    with stage_io.output_dir(ctx.output) as out:
        drop_rope(src, out, qk_norm=d.qk_norm, qk_norm_scope=d.qk_norm_scope, rope_layers=d.rope_layers or None,
                  nope_every=d.nope_every, original_context=spec.model.original_context, link=True)
        config = json.loads((Path(out) / "config.json").read_text())
    removed = config.get("source_rope_parameters") or {}
    return {"qk_norm": d.qk_norm, "rope_layers": len(d.rope_layers),
            "original_context": config["original_max_position_embeddings"],  # C_train, before any scaling
            "removed_rope_scaling": removed.get("rope_type", removed.get("type", "none")),
            "removed_rope_factor": removed.get("factor", 1.0)}


STAGE = Stage(name="drop_rope", run=run, sections=("drop_rope", "model.original_context"), inputs=(SOURCE,),
              logged_model="dropped", label="dropped")
