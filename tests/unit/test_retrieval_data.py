"""Training data for retrieval (micro reproduction): copy documents and needle blocks score only the
tokens a model can predict, through one int64 block tensor (an entry ~t = token t with no loss)."""

import random

import pytest
import torch

from drope_ops.data import DataConfig, load_blocks
from drope_ops.debugmodel import bpe_tokenizer, byte_level_tokenizer, make_debug_checkpoint
from drope_ops.errors import SpecError
from drope_ops.needle_data import IGNORE_INDEX, add_copies, copy_block, inputs_and_labels, needle_block

NEWLINE = 10


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


def test_copy_document_scores_only_the_repeat(tok):
    ids, labels = inputs_and_labels(copy_block(tok, 64, random.Random(3), max_span=20).view(1, -1))
    ids, labels = ids[0].tolist(), labels[0].tolist()
    n = ids.index(NEWLINE)
    span = ids[:n]
    assert 8 <= n <= 20 and ids[n + 1:2 * n + 2] == span + [NEWLINE]  # span, newline, the same span, newline
    assert all(t not in tok.all_special_ids for t in span)
    assert ids[2 * n + 2:] == [tok.eos_token_id] * (64 - 2 * n - 2)  # EOS padding
    # no loss on the random span, its newline, the first copied token (unpredictable) or the padding
    assert labels[:n + 2] == [IGNORE_INDEX] * (n + 2) and set(labels[2 * n + 2:]) <= {IGNORE_INDEX}
    assert labels[n + 2:2 * n + 2] == span[1:] + [NEWLINE]


def test_needle_block_padding_carries_no_loss(tok):
    block = needle_block(tok, 512, task="niah_single_1", index=0, seed=0)
    ids, labels = inputs_and_labels(block.view(1, -1))
    eos = ids[0].tolist().index(tok.eos_token_id)
    assert labels[0, :eos + 1].tolist() == ids[0, :eos + 1].tolist()  # prompt, answer and the first EOS scored
    assert set(labels[0, eos + 1:].tolist()) <= {IGNORE_INDEX}
    assert set(ids[0, eos + 1:].tolist()) <= {tok.eos_token_id}
    plain = torch.tensor([[5, 6, 7]])
    assert inputs_and_labels(plain) == (plain, plain)  # text blocks: every token scored


def test_copies_join_the_train_split_or_are_it(tok, tmp_path):
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(f"{name}: to be or not to be " * 200)
    text = load_blocks(DataConfig(source=str(tmp_path), heldout_docs=1), tok, 64)
    mixed = load_blocks(DataConfig(source=str(tmp_path), heldout_docs=1, copies=5), tok, 64)
    assert len(mixed) == len(text) + 5 and torch.equal(mixed[:len(text)], text) and bool((mixed[len(text):] < 0).any())
    only = load_blocks(DataConfig(source="copies", copies=7, seed=1), tok, 32)
    assert only.shape == (7, 32) and torch.equal(only, load_blocks(DataConfig(source="copies", copies=7, seed=1), tok, 32))
    assert not torch.equal(only, load_blocks(DataConfig(source="copies", copies=7, seed=2), tok, 32))
    assert torch.equal(add_copies(None, tok, 32, count=7, seed=1), only)
    with pytest.raises(SpecError, match="data.copies"):
        DataConfig(source="copies")
    with pytest.raises(SpecError, match="data.source='copies'"):
        load_blocks(DataConfig(source="copies", copies=3), tok, 32, split="heldout")


def test_bpe_tokenizer_splits_digits_and_sizes_the_model(tmp_path):
    texts = ["the special magic number is 4229316 and the grass is green. " * 50, "O Romeo, Romeo! " * 80]
    bpe = bpe_tokenizer(texts, vocab_size=300)
    assert len(bpe) <= 300 and bpe.decode(bpe("is 4229316")["input_ids"]) == "is 4229316"
    digits = bpe("4229316", add_special_tokens=False)["input_ids"]
    assert len(digits) == 7  # one token per digit: NIAH answers copy digit by digit
    ckpt = make_debug_checkpoint(tmp_path / "ckpt", tokenizer=bpe)
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(ckpt)
    assert cfg.vocab_size == len(bpe) and cfg.eos_token_id == bpe.eos_token_id
    assert AutoTokenizer.from_pretrained(ckpt)("4229316")["input_ids"] == digits


def test_micro_repro_warmup_phase_inherits_the_training_section():
    from workflows.spec import load_spec
    from workflows.stages.pretrain import warmup_configs

    spec = load_spec("micro-repro")
    cfg, data = warmup_configs(spec)
    assert data.source == "copies" and data.copies == spec.pretrain.warmup["copies"] and data.needles == 0
    assert data.seq_len == 128 < spec.data.seq_len and data.max_tokens == spec.data.max_tokens
    assert cfg.steps == spec.pretrain.warmup["steps"] and cfg.num_workers == spec.pretrain.train["num_workers"]
    assert cfg.lr == spec.pretrain.train["lr"] and cfg.global_batch == 32
    assert warmup_configs(load_spec("micro-repro", ["pretrain.warmup={}"])) is None
    with pytest.raises(SpecError, match="pretrain.warmup.copies"):
        warmup_configs(load_spec("micro-repro", ["pretrain.warmup={steps: 3}"]))
    with pytest.raises(SpecError, match="pretrain.warmup.'stepz'"):
        warmup_configs(load_spec("micro-repro", ["pretrain.warmup={stepz: 3, copies: 4}"]))
    with pytest.raises(SpecError, match="pretrain.tokenizer"):
        load_spec("micro-repro", ["pretrain.tokenizer=words"])
