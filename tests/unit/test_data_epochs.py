"""drope_ops.data: a schedule longer than the data: new epochs (reshuffled, resumable) or a refusal."""

import json

import pytest
import torch

from drope_ops.data import (BlockSampler, DataConfig, StreamingBlockSampler, check_token_budget, iter_documents,
                            load_blocks, token_budget)
from drope_ops.debugmodel import byte_level_tokenizer
from drope_ops.errors import SpecError

SEQ = 16  # documents of SEQ - 1 bytes: with EOS, one document is exactly one block (byte-level tokenizer)


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


@pytest.fixture
def one_block_docs(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i:02d}".ljust(SEQ - 1, ".")}) + "\n" for i in range(24)))
    return DataConfig(source=str(path), streaming=True, heldout_fraction=0.2)


def _firsts(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0] // 4).tolist()  # block i of torch.arange(N * 4).view(N, 4) starts with 4 * i


def _docs(batch: torch.Tensor) -> list[str]:
    return [bytes(row[:-1].tolist()).decode() for row in batch]


# ---------------------------------------------------------------- in-memory blocks

def test_new_epoch_is_reshuffled_and_covers_the_same_blocks():
    blocks = torch.arange(12 * 4).view(12, 4)
    sampler = BlockSampler(blocks, global_batch=4, seed=5)
    assert sampler.epoch == 0
    first = sum((_firsts(sampler.next_batch()) for _ in range(3)), [])
    assert sampler.epoch == 0  # 12 blocks handed out: still the first pass
    second = _firsts(sampler.next_batch())
    assert sampler.epoch == 1
    second += sum((_firsts(sampler.next_batch()) for _ in range(2)), [])
    assert sorted(first) == sorted(second) == list(range(12))
    assert first != second  # a new order, not the same pass again
    other_seed = BlockSampler(blocks, global_batch=12, seed=6)
    other_seed.next_batch()
    assert _firsts(other_seed.next_batch()) != second  # epoch 1's order comes from data.seed too
    # a step straddling the boundary: 10 blocks, batches of 4 -> positions 8..11 = 2 old + 2 new blocks
    straddle = BlockSampler(torch.arange(10 * 4).view(10, 4), global_batch=4, seed=5)
    seen = sum((_firsts(straddle.next_batch()) for _ in range(5)), [])
    assert straddle.epoch == 1 and sorted(seen[:10]) == sorted(seen[10:]) == list(range(10))


@pytest.mark.parametrize("steps_before_save", [3, 4])  # 12 blocks / 4: at the boundary, and mid epoch 1
def test_resume_is_exact_at_and_across_the_epoch_boundary(steps_before_save):
    blocks = torch.arange(12 * 4).view(12, 4)
    for rank in range(2):
        straight = BlockSampler(blocks, global_batch=4, rank=rank, world=2, seed=3)
        for _ in range(steps_before_save):
            straight.next_batch()
        state = json.loads(json.dumps(straight.state_dict()))
        resumed = BlockSampler(blocks, global_batch=4, rank=rank, world=2, seed=3)
        resumed.load_state_dict(state)
        assert resumed.epoch == straight.epoch == (steps_before_save - 1) // 3
        for _ in range(7):  # through epoch 1 into epoch 2
            assert torch.equal(straight.next_batch(), resumed.next_batch())
        assert resumed.epoch == straight.epoch >= 2


def test_max_epochs_stops_the_sampler_at_the_last_allowed_block():
    blocks = torch.arange(10 * 4).view(10, 4)
    once = BlockSampler(blocks, global_batch=4, max_epochs=1, source="tiny.txt")
    once.next_batch(), once.next_batch()
    with pytest.raises(SpecError, match=r"data.source='tiny.txt' ran out after 8 of its 1 x 10 blocks .*"
                                        r"data.max_epochs=1 forbids another pass"):
        once.next_batch()
    twice = BlockSampler(blocks, global_batch=4, max_epochs=2)
    seen = sum((_firsts(twice.next_batch()) for _ in range(5)), [])
    assert sorted(seen) == sorted(list(range(10)) * 2)
    with pytest.raises(SpecError, match="max_epochs=2"):
        twice.next_batch()


