"""`drope plan`: what a spec will do and roughly what it costs, before anything runs."""

from __future__ import annotations

from drope_ops.data import token_budget
from drope_ops.errors import DropeError
from workflows.pipeline import stage_names
from workflows.spec import WorkflowSpec

# Peak dense bf16 throughput assumed for the GPU-hours estimate, and a realistic utilisation.
GPU_PEAK_FLOPS = 989e12  # H100 SXM bf16 dense
MFU = 0.35


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def describe(spec: WorkflowSpec) -> str:
    r, d = spec.recalibrate, spec.data
    seq = d.seq_len or spec.model.original_context or 0
    tokens = r.steps * r.global_batch * seq
    params = spec.model.parameters or 0
    lines = [f"workflow {spec.name}: {' -> '.join(stage_names(spec))}", ""]
    lines.append(f"  {'fetch' if not spec.pretrain.enabled else 'pretrain'}: source {spec.model.source or 'random init'}")
    lines.append(f"  drop_rope: qk_norm={spec.drop_rope.qk_norm} ({spec.drop_rope.qk_norm_scope}), "
                 f"rope kept in {spec.drop_rope.rope_layers or 'no'} layers; 1 CPU task, streams shards")
    res = f"{r.num_workers} workers x ({'1 GPU, ' if r.use_gpu else ''}{r.cpus_per_worker} CPU)"
    lines.append(f"  recalibrate: {res}, ZeRO-{r.zero_stage}, {r.steps} steps x {r.global_batch} seqs x "
                 f"{seq or '?'} tokens = {_count(tokens)} tokens, lr {r.lr}")
    if params and tokens:
        flops = 6 * params * tokens
        lines.append(f"      ~{flops:.2e} FLOPs ~ {flops / (GPU_PEAK_FLOPS * MFU) / 3600:.1f} GPU-hours "
                     f"(H100 bf16 at {MFU:.0%} MFU)")
    lines += _data_lines(spec, seq)
    t = spec.fit_temperature
    lines.append(f"  fit_temperature: extension factors {t.extension_factors}, <= {t.max_evals} loss evaluations each")
    e = spec.evaluate
    lines.append(f"  evaluate: variants {e.variants} x tasks {e.tasks} x factors {e.extension_factors} "
                 f"({len(e.variants) * len(e.tasks) * len(e.extension_factors)} parallel units)")
    lines.append(f"  storage: {spec.storage.root or '$DROPE_HOME/runs'}   tracking: {spec.tracking.uri or 'embedded sqlite'}")
    return "\n".join(lines)


def _data_lines(spec: WorkflowSpec, seq: int) -> list[str]:
    """The token budget of recalibrate against data.source, and data.max_epochs' refusal as a warning."""
    r = spec.recalibrate
    if not seq or not r.steps:
        return []
    try:
        budget = token_budget(spec.data, steps=r.steps, global_batch=r.global_batch, seq_len=seq)
    except DropeError as e:  # a source the plan cannot size (missing path...): say so, the run will refuse it
        return [f"  data: WARNING: {e}"]
    lines = [f"  data: {budget.line()}"]
    if reason := budget.refusal():
        lines.append(f"  WARNING: {reason}")
    return lines
