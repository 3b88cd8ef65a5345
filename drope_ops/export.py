"""Export a DroPE checkpoint so other tools can load it: natively, or with its modeling file.

    drope export SRC DST --format native        # vanilla transformers, no trust_remote_code
    drope export SRC DST --format remote-code   # auto_map + modeling_drope.py next to the weights
    drope export SRC DST --format sakana        # the official DroPE code's llama_drope / qwen2_drope layout

Native layouts (exact: same logits as the DroPE model):
- every layer keeps RoPE, no QK-norm          -> Llama
- some or all layers NoPE, no QK-norm         -> SmolLM3 (`no_rope_layers`, 1 = keeps RoPE)
- all layers NoPE, per-head QK-norm on q and k -> Qwen3 whose RoPE is an exact identity
  (rope_type linear with factor 1e30: every angle rounds to 0, cos = 1, sin = 0)
A static logit scale beta is folded into the weights (q_norm.weight, else q_proj) since
beta * (q.k) / sqrt(d) = (beta q).k / sqrt(d). Q/K/V biases without an o_proj bias (Qwen2) become
`attention_bias` with a zero o_proj bias. Everything else has no native layout: full-width QK-norm
(the paper's), Q-only norm, a dynamic beta, or QK-norm with some layers keeping RoPE; those are
refused with the option to use instead (`--format remote-code`, or other surgery options).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from drope_ops import modeling
from drope_ops.errors import CheckpointError, SpecError
from drope_ops.manifest import write_manifest
from drope_ops.modeling import DropeConfig
from drope_ops.surgery import (INDEX_NAME, atomic_directory, copy_shards, copy_tokenizer_files, read_config,
                               weight_files)

FORMATS = ("native", "remote-code", "sakana")
IDENTITY_ROPE = {"rope_type": "linear", "factor": 1e30}  # Qwen3 layout: rotates by exactly nothing
REMOTE_MODULE = "modeling_drope"
_COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
           "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
           "attention_dropout")


def native_layout(config: DropeConfig) -> str:
    """The transformers model_type that represents this DroPE config exactly.

    Raises:
        CheckpointError: no native layout fits; the message names the option to choose instead.
    """
    remote = "export with --format remote-code instead"
    if config.logit_scale_c is not None:
        raise CheckpointError(f"logit_scale_c={config.logit_scale_c}: a length-dependent logit scale has no "
                              f"native layout; {remote}, or fix a static logit_scale for one target length")
    n, rope = config.num_hidden_layers, list(config.rope_layers)
    if config.qk_norm == "none":
        if config.head_dim * config.num_attention_heads != config.hidden_size and len(rope) < n:
            raise CheckpointError(f"head_dim={config.head_dim} != hidden_size/num_attention_heads: SmolLM3 "
                                  f"cannot express it; {remote}")
        return "llama" if len(rope) == n else "smollm3"
    if config.qk_norm_scope == "full":
        raise CheckpointError(f"qk_norm_scope='full' (RMSNorm over all heads, the paper's) has no native "
                              f"transformers layout; {remote}, or run drop-rope with --qk-norm-scope head")
    if config.qk_norm in ("q", "k"):
        raise CheckpointError(f"qk_norm={config.qk_norm!r} (one side only) has no native layout; {remote}, "
                              f"or run drop-rope with --qk-norm qk --qk-norm-scope head")
    if rope:
        raise CheckpointError(f"rope_layers={rope} with QK-norm: no native layout mixes RoPE and NoPE layers "
                              f"with per-head norms; {remote}, or drop RoPE from every layer")
    if config.mlp_bias:
        raise CheckpointError(f"mlp_bias with QK-norm: Qwen3 has no MLP bias; {remote}")
    return "qwen3"


def native_config(config: DropeConfig, layout: str):
    """A plain transformers config (LlamaConfig / SmolLM3Config / Qwen3Config) for the layout."""
    from transformers import LlamaConfig, Qwen3Config, SmolLM3Config

    fields = {k: getattr(config, k) for k in _COMMON}
    fields["attention_bias"] = bool(config.attention_bias or config.qkv_bias)
    fields["rope_parameters"] = dict(config.rope_parameters)
    fields["architectures"] = [{"llama": "LlamaForCausalLM", "smollm3": "SmolLM3ForCausalLM",
                                "qwen3": "Qwen3ForCausalLM"}[layout]]
    if layout == "llama":
        return LlamaConfig(mlp_bias=config.mlp_bias, **fields)
    if layout == "smollm3":
        no_rope = [int(i in config.rope_layers) for i in range(config.num_hidden_layers)]
        return SmolLM3Config(no_rope_layers=no_rope, mlp_bias=config.mlp_bias, use_sliding_window=False, **fields)
    fields["rope_parameters"] = {**IDENTITY_ROPE, "rope_theta": config.rope_parameters.get("rope_theta", 10000.0)}
    return Qwen3Config(use_sliding_window=False, **fields)


def fold_logit_scale(tensors: dict[str, torch.Tensor], beta: float, *, into: str) -> list[str]:
    """Multiply every layer's q_norm weight (into="q_norm") or q_proj weight and bias (into="q_proj")
    by beta, in place; returns the names changed.

    Exact in real arithmetic: the RMSNorm weight, RoPE and the split into heads are all linear in q.
    """
    suffixes = ("self_attn.q_norm.weight",) if into == "q_norm" else ("self_attn.q_proj.weight", "self_attn.q_proj.bias")
    changed = [name for name in tensors if name.endswith(suffixes)]
    for name in changed:
        tensors[name] = (tensors[name].double() * beta).to(tensors[name].dtype)
    return changed


def add_zero_o_proj_bias(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Q/K/V biases alone (Qwen2) -> `attention_bias` layouts also need o_proj.bias: add zeros."""
    added = []
    for name in list(tensors):
        if name.endswith("self_attn.o_proj.weight"):
            bias = name.replace(".weight", ".bias")
            if bias not in tensors:
                tensors[bias] = torch.zeros(tensors[name].shape[0], dtype=tensors[name].dtype)
                added.append(bias)
    return added


