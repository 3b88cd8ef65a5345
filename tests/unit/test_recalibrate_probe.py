"""The parity probe recalibrate keeps with its last checkpoint: a short slice of the last batch and the
logits the model in training gives it (checked against the consolidated output by probe_parity)."""

import torch
from transformers import LlamaForCausalLM

from drope_ops import debugmodel
from workflows.recalibrate.checkpoint import PROBE_TOKENS, probe_logits
from workflows.recalibrate.loop import Trainee


def test_the_probe_keeps_two_rows_of_probe_tokens_and_their_logits():
    cfg = debugmodel.debug_config()
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).train()
    t = Trainee(engine=model, optimizer=None, sampler=None, rank=0, world=1)
    ids = torch.randint(0, cfg.vocab_size, (3, PROBE_TOKENS + 44))
    probe = probe_logits(t, ids)
    assert torch.equal(probe["input_ids"], ids[:2, :PROBE_TOKENS])
    assert probe["logits"].shape == (2, PROBE_TOKENS, cfg.vocab_size) and probe["logits"].dtype == torch.float32
    assert model.training  # handed back in training mode
    with torch.no_grad():
        torch.testing.assert_close(probe["logits"], model.eval()(input_ids=ids[:2]).logits[:, :PROBE_TOKENS])
