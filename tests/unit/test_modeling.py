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


def _drope(num_heads=4, num_kv=2, **fields):
    cfg = {**TINY, "num_attention_heads": num_heads, "num_key_value_heads": num_kv}
    return DropeForCausalLM(DropeConfig(**cfg, **fields)).eval()


def test_qk_norm_full_and_head_are_ones_and_differ_where_they_should():
    x = torch.randint(0, 97, (2, 30))
    for heads, kv in [(4, 2), (1, 1)]:
        full = _drope(heads, kv, qk_norm="qk", qk_norm_scope="full")
        head = _drope(heads, kv, qk_norm="qk", qk_norm_scope="head")
        shared = {k: v for k, v in full.state_dict().items() if "q_norm" not in k and "k_norm" not in k}
        missing, _ = head.load_state_dict(shared, strict=False)
        assert sorted({k.split(".")[-2] for k in missing}) == ["k_norm", "q_norm"]
        d = 64 // heads
        for model, q_width, k_width in [(full, heads * d, kv * d), (head, d, d)]:
            attn = model.model.layers[0].self_attn
            assert torch.equal(attn.q_norm.weight, torch.ones(q_width)), "q_norm must start as ones"
            assert torch.equal(attn.k_norm.weight, torch.ones(k_width)), "k_norm must start as ones"
            assert attn.q_norm.variance_epsilon == model.config.rms_norm_eps
        with torch.no_grad():
            a, b = full(x).logits, head(x).logits
        if heads == 1:  # one head: the full width is the head, so both norms are the same map
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        else:  # several heads: full-width RMS mixes heads, per-head does not
            assert (a - b).abs().max() > 1e-3


def test_q_only_norm_has_no_k_norm():
    attn = _drope(qk_norm="q").model.layers[0].self_attn
    assert attn.q_norm is not None and attn.k_norm is None


@pytest.mark.parametrize("fields", [
    dict(qk_norm="qk", logit_scale=1.4, logit_scale_c=0.3, original_max_position_embeddings=16),
    dict(rope_layers=[1], qk_norm="q", qk_norm_scope="head"),
])
def test_sdpa_and_eager_agree(fields):
    model = _drope(**fields)
    x = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(x).logits
        model.set_attn_implementation("sdpa")
        out = model(x, output_attentions=False)
    torch.testing.assert_close(out.logits, eager, atol=1e-5, rtol=1e-5)


def test_dynamic_scale_changes_logits_only_beyond_training_context():
    x = torch.randint(0, 97, (1, 48))
    base, scaled = _drope(), _drope(logit_scale_c=0.5, original_max_position_embeddings=32)
    scaled.load_state_dict(base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(scaled(x[:, :32]).logits, base(x[:, :32]).logits, atol=0, rtol=0)
        assert (scaled(x).logits - base(x).logits).abs().max() > 1e-4


def test_forward_at_8x_context_on_sdpa_without_rotary_work():
    model = _drope(qk_norm="qk")  # all layers NoPE
    assert model.config._attn_implementation == "sdpa"
    assert type(model.model.rotary_emb).__name__ == "NoRotaryEmbedding"
    x = torch.randint(0, 97, (1, 8 * TINY["max_position_embeddings"]))
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (1, x.shape[1], 97) and torch.isfinite(out.logits).all()
