"""The DroPE model: a Llama-family causal LM whose layers may drop RoPE, with optional QK-norm and a
softmax logit scale.

This file is self-contained (torch + transformers only): `drope export --format remote-code` copies it
verbatim next to a checkpoint, so it must not import anything from this project.

Per layer the attention is

    q = q_norm(q_proj(x)), k = k_norm(k_proj(x))          # norms optional: none | qk | q, scope full | head
    q, k = rope(q, k)  only for layers in config.rope_layers (none by default: no rotary work at all)
    out = softmax(beta * q.k / sqrt(d)) v                  # through transformers' attention backends

with beta = logit_scale * max(1, 1 + logit_scale_c * ln(L / original_max_position_embeddings)), L the
current key length (the paper's fitted softmax temperature, Section C.2; c = 0.103 for SmolLM-DroPE).
"""

from __future__ import annotations

import math
import typing
from typing import Literal

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

QkNorm = Literal["none", "qk", "q", "k"]
"""QK-norm after dropping RoPE: none, on q and k (the paper), on q only, or on k only (the official code's
k_norm_nope)."""
QkNormScope = Literal["full", "head"]
"""full: RMSNorm over num_heads*head_dim (the paper); head: per-head RMSNorm (Qwen3)."""
QK_NORM_CHOICES = typing.get_args(QkNorm)
QK_NORM_SCOPES = typing.get_args(QkNormScope)


@strict
class DropeConfig(LlamaConfig):
    r"""A LlamaConfig plus what DroPE changes.

    rope_layers: indices of layers that keep RoPE (empty = every layer is NoPE, the paper's DroPE).
    qk_norm: "none", "qk" (RMSNorm on queries and keys), "q" (queries only, paper Section C.1) or "k" (keys
        only, the official code's k_norm_nope).
    qk_norm_scope: "full" (RMSNorm over num_heads*head_dim before splitting heads, as the paper / OLMo2)
        or "head" (per-head RMSNorm over head_dim, as Qwen3).
    logit_scale: static beta multiplying q.k/sqrt(d) (1.0 = unchanged).
    logit_scale_c: dynamic beta coefficient c: beta = max(1, 1 + c*ln(L/C_train)); None = off.
    original_max_position_embeddings: C_train, the context the RoPE model was pretrained at.
    qkv_bias: bias on q/k/v projections only (Qwen2 layout); attention_bias puts one on o_proj too.
    source_model / source_sha256: provenance of the checkpoint the surgery started from.
    source_rope_parameters: the source's RoPE scaling (yarn, linear, ...) that the surgery removed, as it
        was; None when the source used plain RoPE.
    source_layout: the released layout the checkpoint was imported from ("llama_drope/qk_norm_nope": already
        DroPE and recalibrated elsewhere, see drope_ops/sakana.py); None when drope's own surgery made it.
    """

    model_type = "drope"

    rope_layers: list[int] | None = None
    qk_norm: str = "none"
    qk_norm_scope: str = "full"
    logit_scale: float = 1.0
    logit_scale_c: float | None = None
    original_max_position_embeddings: int | None = None
    qkv_bias: bool = False
    source_model: str | None = None
    source_sha256: str | None = None
    source_rope_parameters: dict | None = None
    source_layout: str | None = None

    def __post_init__(self, **kwargs):
        if self.rope_layers is None:
            self.rope_layers = []
        if self.original_max_position_embeddings is None:
            self.original_max_position_embeddings = self.max_position_embeddings
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        if self.qk_norm not in QK_NORM_CHOICES:
            raise ValueError(f"qk_norm={self.qk_norm!r}: choose one of {QK_NORM_CHOICES}")
        if self.qk_norm_scope not in QK_NORM_SCOPES:
            raise ValueError(f"qk_norm_scope={self.qk_norm_scope!r}: choose one of {QK_NORM_SCOPES}")
        bad = [i for i in self.rope_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"rope_layers {bad} out of range: the model has layers 0..{self.num_hidden_layers - 1}"
            )
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale={self.logit_scale}: must be > 0")


def dynamic_logit_scale(key_len: int, c: float | None, original_context: int) -> float:
    """beta(L) = max(1, 1 + c*ln(L/C_train)); exactly 1.0 for L <= C_train or c None."""
    if c is None or key_len <= original_context:
        return 1.0
    return max(1.0, 1.0 + c * math.log(key_len / original_context))


class DropeAttention(LlamaAttention):
    """LlamaAttention with optional RoPE, optional q/k RMSNorm and a logit scale."""

    def __init__(self, config: DropeConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.use_rope = layer_idx in config.rope_layers
        if config.qkv_bias:
            for proj in (self.q_proj, self.k_proj, self.v_proj):
                proj.bias = nn.Parameter(torch.zeros(proj.out_features))
        n_q = config.num_attention_heads * self.head_dim
        n_k = config.num_key_value_heads * self.head_dim
        full = config.qk_norm_scope == "full"
        self.q_norm = (
            LlamaRMSNorm(n_q if full else self.head_dim, eps=config.rms_norm_eps)
            if config.qk_norm in ("qk", "q")
            else None
        )
        self.k_norm = (
            LlamaRMSNorm(n_k if full else self.head_dim, eps=config.rms_norm_eps)
            if config.qk_norm in ("qk", "k")
            else None
        )
        self.norm_full = full

    def _project(self, proj, norm, hidden_states, hidden_shape):
        x = proj(hidden_states)  # (B, T, H*D)
        if norm is not None and self.norm_full:
            x = norm(x)
        x = x.view(hidden_shape)  # (B, T, H, D)
        if norm is not None and not self.norm_full:
            x = norm(x)
        return x.transpose(1, 2)  # (B, H, T, D)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self._project(self.q_proj, self.q_norm, hidden_states, hidden_shape)
        key_states = self._project(self.k_proj, self.k_norm, hidden_states, hidden_shape)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        if self.use_rope:
            cos, sin = position_embeddings
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        cfg = self.config
        beta = cfg.logit_scale * dynamic_logit_scale(
            key_states.shape[-2], cfg.logit_scale_c, cfg.original_max_position_embeddings
        )
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(cfg._attn_implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling * beta,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class NoRotaryEmbedding(nn.Module):
    """Stands in for the rotary embedding when no layer keeps RoPE: computes nothing."""

    def forward(self, x, position_ids):
        return None


class DropeDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer built with DropeAttention in place (its parameter names are Llama's).

    Each DroPE module is built once, never built as Llama's and then replaced: under DeepSpeed's
    zero.Init (ZeRO-3) every module built is memory, partitioned and tracked, until the model is gone."""

    def __init__(self, config: DropeConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = DropeAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DropeModel(LlamaModel):
    config_class = DropeConfig

    def __init__(self, config: DropeConfig):
        LlamaPreTrainedModel.__init__(self, config)  # LlamaModel's body, with DroPE layers (built once)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DropeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config) if config.rope_layers else NoRotaryEmbedding()
        self.gradient_checkpointing = False
        self.post_init()


class DropeForCausalLM(LlamaForCausalLM):
    config_class = DropeConfig

    def __init__(self, config: DropeConfig):
        LlamaPreTrainedModel.__init__(self, config)  # LlamaForCausalLM's body around a DropeModel
        self.model = DropeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def register() -> None:
    """Register the model type with transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        AutoConfig.register(DropeConfig.model_type, DropeConfig)
        AutoModel.register(DropeConfig, DropeModel)
        AutoModelForCausalLM.register(DropeConfig, DropeForCausalLM)
    except ValueError:  # already registered
        pass


if __name__ == "drope_ops.modeling":  # the package's copy (not an exported remote-code file)
    register()
