"""drope_ops.config_types: the surgery's transformers-free config check against transformers itself."""

import dataclasses
import json
import typing

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, LlamaConfig

from drope_ops.config_types import FIELD_TYPES, config_problem
from drope_ops.modeling import DropeConfig
from drope_ops.surgery import drop_rope, drope_config_fields, read_config


def _json_type(annotation):
    """The annotation without the members a JSON config cannot hold (torch.dtype) and with TypedDicts as dict."""
    if typing.get_origin(annotation) not in (typing.Union, type(int | None)):
        return annotation
    members = [a for a in typing.get_args(annotation) if a is not torch.dtype]
    members = [dict if typing.is_typeddict(a) else a for a in members]
    return typing.Union[tuple(dict.fromkeys(members))]


def test_field_types_are_transformers_annotations():
    """The fields @strict checks: LlamaConfig's (PreTrainedConfig's are string annotations, which it skips)."""
    checked = {f.name: _json_type(f.type) for f in dataclasses.fields(LlamaConfig) if not isinstance(f.type, str)}
    assert FIELD_TYPES == checked


def _fields(debug_checkpoint, **changes):
    src = {**read_config(debug_checkpoint), **changes}
    return drope_config_fields(src, qk_norm="qk", qk_norm_scope="full", rope_layers=[], original_context=None,
                               source_model="debug", source_sha256="")


def _transformers_refuses(fields) -> bool:
    try:
        DropeConfig(**fields)
    except (ValueError, TypeError, StrictDataclassError, ZeroDivisionError):
        return True
    return False


CHANGES = [
    {},
    {"rms_norm_eps": "1e-5"}, {"rms_norm_eps": 1}, {"rms_norm_eps": 1e-5},
    {"num_hidden_layers": 2.0}, {"vocab_size": None}, {"tie_word_embeddings": 1}, {"use_cache": "true"},
    {"hidden_size": 66}, {"num_attention_heads": 0}, {"initializer_range": 2.0}, {"initializer_range": 0.5},
    {"eos_token_id": [1, 2]}, {"eos_token_id": "2"}, {"pad_token_id": None}, {"bos_token_id": 1.0},
    {"hidden_act": 1}, {"attention_dropout": 0}, {"attention_dropout": "0.1"}, {"head_dim": "16"},
    {"problem_type": "bogus"}, {"return_dict": "y"}, {"dtype": "bfloat16"}, {"torch_dtype": "float16"},
    {"rope_parameters": "x"}, {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    {"num_key_value_heads": None}, {"mlp_bias": None}, {"unknown_field": "any value"},
]


@pytest.mark.parametrize("changes", CHANGES, ids=[json.dumps(c) for c in CHANGES])
def test_refuses_what_transformers_refuses(debug_checkpoint, changes):
    fields = _fields(debug_checkpoint, **changes)
    assert (config_problem(fields) is not None) == _transformers_refuses(fields)


def test_written_config_is_what_transformers_builds(yarn_checkpoint, tmp_path):
    """config.json holds the fields as JSON; transformers builds from it the config it builds from the fields."""
    out = drop_rope(yarn_checkpoint, tmp_path / "d", progress=False)
    written = json.loads((out / "config.json").read_text())
    fields = _fields(yarn_checkpoint)
    fields.update(source_sha256=written["source_sha256"], source_model=written["source_model"])
    loaded, built = AutoConfig.from_pretrained(out).to_dict(), DropeConfig(**fields).to_dict()
    assert loaded.pop("_name_or_path") == str(out) and built.pop("_name_or_path") == ""
    assert loaded == built
    assert loaded["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert loaded["source_rope_parameters"]["rope_type"] == "yarn"
