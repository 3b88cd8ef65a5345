"""The official DroPE release layout (SakanaAI/DroPE, commit 260a8bb), in and out, read as data.

    import_release(SRC, DST)                      # llama_drope / qwen2_drope -> a drope checkpoint (fetch does it)
    drope export SRC DST --format sakana          # a drope checkpoint -> their layout

Their layout (custom_models/drope.py and attention.py at 260a8bb): config.json is a LlamaConfig
(model_type "llama_drope") or Qwen2Config ("qwen2_drope") plus `attention_type` and, optionally,
`softmax_scale`; every layer is NoPE (RoPE applied with cos = 1, sin = 0: an identity). The
*_norm_nope types build both `self_attn.q_norm` (torch.nn.RMSNorm over num_heads*head_dim) and
`self_attn.k_norm` (over num_kv_heads*head_dim), eps = rms_norm_eps, applied to the q_proj / k_proj
output before the split into heads; the type says which one the forward reads (the other stays
ones, unread). A config with `softmax_scale` replaces 1/sqrt(head_dim) by it. Loading their
checkpoints with transformers needs trust_remote_code; here nothing of theirs runs: config.json and
safetensors headers are read, the shards copied.

In drope's terms: qk_norm none / qk / q / k with qk_norm_scope full, rope_layers [] and a static
logit_scale = softmax_scale * sqrt(head_dim). tests/unit/test_sakana.py checks the logits against a
re-derivation of their attention.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from drope_ops.errors import CheckpointError
from drope_ops.manifest import sha256_file, write_manifest
from drope_ops.surgery import (INDEX_NAME, LONE_SHARD, Ones, atomic_directory, check_config, config_json, copy_shards,
                               copy_tokenizer_files, drope_config_fields, float_dtype, norm_shard_bytes,
                               norm_weights, read_config, read_header, source_digest, weight_files,
                               write_index)

ATTENTION_TYPES = {"nope": "none", "qk_norm_nope": "qk", "q_norm_nope": "q", "k_norm_nope": "k"}
"""Their attention_type -> drope's qk_norm (scope full)."""
MODEL_TYPES = {"llama_drope": "llama", "qwen2_drope": "qwen2"}
"""Their model_type -> the RoPE family it was made from."""
ARCHITECTURES = {"llama_drope": "DroPELlamaForCausalLM", "qwen2_drope": "DroPEQwen2ForCausalLM"}
UNUSED_NORM_SHARD = "unread-norms.safetensors"
"""Ones for the norm their *_norm_nope model builds but does not read (q_norm_nope's k_norm, ...)."""
_DROPE_ONLY = ("rope_layers", "qk_norm", "qk_norm_scope", "logit_scale", "logit_scale_c", "qkv_bias",
               "original_max_position_embeddings", "source_model", "source_sha256", "source_rope_parameters",
               "source_layout", "auto_map", "transformers_version")


def is_release(config: dict) -> bool:
    """True when a config.json dict is in the official DroPE layout (llama_drope / qwen2_drope)."""
    return config.get("model_type") in MODEL_TYPES


