"""The DroPE config checked without importing transformers (seconds of CPU): the field types and rules
transformers' strict config dataclass enforces when DropeConfig is constructed, run with the same
validators (huggingface_hub's @strict dataclasses, which transformers' configs are).

LlamaConfig declares the fields transformers type-checks (PreTrainedConfig's and DropeConfig's own are
not checked by it; the surgery sets DropeConfig's); tests/unit/test_config_types.py checks FIELD_TYPES
against the installed transformers' annotations and that this check refuses what constructing
DropeConfig refuses.
"""

from __future__ import annotations

from dataclasses import make_dataclass

from huggingface_hub.dataclasses import StrictDataclassFieldValidationError, strict

# field -> type, as LlamaConfig annotates it (transformers 5.x); PreTrainedConfig's annotations are strings,
# which the validator skips, so transformers checks LlamaConfig's fields alone. rope_parameters is
# narrowed to what JSON holds (RopeParameters | dict | None, RopeParameters a TypedDict: any dict passes).
FIELD_TYPES = {
    "vocab_size": int,
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int | None,
    "hidden_act": str,
    "max_position_embeddings": int,
    "initializer_range": float,
    "rms_norm_eps": float,
    "use_cache": bool,
    "pad_token_id": int | None,
    "bos_token_id": int | None,
    "eos_token_id": int | list[int] | None,
    "pretraining_tp": int | None,
    "tie_word_embeddings": bool,
    "rope_parameters": dict | None,
    "attention_bias": bool,
    "attention_dropout": int | float | None,
    "mlp_bias": bool,
    "head_dim": int | None,
}
# LlamaConfig's interval() fields: name -> (min, max)
FIELD_RANGES = {"initializer_range": (0.0, 1.0)}


def config_problem(fields: dict) -> str | None:
    """Why transformers would refuse a Llama-family config dict (None = it would accept it)."""
    given = {name: value for name, value in fields.items() if name in FIELD_TYPES}
    typed = strict(make_dataclass("LlamaConfigFields", [(name, FIELD_TYPES[name]) for name in given]))
    try:
        typed(**given)
    except StrictDataclassFieldValidationError as e:
        return " ".join(str(e).split())
    for name, (low, high) in FIELD_RANGES.items():
        if name in fields and not low <= fields[name] <= high:
            return f"field {name!r} must lie in [{low}, {high}], got {fields[name]}"
    hidden, heads = fields.get("hidden_size", 4096), fields.get("num_attention_heads", 32)
    if heads < 1:
        return f"num_attention_heads={heads}: must be >= 1"
    if hidden % heads:
        return f"the hidden size ({hidden}) is not a multiple of the number of attention heads ({heads})"
    return None
