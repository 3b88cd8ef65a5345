"""`drope plan`: what a spec will do, what it costs and whether it fits, before anything runs.

    drope plan llama-2-7b                      # tokens, FLOPs, GPU-hours, per-GPU memory, host RAM
    drope plan llama-2-7b --gpu-memory 40      # warns: the chosen ZeRO stage and micro batch do not fit

Recalibration FLOPs count the dense matmuls (6N a token, 8N with activation recompute) and causal
attention (6 L s d a token, 8 L s d with recompute). Per-GPU memory is DeepSpeed's own estimate of the
model states of the chosen ZeRO stage (estimate_zero3 / zero2_model_states_mem_needs; ZeRO-1 has none,
so its line is written out here) plus bf16 activations at micro_batch x seq_len: a Llama layer keeps about
s b (16 h + 8 f) bytes for backward (sdpa: no s^2 scores), 2 s b h with activation checkpointing, and
the logits b s V (10 bytes: bf16, fp32 and its gradient). `check_fits` is what `drope run` / `submit`
refuse on (unless --force).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from drope_ops.data import token_budget
from drope_ops.errors import DropeError, SpecError
from workflows.pipeline import stage_names
from workflows.spec import ArchitectureConfig, WorkflowSpec
from workflows.recalibrate.config import zero_name

GB = 1e9
BUFFER_FACTOR = 1.5  # DeepSpeed's estimators' default additional_buffer_factor
WORKER_PROCESS_GB = 3.0  # host RAM of one Ray Train worker process (Python, torch, CUDA context, data)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def architecture(spec: WorkflowSpec) -> ArchitectureConfig | None:
    """plan.architecture, else the base checkpoint's config.json when model.source is a directory."""
    if spec.plan.architecture.known:
        return spec.plan.architecture
    config = Path(spec.model.source) / "config.json"
    if not spec.model.source or "://" in spec.model.source or not config.is_file():
        return None
    c = json.loads(config.read_text())
    return ArchitectureConfig(**{k: c[k] for k in ArchitectureConfig.__dataclass_fields__ if k in c})


def parameters(a: ArchitectureConfig) -> int:
    """Llama-family parameter count from the shape (embeddings, attention, SwiGLU MLP, norms, head)."""
    h, f, L, V = a.hidden_size, a.intermediate_size, a.num_hidden_layers, a.vocab_size
    kv = h * a.num_key_value_heads // max(1, a.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return V * h * (1 if a.tie_word_embeddings else 2) + L * layer + h


@dataclass
class Memory:
    """Bytes of one recalibration setting: per GPU, per node of host RAM, and of checkpoints."""

    model_states: float  # per GPU, DeepSpeed's estimate for the ZeRO stage and offload options
    activations: float  # per GPU at micro_batch x seq_len, with the spec's activation_checkpointing
    activations_other: float  # the same with activation_checkpointing flipped
    host_per_node: float
    checkpoint: float  # one resumable DeepSpeed checkpoint (all ranks)
    output: float  # the final weights, in bf16

    @property
    def per_gpu(self) -> float:
        return self.model_states + self.activations


def model_states(spec: WorkflowSpec, n: int, largest_layer: int, gpus: int) -> tuple[float, float]:
    """(per-GPU bytes, per-node host bytes) of params, gradients and optimizer states, from DeepSpeed's
    estimators (ZeRO-3 with zero.Init, as recalibrate builds it)."""
    r, per_node = spec.recalibrate, min(gpus, spec.plan.gpus_per_node)
    nodes = math.ceil(gpus / per_node)
    if r.zero_stage == 0:  # ZeRO off (CPU workers only): fp32 weights, gradients, AdamW m and v on every rank
        return 16 * n, per_node * 16 * n
    if r.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            n, largest_layer, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=r.offload_optimizer,
            cpu_offload_params=r.offload_params, zero_init=True, additional_buffer_factor=BUFFER_FACTOR)
        return gpu, cpu
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, gpu = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=per_node, num_nodes=nodes,
                                                     cpu_offload=r.offload_optimizer,
                                                     additional_buffer_factor=BUFFER_FACTOR)
    if r.zero_stage == 1 and not r.offload_optimizer:  # gradients whole on every GPU: 2 + 2 + 16/gpus bytes
        gpu = 4 * n + int(16 * n / gpus)
    return gpu, cpu


def activations(a: ArchitectureConfig, micro_batch: int, seq: int, checkpointing: bool) -> float:
    """bf16 activations one GPU keeps for backward (see the module docstring)."""
    b, s, h, f, L = micro_batch, seq, a.hidden_size, a.intermediate_size, a.num_hidden_layers
    layer = s * b * (16 * h + 8 * f)
    logits = b * s * a.vocab_size * 10
    if checkpointing:
        return L * 2 * s * b * h + layer + logits  # each layer's input, plus one layer recomputed
    return L * layer + logits


