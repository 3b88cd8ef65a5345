"""DroPE model vs transformers' Llama on tiny configs (ours vs theirs, fp32)."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drope_ops.modeling import DropeConfig, DropeForCausalLM, dynamic_logit_scale

TINY = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
}


def pair(variant, **drope):
    cfg = {**TINY, **VARIANTS[variant]}
    theirs = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    ours = DropeForCausalLM(DropeConfig(**cfg, **drope)).eval()
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not unexpected
    assert all("_norm" in k for k in missing), missing
    return ours, theirs


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_rope_kept_matches_llama(variant):
    ours, theirs = pair(variant, rope_layers=[0, 1, 2])
    x = torch.randint(0, 97, (2, 40))
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=0)


def test_nope_layer_is_identity_rotation():
    ours, theirs = pair("gqa", rope_layers=[])
    # theirs with the rotation forced to identity: every position gets cos=1, sin=0
    theirs.model.rotary_emb.inv_freq.zero_()
    x = torch.randint(0, 97, (2, 40))
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=0)


def test_dynamic_scale_is_one_within_training_context():
    assert dynamic_logit_scale(64, 0.103, 64) == 1.0
    assert dynamic_logit_scale(1, 0.412, 64) == 1.0
    assert dynamic_logit_scale(128, None, 64) == 1.0
    assert dynamic_logit_scale(256, 0.103, 64) == pytest.approx(1 + 0.103 * math.log(4))
