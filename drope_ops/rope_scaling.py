"""RoPE-scaling baselines of a base checkpoint: as is, PI (linear), NTK (dynamic) and YaRN.

Every variant is the same weights with a different `rope_parameters` in the config; transformers'
own RoPE init functions (ROPE_INIT_FUNCTIONS) compute the frequencies, nothing here re-derives them.

    cfg = variant_config(AutoConfig.from_pretrained(base), "yarn", factor=4, original_context=2048)
    model = load_variant(base, "yarn", factor=4, original_context=2048)

`original_context` is C_train, the context the base model was pretrained at. It is not always the
config's max_position_embeddings: SmolLM2-135M's config says 8192 though it pretrained at 2048.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from drope_ops.errors import SpecError

BASELINES = ("rope", "pi", "ntk", "yarn")
"""Variant names: the base model as is, position interpolation, dynamic NTK, YaRN."""

_ROPE_TYPE = {"pi": "linear", "ntk": "dynamic", "yarn": "yarn"}
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


def original_context_of(config, override: int | None = None) -> int:
    """C_train of a config: `override`, else original_max_position_embeddings, else max_position_embeddings."""
    if override:
        return int(override)
    rope = getattr(config, "rope_parameters", None) or {}
    value = (
        getattr(config, "original_max_position_embeddings", None)
        or (rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None)
        or config.max_position_embeddings
    )
    return int(value)


def variant_config(base_config, variant: str, factor: float, original_context: int):
    """A copy of `base_config` whose rope_parameters give `variant` at extension `factor`.

    - rope: unchanged (max_position_embeddings raised so nothing refuses the longer input).
    - pi:   {"rope_type": "linear", "factor": s}: positions divided by s.
    - ntk:  {"rope_type": "dynamic", "factor": s}; max_position_embeddings = C_train, because
            transformers' dynamic NTK treats max_position_embeddings as the original context and
            grows the base only for sequences longer than it.
    - yarn: {"rope_type": "yarn", "factor": s, "beta_fast": 32, "beta_slow": 1,
            "original_max_position_embeddings": C_train}.
    """
    if variant not in BASELINES:
        raise SpecError(f"rope variant {variant!r} is unknown; choose one of {BASELINES}")
    if not factor >= 1.0:
        raise SpecError(f"extension factor {factor} must be >= 1 (s = C_test / C_train)")
    cfg = copy.deepcopy(base_config)
    base_rope = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = base_rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if base_rope.get("rope_type", "default") != "default" and variant != "rope":
        raise SpecError(f"the base checkpoint already uses rope_type={base_rope['rope_type']!r}; "
                        f"baselines start from a plain RoPE model (rope_type 'default')")
    target = int(round(original_context * factor))
    if variant == "rope":
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, target)
        return cfg
    params = {"rope_type": _ROPE_TYPE[variant], "rope_theta": theta, "factor": float(factor)}
    if variant == "yarn":
        params.update(beta_fast=YARN_BETA_FAST, beta_slow=YARN_BETA_SLOW,
                      original_max_position_embeddings=int(original_context))
    cfg.rope_parameters = params
    cfg.max_position_embeddings = int(original_context) if variant == "ntk" else max(target, original_context)
    if hasattr(cfg, "validate_rope"):  # transformers' own check of the rope_parameters
        cfg.validate_rope()
    return cfg


def reference_inv_freq(config, seq_len: int | None = None) -> torch.Tensor:
    """transformers' own inverse frequencies for `config` (at `seq_len` for dynamic types)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding.compute_default_rope_parameters(config, "cpu")[0]
    kwargs = {"seq_len": seq_len} if seq_len is not None else {}
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **kwargs)[0]


def load_variant(checkpoint: str | Path, variant: str, factor: float, original_context: int | None = None,
                 *, dtype: torch.dtype = torch.float32):
    """The base checkpoint's causal LM with `variant`'s rope_parameters, in eval mode.

    Safetensors only (use_safetensors=True), never remote code: a checkpoint is data.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    base_cfg = AutoConfig.from_pretrained(checkpoint)
    cfg = variant_config(base_cfg, variant, factor, original_context_of(base_cfg, original_context))
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, config=cfg, dtype=dtype, use_safetensors=True, attn_implementation="sdpa"
    )
    return model.eval()