def test_max_epochs_field_is_validated():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(SpecError, match=r"data.max_epochs=.* must be an integer >= 1 .* or null"):
            DataConfig(max_epochs=bad)
    assert DataConfig(max_epochs=1).max_epochs == 1 and DataConfig().max_epochs is None


# ---------------------------------------------------------------- the token budget, before anything runs

def test_token_budget_refuses_a_too_small_source_with_the_numbers():
    ten = DataConfig(source="hf://HuggingFaceFW/fineweb-edu:sample-10BT", max_epochs=1)
    with pytest.raises(SpecError) as err:
        check_token_budget(ten, steps=28610, global_batch=512, seq_len=2048)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("data.source hf://HuggingFaceFW/fineweb-edu:sample-10BT holds ~10.0B tokens")
    assert "recalibrate needs 30.0B (steps x global_batch x seq_len = 28610 x 512 x 2048)" in msg
    assert "raise data.max_epochs to 4 (or null) or name a larger source" in msg  # 30B / 9.8B after held-out
    three = DataConfig(source=ten.source, max_epochs=3)
    with pytest.raises(SpecError, match="more than data.max_epochs=3"):
        check_token_budget(three, steps=28610, global_batch=512, seq_len=2048)
    four = check_token_budget(DataConfig(source=ten.source, max_epochs=4), steps=28610, global_batch=512, seq_len=2048)
    assert four.epochs_needed == 4 and 3.0 < four.epochs < 3.1
    unlimited = check_token_budget(DataConfig(source=ten.source), steps=28610, global_batch=512, seq_len=2048)
    assert unlimited.refusal() is None and unlimited.needed == 28610 * 512 * 2048
    hundred = DataConfig(source="hf://HuggingFaceFW/fineweb-edu:sample-100BT", max_epochs=1)
    assert check_token_budget(hundred, steps=28610, global_batch=512, seq_len=2048).epochs < 0.35
    unknown = check_token_budget(DataConfig(source="hf://someone/else", max_epochs=1), steps=10**6,
                                 global_batch=512, seq_len=2048)
    assert unknown.available is None and "size unknown" in unknown.line()  # the sampler enforces it at run time


def test_local_estimate_and_known_tokens_agree_with_the_sampler(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i:03d} " * 30, "id": i}) + "\n" for i in range(50)))
    cfg = DataConfig(source=str(path), max_epochs=1)
    blocks = load_blocks(cfg, tok, SEQ)
    estimate = token_budget(cfg, steps=1, global_batch=1, seq_len=SEQ, tokenizer=tok)
    assert abs(estimate.available - blocks.numel()) / blocks.numel() < 0.1, (estimate.available, blocks.numel())
    assert "estimated from" in estimate.line()
    # with the exact count, the start-time check and the sampler's own limit agree step for step
    fits = len(blocks) // 4
    check_token_budget(cfg, steps=fits, global_batch=4, seq_len=SEQ, known_tokens=blocks.numel())
    with pytest.raises(SpecError, match=f"needs .* = {fits + 1} x 4 x {SEQ}"):
        check_token_budget(cfg, steps=fits + 1, global_batch=4, seq_len=SEQ, known_tokens=blocks.numel())
    sampler = BlockSampler(blocks, global_batch=4, max_epochs=1, source=cfg.source)
    for _ in range(fits):
        sampler.next_batch()
    with pytest.raises(SpecError, match="ran out"):
        sampler.next_batch()


def test_paper_presets_hold_their_token_budgets_in_one_pass():
    from workflows.spec import load_spec

    for name, billions in (("smollm-360m", 30), ("smollm-1.7b", 20), ("llama-2-7b", 20)):
        spec = load_spec(name)
        r, seq = spec.recalibrate, spec.data.seq_len or spec.model.original_context
        budget = check_token_budget(spec.data, steps=r.steps, global_batch=r.global_batch, seq_len=seq)
        assert round(budget.needed / 1e9) == billions and budget.epochs <= 1.0, (name, budget.line())