def memory(spec: WorkflowSpec, a: ArchitectureConfig, gpus: int, seq: int) -> Memory:
    r, n = spec.recalibrate, spec.model.parameters or parameters(a)
    largest_layer = max(a.vocab_size * a.hidden_size, a.hidden_size * a.intermediate_size)
    states, host_states = model_states(spec, n, largest_layer, gpus)
    per_node = min(gpus, spec.plan.gpus_per_node)
    if r.zero_stage < 3 and not r.offload_optimizer:
        # DeepSpeed's estimate assumes fp32 copies on the host; recalibrate loads the training dtype
        host_states = per_node * n * (2 if r.use_gpu else 4)
    host = host_states + per_node * WORKER_PROCESS_GB * GB + r.output_shard_mb * 1e6  # + rank 0's output shard
    bytes_per_param = 14 if r.use_gpu else 16  # fp32 master + Adam m, v (12) + the module's bf16 / fp32 weights
    return Memory(model_states=states,
                  activations=activations(a, r.micro_batch, seq, r.activation_checkpointing),
                  activations_other=activations(a, r.micro_batch, seq, not r.activation_checkpointing),
                  host_per_node=host, checkpoint=bytes_per_param * n, output=2 * n)


def gpus_of(spec: WorkflowSpec) -> int:
    if spec.plan.gpus:
        return spec.plan.gpus
    w = spec.recalibrate.num_workers
    return w if isinstance(w, int) else spec.plan.gpus_per_node


def check_fits(spec: WorkflowSpec) -> str | None:
    """Why the spec's GPU recalibration cannot fit plan.gpu_memory_gb (one line), or None."""
    r, a = spec.recalibrate, architecture(spec)
    seq = spec.data.seq_len or spec.model.original_context or 0
    if not r.use_gpu or a is None or not seq or spec.model.already_drope:  # already_drope: no recalibration
        return None
    m = memory(spec, a, gpus_of(spec), seq)
    if m.per_gpu <= spec.plan.gpu_memory_gb * GB:
        return None
    return (f"recalibrate needs ~{m.per_gpu / GB:.1f} GB per GPU (ZeRO-{r.zero_stage} model states "
            f"{m.model_states / GB:.1f} + activations {m.activations / GB:.1f} at micro_batch={r.micro_batch} x "
            f"{seq}) on {gpus_of(spec)} GPUs of {spec.plan.gpu_memory_gb:g} GB; lower recalibrate.micro_batch, "
            f"set activation_checkpointing: true, a higher zero_stage or more GPUs")


def refuse_unless_fits(spec: WorkflowSpec, force: bool) -> None:
    """`drope run` / `submit`: refuse at start, in one line, a spec whose plan cannot fit (unless forced)."""
    if (why := check_fits(spec)) and not force:
        raise SpecError(f"{why} (drope plan shows the numbers; --force runs it anyway)")
    if why:
        print(f"[drope] WARNING (forced): {why}", flush=True)


def describe(spec: WorkflowSpec) -> str:
    r, d = spec.recalibrate, spec.data
    seq = d.seq_len or spec.model.original_context or 0
    a = architecture(spec)
    lines = [f"workflow {spec.name}: {' -> '.join(stage_names(spec))}", ""]
    lines.append(f"  {'fetch' if not spec.pretrain.enabled else 'pretrain'}: source {spec.model.source or 'random init'}")
    if spec.model.already_drope:
        return "\n".join(lines[:-1] + _already_drope_lines(spec))
    lines.append(f"  drop_rope: qk_norm={spec.drop_rope.qk_norm} ({spec.drop_rope.qk_norm_scope}), "
                 f"rope kept in {spec.drop_rope.rope_layers or 'no'} layers; 1 CPU task, streams shards")
    tokens = r.steps * r.global_batch * seq
    res = f"{r.num_workers} workers x ({'1 GPU, ' if r.use_gpu else ''}{r.cpus_per_worker} CPU)"
    lines.append(f"  recalibrate: {res}, {zero_name(r.zero_stage)}, {r.steps} steps x {r.global_batch} seqs x "
                 f"{seq or '?'} tokens = {_count(tokens)} tokens, lr {r.lr}")
    lines += _data_lines(spec, seq)
    if a is not None and seq:
        lines += _cost_lines(spec, a, seq, tokens) + _memory_lines(spec, a, seq)
    else:
        lines.append("      (FLOPs and memory: give plan.architecture or a local model.source with config.json)")
    return "\n".join(lines + _fit_and_evaluate_lines(spec))


