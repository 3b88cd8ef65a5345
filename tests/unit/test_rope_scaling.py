"""RoPE-scaling baselines: PI / NTK / YaRN variants load from a base checkpoint and their inverse
frequencies are transformers' own for the same factor."""

import math

import pytest
import torch

from drope_ops import rope_scaling
from drope_ops.errors import SpecError


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_variants_load_with_transformers_frequencies(debug_checkpoint, factor):
    from transformers import AutoConfig, LlamaConfig

    base = rope_scaling.load_variant(debug_checkpoint, "rope", factor, original_context=128)
    base_inv = base.model.rotary_emb.inv_freq.clone()
    d = 64 // 4  # head_dim of the debug model
    for variant, params in [
        ("pi", {"rope_type": "linear", "factor": factor}),
        ("ntk", {"rope_type": "dynamic", "factor": factor}),
        ("yarn", {"rope_type": "yarn", "factor": factor, "beta_fast": 32.0, "beta_slow": 1.0,
                  "original_max_position_embeddings": 128}),
    ]:
        model = rope_scaling.load_variant(debug_checkpoint, variant, factor, original_context=128)
        theirs_cfg = AutoConfig.from_pretrained(debug_checkpoint)
        theirs_cfg.rope_parameters = {"rope_theta": 10000.0, **params}
        theirs_cfg.max_position_embeddings = 128 if variant == "ntk" else int(128 * factor)
        L = int(128 * factor)
        ours = model.model.rotary_emb.inv_freq
        torch.testing.assert_close(ours, rope_scaling.reference_inv_freq(theirs_cfg))
        with torch.no_grad():
            model(torch.randint(0, 256, (1, L)))  # dynamic NTK grows its base at L > C_train
        torch.testing.assert_close(model.model.rotary_emb.inv_freq,
                                   rope_scaling.reference_inv_freq(theirs_cfg, seq_len=L) if variant == "ntk" else ours)
        if variant == "pi":  # positions / s  <=>  frequencies / s
            torch.testing.assert_close(ours, base_inv / factor)
        if variant == "ntk":  # base' = base * (s*L/C - (s-1))^(d/(d-2)) at L = s*C
            theta = 10000.0 * (factor * L / 128 - (factor - 1)) ** (d / (d - 2))
            want = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)
            torch.testing.assert_close(model.model.rotary_emb.inv_freq, want)
        if variant == "yarn":
            assert model.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(factor) + 1)
            assert ours[0] == base_inv[0] and ours[-1] == pytest.approx(base_inv[-1] / factor)


def test_unknown_variant_and_bad_factor_are_user_errors(debug_checkpoint):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(debug_checkpoint)
    with pytest.raises(SpecError, match="unknown"):
        rope_scaling.variant_config(cfg, "longrope2", 2, 128)
    with pytest.raises(SpecError, match="factor"):
        rope_scaling.variant_config(cfg, "pi", 0.5, 128)
