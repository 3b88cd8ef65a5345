"""drope_ops.prefetch: a prefetched sampler hands out the same batches, saves the state of the batches
taken (not of those made ahead), resumes exactly, and raises the thread's errors in order."""

import json
import time

import pytest
import torch

from drope_ops.data import BlockSampler, DataConfig, StreamingBlockSampler
from drope_ops.debugmodel import byte_level_tokenizer
from drope_ops.errors import SpecError
from drope_ops.prefetch import Prefetcher

BLOCKS = torch.arange(40 * 4).view(40, 4)  # 40 blocks of 4 tokens; block i starts with 4i


def _sampler(**kw):
    return BlockSampler(BLOCKS, global_batch=8, rank=1, world=2, seed=3, **kw)


def _batches(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetched_sequence_equals_the_plain_one_across_epochs(depth):
    with Prefetcher(_sampler(), depth=depth) as ahead:
        got = _batches(ahead, 12)  # 12 steps of 8 blocks: 2.4 epochs of 40
        epoch = ahead.epoch
    plain = _sampler()
    assert all(torch.equal(a, b) for a, b in zip(got, _batches(plain, 12)))
    assert epoch == plain.epoch == 2


@pytest.mark.parametrize("taken", [0, 3, 5])
def test_saved_state_is_that_of_the_batches_taken_and_resumes_the_same_continuation(taken):
    plain = _sampler()
    expected = _batches(plain, taken + 4)
    ahead = Prefetcher(_sampler(), depth=2)
    _batches(ahead, taken)
    if taken:  # let the thread make batches past those taken
        deadline = time.monotonic() + 10
        while ahead.sampler.position <= taken * 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ahead.sampler.position > taken * 8, "the prefetch thread made no batch ahead"
    state = json.loads(json.dumps(ahead.state_dict()))
    assert state == {**_sampler().state_dict(), **{"position": taken * 8, "epoch": (taken * 8 - 1) // 40 if taken else 0}}
    ahead.close()
    resumed = Prefetcher(_sampler(), depth=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_batches(resumed, 4), expected[taken:]))
    resumed.close()


def test_close_then_next_batch_continues_where_the_taken_batches_end():
    ahead = Prefetcher(_sampler(), depth=2)
    first = _batches(ahead, 2)
    ahead.close()
    rest = _batches(ahead, 3)
    ahead.close()
    assert all(torch.equal(a, b) for a, b in zip(first + rest, _batches(_sampler(), 5)))
    assert not ahead._thread


def test_load_state_dict_while_running_drops_the_prefetched_batches():
    ahead = Prefetcher(_sampler(), depth=2)
    _batches(ahead, 4)
    ahead.load_state_dict({**_sampler().state_dict(), "position": 8})
    assert torch.equal(ahead.next_batch(), _batches(_sampler(), 2)[1])
    ahead.close()


def test_the_threads_error_is_raised_by_the_batch_it_would_have_been_and_after():
    ahead = Prefetcher(_sampler(max_epochs=1), depth=2)
    assert len(_batches(ahead, 5)) == 5  # 5 x 8 = the 40 blocks of the one allowed epoch
    for _ in range(2):
        with pytest.raises(SpecError, match="max_epochs"):
            ahead.next_batch()
    ahead.close()


def test_streaming_sampler_prefetched_resumes_exactly(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"document {i:02d} " + "x" * (10 + i)}) + "\n" for i in range(20)))
    cfg = DataConfig(source=str(path), text_field="body", streaming=True, heldout_fraction=0.2)
    tok = byte_level_tokenizer()

    def make():
        return StreamingBlockSampler(cfg, tok, 8, global_batch=4, rank=1, world=2, window=4)

    expected = _batches(make(), 10)  # past the end of the shard: epoch 1 reshuffles in windows
    ahead = Prefetcher(make(), depth=2)
    assert all(torch.equal(a, b) for a, b in zip(_batches(ahead, 6), expected))
    state = json.loads(json.dumps(ahead.state_dict()))
    ahead.close()
    resumed = Prefetcher(make())
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_batches(resumed, 4), expected[6:]))
    resumed.close()


class Stalled:
    """A sampler whose read never returns (until released): a data source that stopped answering."""

    def __init__(self):
        import threading

        self.release = threading.Event()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def next_batch(self):
        self.release.wait()
        return torch.zeros(1)


def test_a_stalled_source_fails_the_step_within_its_bound_naming_the_source(monkeypatch):
    import drope_ops.prefetch as prefetch

    monkeypatch.setattr(prefetch, "BATCH_WAIT_S", 0.3)
    monkeypatch.setattr(prefetch, "STOP_WAIT_S", 0.3)
    sampler = Stalled()
    p = Prefetcher(sampler)
    with pytest.raises(TimeoutError, match="data.source"):
        p.next_batch()
    with pytest.raises(TimeoutError, match="did not stop"):
        p.close()
    sampler.release.set()  # the read returns: the thread sees stop and ends