def _already_drope_lines(spec: WorkflowSpec) -> list[str]:
    """model.already_drope: a release is fetched (imported as data) and so is its base; nothing is trained."""
    return [f"  fetch_drope: {spec.model.source} (already DroPE: drop_rope and recalibrate do not run)",
            f"  fetch_base: {spec.model.base_source} (the baselines' RoPE model)", *_fit_and_evaluate_lines(spec)]


def _fit_and_evaluate_lines(spec: WorkflowSpec) -> list[str]:
    t, e = spec.fit_temperature, spec.evaluate
    return [f"  fit_temperature: extension factors {t.extension_factors}, <= {t.max_evals} loss evaluations each",
            f"  evaluate: variants {e.variants} x tasks {e.tasks} x factors {e.extension_factors} "
            f"({len(e.variants) * len(e.tasks) * len(e.extension_factors)} parallel units)",
            f"  storage: {spec.storage.root or '$DROPE_HOME/runs'}   tracking: {spec.tracking.uri or 'embedded sqlite'}"]


def forward_flops(n: int, a: ArchitectureConfig, length: int) -> float:
    """One causal forward pass over `length` tokens: 2N a token plus attention 2 L d length^2."""
    return 2 * n * length + 2 * a.num_hidden_layers * a.hidden_size * length ** 2


def _cost_lines(spec: WorkflowSpec, a: ArchitectureConfig, seq: int, tokens: int) -> list[str]:
    r, p, n = spec.recalibrate, spec.plan, spec.model.parameters or parameters(a)
    attention = 6 * a.num_hidden_layers * seq * a.hidden_size  # causal, forward + backward, a token
    per_token = 6 * n + attention
    if r.activation_checkpointing:  # one more forward of every layer in backward
        per_token += 2 * n + attention / 3
    train = per_token * tokens
    t, e, C = spec.fit_temperature, spec.evaluate, seq
    fit = sum(t.max_evals * t.sequences_per_length * forward_flops(n, a, int(s * C)) for s in t.extension_factors)
    per_cell = sum(forward_flops(n, a, int(s * C)) for s in e.extension_factors)
    samples = sum(e.perplexity_sequences if task == "perplexity" else e.samples_per_cell for task in e.tasks)
    evaluation = len(e.variants) * samples * per_cell
    hours = lambda flops: flops / (p.peak_tflops * 1e12 * p.mfu) / 3600  # noqa: E731
    recompute = "with activation recompute" if r.activation_checkpointing else "no recompute"
    return [f"      FLOPs: recalibrate {train:.2e} ({recompute}, attention {attention * tokens / train:.0%}), "
            f"fit {fit:.2e}, evaluate {evaluation:.2e}",
            f"      GPU-hours at {p.mfu:.0%} of {p.peak_tflops:g} TFLOP/s: recalibrate {hours(train):.1f}, "
            f"fit {hours(fit):.2f}, evaluate {hours(evaluation):.2f}"]


def _memory_lines(spec: WorkflowSpec, a: ArchitectureConfig, seq: int) -> list[str]:
    r, p, gpus = spec.recalibrate, spec.plan, gpus_of(spec)
    m = memory(spec, a, gpus, seq)
    on, off = (m.activations, m.activations_other) if r.activation_checkpointing else (m.activations_other, m.activations)
    saves = math.ceil(r.steps / r.checkpoint_every)
    kept = min(saves, r.keep_checkpoints or saves)
    lines = [f"      memory per GPU ({gpus} GPUs, ZeRO-{r.zero_stage}{', offload' if r.offload_optimizer else ''}): "
             f"model states {m.model_states / GB:.1f} GB (DeepSpeed's estimate) + activations at "
             f"{r.micro_batch} x {seq}: {on / GB:.1f} GB checkpointed / {off / GB:.1f} GB not -> "
             f"{m.per_gpu / GB:.1f} GB of {p.gpu_memory_gb:g} GB",
             f"      host RAM per node ({min(gpus, p.gpus_per_node)} workers): ~{m.host_per_node / GB:.0f} GB "
             f"(DeepSpeed's estimate + {WORKER_PROCESS_GB:g} GB a worker + one output shard; "
             + ("ZeRO-3 builds under zero.Init: no worker holds the whole model)" if r.zero_stage == 3
                else f"ZeRO-{r.zero_stage}: every worker loads the whole model in the training dtype)"),
             f"      checkpoints: {m.checkpoint / GB:.0f} GB each, {saves} written, {kept} kept "
             f"({kept * m.checkpoint / GB:.0f} GB); final weights {m.output / GB:.1f} GB (bf16)"]
    if r.use_gpu and (why := check_fits(spec)):
        lines.append(f"  WARNING: {why}")
    return lines


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
