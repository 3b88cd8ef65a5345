"""Temperature fitting: the bounded search lands on a brute-force optimum in <= 12 evaluations, and c
is recovered exactly from betas that follow 1 + c ln s."""

import math

import numpy as np
import pytest
import torch

from drope_ops import debugmodel
from drope_ops.errors import SpecError
from drope_ops.modeling import DropeConfig, DropeForCausalLM
from drope_ops.temperature import beta_of, fit_beta, fit_c, fit_length, fit_lengths, loss_at_scale, prefix_losses

TEACHER_BETA = 1.3


@pytest.fixture(scope="module")
def model_and_data():
    """A tiny DroPE model (sharp random attention) and 8 sequences of 256 tokens (s = 2 at C = 128)
    sampled from the same model run at logit scale 1.3: the held-out loss is lowest near 1.3."""
    base = debugmodel.debug_config(initializer_range=0.3).to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        base.pop(k, None)
    torch.manual_seed(0)
    cfg = DropeConfig(**base, original_max_position_embeddings=128, logit_scale=TEACHER_BETA)
    cfg._attn_implementation = "sdpa"
    model = DropeForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        seqs = [torch.full((8, 1), 256)]
        out = model(input_ids=seqs[0], use_cache=True)
        for _ in range(255):
            nxt = torch.multinomial(out.logits[:, -1].float().softmax(-1), 1, generator=gen)
            seqs.append(nxt)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    model.config.logit_scale = 1.0  # the student starts from the checkpoint's neutral scale
    return model, torch.cat(seqs, 1)


def test_fit_lands_on_the_grid_optimum_within_12_evaluations(model_and_data):
    model, data = model_and_data
    grid = np.linspace(1.2, 1.4, 41)  # step 0.005
    losses = [loss_at_scale(model, data, b) for b in grid]
    best = float(grid[int(np.argmin(losses))])
    assert 1.2 < best < 1.4, "the brute-force optimum must be inside the grid for the test to mean anything"
    fit = fit_length(model, data, bounds=(1.2, 1.4), max_evals=12)
    assert len(fit.evals) <= 12
    assert abs(fit.beta - best) <= 0.005
    wide = fit_length(model, data, bounds=(0.5, 3.0), max_evals=12)  # the production default bounds
    assert len(wide.evals) <= 12
    assert abs(wide.beta - best) <= 0.005
    assert model.config.logit_scale == 1.0 and model.config.logit_scale_c is None  # restored


def _counting_forwards(model) -> list[int]:
    """Lengths of the decoder's forwards (one per row), recorded by a hook on the DroPE model's decoder."""
    lengths = []
    model.model.register_forward_hook(lambda mod, args, kwargs, out: lengths.append(kwargs["input_ids"].shape[-1]),
                                      with_kwargs=True)
    return lengths


def test_prefix_losses_equal_each_prefix_alone_from_one_forward(model_and_data):
    model, data = model_and_data
    rows = data[:2]  # (2, 256)
    forwards = _counting_forwards(model)
    got = prefix_losses(model, rows, 1.25, [100, 128, 256])
    assert forwards == [256, 256]  # one forward a row for the three lengths
    for L in (100, 128, 256):
        assert got[L] == pytest.approx(loss_at_scale(model, rows[:, :L], 1.25), rel=1e-5), L
    assert got[100] != pytest.approx(got[256], rel=1e-3)  # the prefixes are really scored apart
    with pytest.raises(ValueError, match="1..256"):
        prefix_losses(model, rows, 1.0, [300])


def test_shorter_lengths_reuse_the_longer_lengths_forwards(model_and_data):
    model, data = model_and_data
    rows = data[:2]
    alone = {L: fit_length(model, rows[:, :L], bounds=(0.5, 3.0), max_evals=5) for L in (128, 256)}
    forwards = _counting_forwards(model)
    fits = fit_lengths(model, rows, [128, 256], bounds=(0.5, 3.0), max_evals=5)
    for L in (128, 256):  # each length's search is its own: the same betas asked, the same losses (to the
        # summation order: 256's sum now stops at 128 on its way, which moves Brent's parabolic steps ~1e-7)
        assert [b for b, _ in fits[L].evals] == pytest.approx([b for b, _ in alone[L].evals], abs=1e-5), L
        assert [x for _, x in fits[L].evals] == pytest.approx([x for _, x in alone[L].evals], rel=1e-5), L
        assert fits[L].beta == pytest.approx(alone[L].beta, abs=1e-5)  # one of the evals above, held as they are
    # Brent's first two points come from the bounds alone: the 128 search gets them from 256's forwards
    assert fits[256].shared == 0 and fits[128].shared >= 2
    n_256, n_128 = len(fits[256].evals), len(fits[128].evals) - fits[128].shared
    assert forwards == [256] * 2 * n_256 + [128] * 2 * n_128  # 2 rows a forward; longest first


def test_evaluation_budget_is_a_hard_cap():
    calls = []
    fit = fit_beta(lambda b: calls.append(b) or (b - 2.2) ** 2 + 0.01 * math.sin(40 * b), (0.5, 3.0), max_evals=5)
    assert len(calls) == 5 and len(fit.evals) == 5
    assert fit.loss == min(loss for _, loss in fit.evals)


def test_c_recovered_exactly_from_synthetic_betas():
    for c in (0.103, 0.412):
        betas = {s: beta_of(s, c) for s in (2, 4, 8, 16)}
        assert fit_c(betas) == pytest.approx(c, abs=1e-12)
    assert fit_c({1: 1.0, 2: 1.0 + 0.2 * math.log(2)}) == pytest.approx(0.2, abs=1e-12)


def test_bad_inputs_name_the_field():
    with pytest.raises(SpecError, match="bounds"):
        fit_beta(lambda b: b, (2.0, 1.0))
    with pytest.raises(SpecError, match="max_evals"):
        fit_beta(lambda b: b, (0.5, 3.0), max_evals=20)
    with pytest.raises(SpecError, match="above 1"):
        fit_c({1: 1.0})
