"""Needle documents mixed into training text, so a small model can learn retrieval at its training length.

The micro reproduction (preset `micro-repro`) pretrains a tiny RoPE model from scratch: Shakespeare alone
teaches it no key/value retrieval, so NIAH would score 0 for every variant at every length and show
nothing. Distinct RULER NIAH prompts of exactly seq_len tokens with their answer appended are added to
the training blocks (the evaluation's own generator, with a disjoint seed), so retrieval is learnable
at 1x; evaluation then asks whether it survives 2x and 4x.

    blocks = add_needles(blocks, tokenizer, seq_len, count=8000, task="niah_single_1", seed=0)
"""

from __future__ import annotations

import random

import torch

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
    ids += [tokenizer.eos_token_id] * (seq_len - len(ids))
    return torch.tensor(ids, dtype=torch.long)


def add_needles(blocks: torch.Tensor, tokenizer, seq_len: int, *, count: int, task: str, seed: int) -> torch.Tensor:
    """blocks (N, seq_len) followed by `count` distinct needle blocks: (N + count, seq_len).

    Distinct needles (fresh keys, values, depths) rather than a replaced fraction: a model that saw
    the same few needles every epoch would memorise answers instead of learning to retrieve them.
    The training sampler shuffles the whole set each epoch."""
    if count <= 0:
        return blocks
    needles = torch.stack([needle_block(tokenizer, seq_len, task=task, index=i, seed=seed) for i in range(count)])
    return torch.cat([blocks, needles])
