"""Needle documents mixed into training text, so a small model can learn retrieval at its training length.

The micro reproduction (preset `micro-repro`) pretrains a tiny RoPE model from scratch: Shakespeare alone
teaches it no key/value retrieval, so NIAH would score 0 for every variant at every length and show
nothing. Distinct RULER NIAH prompts of exactly seq_len tokens with their answer appended are added to
the training blocks (the evaluation's own generator, with a disjoint seed), so retrieval is learnable
at 1x; evaluation then asks whether it survives 2x and 4x.

    blocks = add_needles(blocks, tokenizer, seq_len, count=8000, task="niah_single_1", seed=0)
    blocks = add_copies(blocks, tokenizer, seq_len, count=4000, seed=0)
    input_ids, labels = inputs_and_labels(blocks[:8])     # what the training loop feeds the model

Copy documents (a span of random tokens, a newline, the same span) teach the induction head that
retrieval is built on: a small model learns content-based copying only when the loss scores the
repeat alone, so the unpredictable first half (and the EOS padding of needle and copy blocks) carries
no loss. Blocks stay one int64 tensor: an entry ~t (= -t - 1, negative) is token t with no loss;
`inputs_and_labels` turns a batch into (input_ids, labels with -100 there). Measured on this box in
benchmarks/retrieval_probe.py (README, micro reproduction).
"""

from __future__ import annotations

import random

import torch

IGNORE_INDEX = -100  # transformers' label for "no loss here"

# Seeds of training needles live far from the evaluation's (which start at the eval seed, usually 0).
TRAIN_SEED_OFFSET = 1_000_003
ANSWER_BUDGET = 16  # tokens reserved after the prompt for " <answer>." + EOS


def needle_block(tokenizer, seq_len: int, *, task: str, index: int, seed: int) -> torch.Tensor:
    """One NIAH prompt + its answer + EOS, padded with EOS to exactly seq_len tokens: (seq_len,)."""
    from drope_ops.evals.niah import load_essay_sentences, make_sample

    rng = random.Random(f"{seed}/{index}")
    essay = None
    if "single_1" not in task:  # every other task reads an essay haystack
        from drope_ops import assets

        essay = load_essay_sentences(assets.shakespeare_texts())
    sample = make_sample(task, tokenizer, length=seq_len, depth=rng.randint(0, 100), index=index,
                         seed=seed + TRAIN_SEED_OFFSET, max_new_tokens=ANSWER_BUDGET, essay_sentences=essay)
    answer = tokenizer(" " + ", ".join(sample.answers) + ".", add_special_tokens=False)["input_ids"]
    ids = (sample.prompt_ids + answer + [tokenizer.eos_token_id])[:seq_len]
    pad = seq_len - len(ids)
    return torch.tensor(ids + [~tokenizer.eos_token_id] * pad, dtype=torch.long)  # padding carries no loss


def add_needles(blocks: torch.Tensor, tokenizer, seq_len: int, *, count: int, task: str, seed: int) -> torch.Tensor:
    """blocks (N, seq_len) followed by `count` distinct needle blocks: (N + count, seq_len).

    Distinct needles (fresh keys, values, depths) rather than a replaced fraction: a model that saw
    the same few needles every epoch would memorise answers instead of learning to retrieve them.
    The training sampler shuffles the whole set each epoch."""
    if count <= 0:
        return blocks
    needles = torch.stack([needle_block(tokenizer, seq_len, task=task, index=i, seed=seed) for i in range(count)])
    return torch.cat([blocks, needles])


def copy_block(tokenizer, seq_len: int, rng: random.Random, max_span: int = 0) -> torch.Tensor:
    """A span of 8..max_span random vocabulary tokens, a newline, the same span, a newline; EOS-padded
    to seq_len. Only the repeat (from its second token) and the newlines after it carry loss: (seq_len,)."""
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    longest = min(max_span or seq_len, (seq_len - 2 * len(newline)) // 2)
    if longest < 8:
        raise ValueError(f"seq_len={seq_len} is too short for copy documents (spans of at least 8 tokens)")
    n = rng.randint(8, longest)
    span = []
    while len(span) < n:
        t = rng.randrange(len(tokenizer))
        if t not in special:
            span.append(t)
    free = [~t for t in span + newline] + [~span[0]]  # the first copied token is not predictable either
    ids = free + span[1:] + newline + [~tokenizer.eos_token_id] * (seq_len - 2 * (n + len(newline)))
    return torch.tensor(ids, dtype=torch.long)


def add_copies(blocks: torch.Tensor | None, tokenizer, seq_len: int, *, count: int, seed: int,
               max_span: int = 0) -> torch.Tensor:
    """blocks (N, seq_len) followed by `count` copy documents (see copy_block); blocks may be None."""
    rng = random.Random(f"copies/{seed}/{seq_len}")
    copies = torch.stack([copy_block(tokenizer, seq_len, rng, max_span) for _ in range(count)])
    return copies if blocks is None else torch.cat([blocks, copies])


def inputs_and_labels(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of a batch of blocks: an entry ~t is token t whose label is IGNORE_INDEX."""
    free = batch < 0
    if not bool(free.any()):
        return batch, batch
    ids = torch.where(free, ~batch, batch)
    return ids, torch.where(free, torch.full_like(batch, IGNORE_INDEX), batch)