def release_problem(config: dict) -> str | None:
    """Why a llama_drope / qwen2_drope config.json dict cannot be imported (None = it can)."""
    kind = config.get("attention_type", "nope")
    if kind not in ATTENTION_TYPES:
        return (f"attention_type {kind!r} is not one of the official code's ({', '.join(ATTENTION_TYPES)}); "
                f"fix config.json's attention_type")
    scale = config.get("softmax_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        return f"softmax_scale {scale!r} must be a number > 0 (or absent for 1/sqrt(head_dim)); fix config.json"
    if config.get("use_sliding_window"):
        return "use_sliding_window: true is not supported by the DroPE model; set it false in config.json"
    return None


def drope_fields(config: dict, *, source_model: str, original_context: int | None = None) -> dict:
    """The drope config fields of a llama_drope / qwen2_drope config.json dict (checked as surgery does)."""
    problem = release_problem(config)
    if problem:
        raise CheckpointError(f"config.json: {problem}")
    model_type, kind = config["model_type"], config.get("attention_type", "nope")
    base = {k: v for k, v in config.items() if k not in ("attention_type", "softmax_scale")}
    fields = drope_config_fields({**base, "model_type": MODEL_TYPES[model_type]}, qk_norm=ATTENTION_TYPES[kind],
                                 qk_norm_scope="full", rope_layers=[], original_context=original_context,
                                 source_model=source_model, source_sha256="")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if config.get("softmax_scale") is not None:  # theirs replaces 1/sqrt(d): beta = softmax_scale * sqrt(d)
        fields["logit_scale"] = float(config["softmax_scale"]) * math.sqrt(head_dim)
    fields["source_layout"] = f"{model_type}/{kind}"
    check_config(fields)
    return fields


def check_norms(src: Path, files: list[Path], fields: dict) -> dict[str, Path]:
    """The norm weights their layout holds, checked against what the type reads: returns the unread ones
    (name -> shard) that the import leaves out.

    Raises:
        CheckpointError: a norm the type reads is missing, or any norm has the wrong width.
    """
    headers = {f: read_header(f)[0] for f in files}
    where = {k: f for f, h in headers.items() for k in h if k != "__metadata__"}
    unread: dict[str, Path] = {}
    for layer in range(fields["num_hidden_layers"]):
        wanted = norm_weights({**fields, "qk_norm": "qk"}, layer, "F32")  # both, as their model builds them
        read = norm_weights(fields, layer, "F32")
        for name, ones in wanted.items():
            if name not in where:
                if name in read:
                    raise CheckpointError(f"{src}: weights lack {name} ({fields['source_layout']} reads it); "
                                          f"the checkpoint is incomplete: download it again")
                continue
            shape = headers[where[name]][name]["shape"]
            if shape != [ones.length]:
                raise CheckpointError(f"{where[name]}: {name} has shape {shape}, the layout needs [{ones.length}] "
                                      f"(num_heads*head_dim, full width); not a DroPE release of this config")
            if name not in read:
                unread[name] = where[name]
    return unread


def import_release(src, dst, *, source_name: str | None = None, original_context: int | None = None,
                   progress: bool = True) -> Path:
    """Write a drope checkpoint at dst from the llama_drope / qwen2_drope checkpoint at src (no code run).

    Shards are copied byte for byte; one holding an unread norm (q_norm_nope's k_norm) is rewritten
    without it, as the drope model has no such parameter.

    Raises:
        CheckpointError: not that layout, an unknown attention_type, a norm missing or of the wrong width,
            pickle-only weights, dst exists.
    """
    src, dst = Path(src), Path(dst)
    config = read_config(src)
    if not is_release(config):
        raise CheckpointError(f"{src}: model_type {config.get('model_type')!r} is not llama_drope / qwen2_drope")
    name = source_name or config.get("_name_or_path") or src.name
    fields = drope_fields(config, source_model=str(name), original_context=original_context)
    files, index = weight_files(src)
    unread = check_norms(src, files, fields)
    rewrite = sorted(set(unread.values()))
    with atomic_directory(dst) as tmp:
        hashes = copy_shards([f for f in files if f not in rewrite], tmp, progress=progress,
                             desc=f"import {src.name}") if len(rewrite) < len(files) else {}
        for f in rewrite:
            _write_without(f, tmp / f.name, [k for k, v in unread.items() if v == f])
        if index is not None:
            weight_map = {k: v for k, v in index["weight_map"].items() if k not in unread}
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": index.get("metadata") or {},
                                                      "weight_map": weight_map}, indent=2))
        src_hashes = {f.name: hashes.get(f.name) or sha256_file(f) for f in files}
        fields["source_sha256"] = source_digest(src, files, src_hashes)
        (tmp / "config.json").write_text(config_json(fields))
        copy_tokenizer_files(src, tmp)
        write_manifest(tmp, hashes)
    return dst


