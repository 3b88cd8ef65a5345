"""Next-token loss at any length, and the "crop to C_train" reference (the paper's Figure 5).

    nll, n = sequence_nll(model, blocks)                    # blocks (N, L): full-context loss
    nll, n = cropped_nll(model, blocks, context=2048)       # each token sees at most C_train tokens
    perplexity_vs_length(model, blocks_by_length, ...)      # {L: {"loss": ..., "ppl": ...}}

The lm_head runs over chunks of positions: a (L, vocab) fp32 logits tensor at L = 16k and a 49k
vocab is 3 GB, a chunk of 1024 positions is 200 MB. Attention goes through the model's own backend
(sdpa with is_causal, no L x L mask).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGITS_CHUNK = 1024


def _decoder_and_head(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder, model.get_output_embeddings()


@torch.inference_mode()
def sequence_nll(model, input_ids: torch.Tensor, *, score_from: int = 1) -> tuple[float, int]:
    """Summed next-token NLL over rows of `input_ids` (N, L) and the number of tokens scored.

    Token t (t >= score_from) is scored given tokens [0, t). One row at a time: batch 1 keeps peak
    memory at one sequence's activations.
    """
    decoder, head = _decoder_and_head(model)
    total, count = 0.0, 0
    for row in input_ids.view(-1, input_ids.shape[-1]):
        ids = row.view(1, -1).to(model.device)  # (1, L)
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]  # (L, H)
        targets = ids[0]
        for start in range(max(score_from, 1), ids.shape[1], LOGITS_CHUNK):
            stop = min(start + LOGITS_CHUNK, ids.shape[1])
            logits = head(hidden[start - 1 : stop - 1]).float()  # (chunk, V): predicts tokens start..stop-1
            total += float(F.cross_entropy(logits, targets[start:stop], reduction="sum"))
            count += stop - start
    return total, count


def mean_loss(model, input_ids: torch.Tensor) -> float:
    """Mean next-token loss (nats per token) over all rows."""
    total, count = sequence_nll(model, input_ids)
    return total / count


@torch.inference_mode()
def cropped_nll(model, input_ids: torch.Tensor, context: int, stride: int | None = None) -> tuple[float, int]:
    """NLL when the model only ever sees the last <= `context` tokens (sliding windows, stride C/2).

    Windows [b, b + C) advance by `stride`; each scores only the tokens the previous window did not,
    so every token t >= 1 is scored exactly once, given between C - stride and C - 1 tokens of context
    (fewer at the start, exactly as the full-context evaluation).
    """
    stride = stride or max(1, context // 2)
    total, count = 0.0, 0
    L = input_ids.shape[-1]
    for row in input_ids.view(-1, L):
        scored_until = 1  # token 0 has no prediction
        begin = 0
        while scored_until < L:
            end = min(begin + context, L)
            window = row[begin:end].view(1, -1)
            nll, n = sequence_nll(model, window, score_from=scored_until - begin)
            total, count = total + nll, count + n
            scored_until = end
            begin += stride
    return total, count


def perplexity_point(model, blocks: torch.Tensor, *, crop_to: int | None = None) -> dict:
    """{"loss", "ppl", "tokens"} at the blocks' length, full context or cropped to `crop_to` tokens."""
    if crop_to is not None and crop_to < blocks.shape[-1]:
        nll, n = cropped_nll(model, blocks, crop_to)
    else:
        nll, n = sequence_nll(model, blocks)
    loss = nll / n
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}
