"""Next-token loss at any length, and the "crop to C_train" reference (the paper's Figure 5).

    nll, n = sequence_nll(model, blocks)                    # blocks (N, L): full-context loss
    sums = prefix_nll(model, blocks, [L // 2, L])           # {L: (nll, n)}: the first L tokens, one forward
    sums = cropped_nll(model, blocks, context=2048)         # {L: (nll, n)}: each token sees <= C_train tokens
    points = perplexity_points(model, blocks, [2048, 4096, 8192])  # {L: {"loss", "ppl", "tokens"}}

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
def prefix_nll(model, input_ids: torch.Tensor, lengths, *, score_from: int = 1) -> dict[int, tuple[float, int]]:
    """{L: (summed next-token NLL, tokens scored)} over the first L tokens of the rows of `input_ids`
    (N, T), for every L in `lengths` (each <= T), from one forward of each row: the model is causal, so
    the first L tokens' losses do not depend on what follows them.

    Token t (score_from <= t < L) is scored given tokens [0, t). One row at a time: batch 1 keeps peak
    memory at one sequence's activations.
    """
    decoder, head = _decoder_and_head(model)
    T = input_ids.shape[-1]
    cuts = sorted({int(L) for L in lengths})
    if not cuts or not 1 <= cuts[0] <= cuts[-1] <= T:
        raise ValueError(f"prefix lengths {cuts} must lie in 1..{T}, the rows' length")
    sums = {L: [0.0, 0] for L in cuts}
    for row in input_ids.view(-1, T):
        ids = row.view(1, -1).to(model.device)  # (1, T)
        hidden = decoder(input_ids=ids[:, : cuts[-1]], use_cache=False).last_hidden_state[0]  # (L_max, H)
        total, count, start = 0.0, 0, max(score_from, 1)
        for cut in cuts:  # chunks end at every cut: each prefix's sum is the one its own forward gives
            for begin in range(start, cut, LOGITS_CHUNK):
                stop = min(begin + LOGITS_CHUNK, cut)
                logits = head(hidden[begin - 1 : stop - 1]).float()  # (chunk, V): predicts tokens begin..stop-1
                total += float(F.cross_entropy(logits, ids[0, begin:stop], reduction="sum"))
                count += stop - begin
            start = max(start, cut)
            sums[cut][0] += total
            sums[cut][1] += count
    return {L: (total, count) for L, (total, count) in sums.items()}


def sequence_nll(model, input_ids: torch.Tensor, *, score_from: int = 1) -> tuple[float, int]:
    """Summed next-token NLL over rows of `input_ids` (N, L) and the number of tokens scored."""
    L = input_ids.shape[-1]
    return prefix_nll(model, input_ids, [L], score_from=score_from)[L]


def mean_loss(model, input_ids: torch.Tensor) -> float:
    """Mean next-token loss (nats per token) over all rows."""
    total, count = sequence_nll(model, input_ids)
    return total / count


@torch.inference_mode()
def cropped_nll(model, input_ids: torch.Tensor, context: int, stride: int | None = None,
                lengths=None) -> dict[int, tuple[float, int]]:
    """{L: (NLL, tokens)} over the first L tokens of the rows (every L in `lengths`, default the rows'
    length) when the model only ever sees the last <= `context` tokens (sliding windows, stride C/2).

    Windows [b, b + C) advance by `stride`; each scores only the tokens the previous window did not,
    so every token t >= 1 is scored exactly once, given between C - stride and C - 1 tokens of context
    (fewer at the start, exactly as the full-context evaluation). A prefix's windows are the longest
    length's first ones (cut at L), so one pass of windows scores every L.
    """
    stride = stride or max(1, context // 2)
    T = input_ids.shape[-1]
    cuts = sorted({int(L) for L in (lengths or [T])})
    sums = {L: [0.0, 0] for L in cuts}
    for row in input_ids.view(-1, T):
        scored_until = 1  # token 0 has no prediction
        begin = 0
        while scored_until < cuts[-1]:
            end = min(begin + context, cuts[-1])
            open_cuts = [L for L in cuts if L > scored_until]  # the prefixes this window adds tokens to
            part = prefix_nll(model, row[begin:end].view(1, -1), [min(L, end) - begin for L in open_cuts],
                              score_from=scored_until - begin)
            for L in open_cuts:
                nll, n = part[min(L, end) - begin]
                sums[L][0] += nll
                sums[L][1] += n
            scored_until = end
            begin += stride
    return {L: (total, count) for L, (total, count) in sums.items()}


def perplexity_points(model, blocks: torch.Tensor, lengths, *, crop_to: int | None = None) -> dict[int, dict]:
    """{L: {"loss", "ppl", "tokens"}} on the first L tokens of `blocks` for every L in `lengths`: full
    context (one forward a row for all of them), or cropped to `crop_to` tokens (one pass of windows)."""
    if crop_to is not None and crop_to < max(lengths):
        sums = cropped_nll(model, blocks, crop_to, lengths=lengths)
    else:
        sums = prefix_nll(model, blocks, lengths)
    return {L: {"loss": nll / n, "ppl": math.exp(min(nll / n, 50.0)), "tokens": n} for L, (nll, n) in sums.items()}