def _write_without(src: Path, dst: Path, names: list[str]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(src)
    for name in names:
        del tensors[name]
    save_file(tensors, dst, metadata={"format": "pt"})


def release_config(config) -> dict:
    """Their config.json dict for a DroPEConfig.

    Raises:
        CheckpointError: the model has no official layout (RoPE layers, per-head norms, a dynamic scale,
            MLP bias on Qwen2); the message names the option to use instead.
    """
    remote = "export with --format remote-code instead"
    if config.rope_layers:
        raise CheckpointError(f"rope_layers={list(config.rope_layers)}: the official layout is NoPE in every layer; "
                              f"{remote}, or drop RoPE from every layer")
    if config.qk_norm != "none" and config.qk_norm_scope != "full":
        raise CheckpointError(f"qk_norm_scope={config.qk_norm_scope!r}: the official norms are full width "
                              f"(num_heads*head_dim); {remote}, or run drop-rope with --qk-norm-scope full")
    if config.logit_scale_c is not None:
        raise CheckpointError(f"logit_scale_c={config.logit_scale_c}: the official code has a static softmax_scale "
                              f"only; {remote}, or fix a static logit_scale for one target length")
    model_type = "qwen2_drope" if config.qkv_bias and not config.attention_bias else "llama_drope"
    if model_type == "qwen2_drope" and config.mlp_bias:
        raise CheckpointError(f"mlp_bias with Q/K/V biases: Qwen2 has no MLP bias; {remote}")
    raw = {k: v for k, v in config.to_dict().items() if k not in _DROPE_ONLY}
    kind = {v: k for k, v in ATTENTION_TYPES.items()}[config.qk_norm]
    raw.update(model_type=model_type, architectures=[ARCHITECTURES[model_type]], attention_type=kind,
               head_dim=config.head_dim, rope_theta=config.rope_parameters.get("rope_theta", 10000.0))
    if config.logit_scale != 1.0:
        raw["softmax_scale"] = config.logit_scale / math.sqrt(config.head_dim)
    return raw


def export_release(src: Path, dst: Path, config, *, progress: bool = True) -> Path:
    """Write the drope checkpoint at src (its DroPEConfig `config`) to dst in the official layout."""
    raw = release_config(config)
    files, index = weight_files(src)
    fields = {**config.to_dict(), "qk_norm": config.qk_norm}
    unread: dict[str, Ones] = {}  # their *_norm_nope model builds both norms: the unread one as ones
    if config.qk_norm in ("q", "k"):
        dtype = float_dtype(_q_proj_dtype(files), "q_proj")
        for layer in range(config.num_hidden_layers):
            both = norm_weights({**fields, "qk_norm": "qk"}, layer, dtype)
            unread.update({k: v for k, v in both.items() if k not in norm_weights(fields, layer, dtype)})
    names = {files[0]: LONE_SHARD} if unread and index is None else {}
    with atomic_directory(dst) as tmp:
        hashes = copy_shards(files, tmp, names, progress=progress, desc=f"export {src.name} as {raw['model_type']}")
        if unread:
            (tmp / UNUSED_NORM_SHARD).write_bytes(norm_shard_bytes(unread))
            write_index(tmp, files, index, names, unread, shard=UNUSED_NORM_SHARD)
        elif index is not None:
            (tmp / INDEX_NAME).write_text((src / INDEX_NAME).read_text())
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(src, tmp)
        write_manifest(tmp, hashes)
    return dst


def _q_proj_dtype(files: list[Path]) -> str:
    for f in files:
        header, _ = read_header(f)
        for name, meta in header.items():
            if name.endswith("self_attn.q_proj.weight"):
                return meta["dtype"]
    raise CheckpointError(f"{files[0].parent}: weights lack self_attn.q_proj.weight; not a Llama-layout checkpoint")