def test_plan_prints_the_budget_and_warns_of_a_refusal():
    from workflows.plan import describe
    from workflows.spec import load_spec

    assert "~98.0B to train on" in describe(load_spec("smollm-360m"))
    text = describe(load_spec("smollm-360m", ["data.source=hf://HuggingFaceFW/fineweb-edu:sample-10BT"]))
    assert "3.06 epochs" in text
    assert "WARNING: data.source hf://HuggingFaceFW/fineweb-edu:sample-10BT holds ~10.0B tokens" in text
    assert "raise data.max_epochs to 4" in text


# ---------------------------------------------------------------- streamed sources

def test_streaming_new_epoch_is_reshuffled_and_covers_the_same_documents(one_block_docs, tok):
    train = list(iter_documents(one_block_docs, "train"))
    n = len(train)
    assert 10 < n < 24
    sampler = StreamingBlockSampler(one_block_docs, tok, SEQ, global_batch=1)
    first = sum((_docs(sampler.next_batch()) for _ in range(n)), [])
    assert first == train and sampler.epoch == 0  # epoch 0: source order
    second = sum((_docs(sampler.next_batch()) for _ in range(n)), [])
    assert sampler.epoch == 1
    assert sorted(second) == sorted(train) and second != train
    third = sum((_docs(sampler.next_batch()) for _ in range(n)), [])
    assert sampler.epoch == 2 and sorted(third) == sorted(train) and third != second  # a new seed per epoch


@pytest.mark.parametrize("window", [3, 1024])  # several windows per pass, and one
@pytest.mark.parametrize("saved_after", ["boundary", "mid_epoch_1"])
def test_streaming_resume_is_exact_at_and_across_the_epoch_boundary(one_block_docs, tok, window, saved_after):
    for rank in range(2):
        straight = StreamingBlockSampler(one_block_docs, tok, SEQ, global_batch=2, rank=rank, world=2, window=window)
        calls = 0
        while straight.epoch == 0:
            straight.next_batch()
            calls += 1
        shard = calls - 1  # this rank's training documents (one a step); the last call began epoch 1
        # a fresh copy saved exactly at the boundary, or a few documents into epoch 1
        stop = shard if saved_after == "boundary" else shard + 3
        straight = StreamingBlockSampler(one_block_docs, tok, SEQ, global_batch=2, rank=rank, world=2, window=window)
        for _ in range(stop):
            straight.next_batch()
        state = json.loads(json.dumps(straight.state_dict()))
        resumed = StreamingBlockSampler(one_block_docs, tok, SEQ, global_batch=2, rank=rank, world=2, window=window)
        resumed.load_state_dict(state)
        assert resumed.epoch == straight.epoch == (0 if saved_after == "boundary" else 1)
        for _ in range(2 * shard):  # to the end of epoch 1 and into epoch 2
            assert torch.equal(straight.next_batch(), resumed.next_batch())
            assert straight.epoch == resumed.epoch
        assert resumed.epoch >= 2


def test_streaming_max_epochs_and_old_checkpoints(one_block_docs, tok):
    from datasets.distributed import split_dataset_by_node

    from drope_ops.data import _open_stream

    n = len(list(iter_documents(one_block_docs, "train")))
    cfg = DataConfig(**{**one_block_docs.__dict__, "max_epochs": 2})
    sampler = StreamingBlockSampler(cfg, tok, SEQ, global_batch=1)
    for _ in range(2 * n):
        sampler.next_batch()
    with pytest.raises(SpecError, match=r"ran out on rank 0 after 2 pass\(es\), .*data.max_epochs=2 forbids"):
        sampler.next_batch()
    # a state saved before epochs existed (the stream's own position) resumes in epoch 0
    stream = split_dataset_by_node(_open_stream(one_block_docs), rank=0, world_size=1)
    rows = iter(stream)
    for _ in range(5):
        next(rows)
    old = {"position": 3, "stream": stream.state_dict(), "buffer": [], "world": 1, "rank": 0, "global_batch": 1}
    resumed = StreamingBlockSampler(one_block_docs, tok, SEQ, global_batch=1)
    resumed.load_state_dict(json.loads(json.dumps(old)))
    later = [t for t in (json.loads(line)["text"] for line in open(one_block_docs.source).read().splitlines()[5:])
             if t in set(iter_documents(one_block_docs, "train"))]
    assert _docs(resumed.next_batch()) == later[:1] and resumed.epoch == 0