def _load_drope_config(src: Path) -> DropeConfig:
    raw = read_config(src)
    if raw.get("model_type") != "drope":
        raise CheckpointError(f"{src}: model_type {raw.get('model_type')!r} is not a DroPE checkpoint; "
                              f"run `drope drop-rope` on it first")
    return DropeConfig.from_pretrained(src)


def export_checkpoint(src, dst, *, format: str = "native", progress: bool = True) -> Path:
    """Write an exported copy of the DroPE checkpoint at src to dst (atomically, with a manifest).

    Raises:
        SpecError: unknown format.
        CheckpointError: src is not a DroPE checkpoint, or no native layout fits (message says which
            option to choose instead).
    """
    if format not in FORMATS:
        raise SpecError(f"format={format!r}: choose one of {', '.join(FORMATS)}")
    src, dst = Path(src), Path(dst)
    config = _load_drope_config(src)
    if format == "sakana":
        from drope_ops.sakana import export_release

        return export_release(src, dst, config, progress=progress)
    files, index = weight_files(src)
    if format == "remote-code":
        with atomic_directory(dst) as tmp:
            hashes = copy_shards(files, tmp, progress=progress, desc=f"export {src.name}")
            raw = {**read_config(src), "architectures": ["DropeForCausalLM"],
                   "auto_map": {"AutoConfig": f"{REMOTE_MODULE}.DropeConfig",
                                "AutoModelForCausalLM": f"{REMOTE_MODULE}.DropeForCausalLM"}}
            (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
            shutil.copyfile(modeling.__file__, tmp / f"{REMOTE_MODULE}.py")
            if index is not None:
                shutil.copyfile(src / INDEX_NAME, tmp / INDEX_NAME)
            copy_tokenizer_files(src, tmp)
            write_manifest(tmp, hashes)
        return dst

    layout = native_layout(config)
    target = native_config(config, layout)
    qkv_only = config.qkv_bias and not config.attention_bias
    with atomic_directory(dst) as tmp:
        weight_map = {}
        for f in tqdm(files, desc=f"export {src.name} as {layout}", unit="shard", disable=not progress):
            tensors = load_file(f)  # one shard at a time
            if config.logit_scale != 1.0:
                fold_logit_scale(tensors, config.logit_scale, into="q_norm" if config.qk_norm != "none" else "q_proj")
            if qkv_only:
                add_zero_o_proj_bias(tensors)
            save_file(tensors, tmp / f.name, metadata={"format": "pt"})
            weight_map.update({k: f.name for k in tensors})
            del tensors
        if index is not None:
            total = sum((tmp / f.name).stat().st_size for f in files)
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        target.to_json_file(tmp / "config.json", use_diff=False)
        copy_tokenizer_files(src, tmp)
        write_manifest(tmp)
    return dst
