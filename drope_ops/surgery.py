"""drop_rope: the streaming checkpoint transform from a RoPE Llama-family checkpoint to a DroPE one.

    drope drop-rope SRC DST [--qk-norm qk|q|none] [--qk-norm-scope full|head]
                            [--nope-every N | --keep-rope-layers 0,4,8] [--original-context 2048]

What changes (paper Section 5 / C.1): the config becomes model_type "drope" (which layers keep RoPE,
QK-norm kind and scope, logit scale 1.0, the original context C_train, the source's name and sha256),
and every layer gains q_norm / k_norm weights of ones. No existing tensor changes, so the source's
shards are copied byte for byte by the kernel (copy_file_range, as `cp` does) and the norms go into
one new shard, qk-norm.safetensors, that the index lists. The source is read once more, to sha256 it
while the kernel copies (its digests are the copies'), a shard per core through one 8 MiB buffer
each: the surgery's whole working set. DST appears atomically (temporary sibling, then rename) with its
manifest written last.

Neither torch nor transformers is imported: the DroPE config is checked field by field with the
validators transformers' strict configs run (drope_ops.config_types) before anything is written, and
written as JSON; transformers (seconds of CPU to import) builds DropeConfig from it when a model loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import threading
import typing
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from drope_ops.config_types import config_problem
from drope_ops.errors import CheckpointError
from drope_ops.manifest import build_manifest, manifest_digest, read_manifest, write_manifest

# drope_ops.modeling's QkNorm / QkNormScope (modeling.py imports nothing from this project, and importing
# it costs seconds of transformers: the CLI and the workflow specs take them from here);
# tests/unit/test_surgery.py checks the two agree.
QkNorm = Literal["none", "qk", "q", "k"]
"""QK-norm after dropping RoPE: none, on q and k (the paper), on q only, or on k only (the official code's
k_norm_nope)."""
QkNormScope = Literal["full", "head"]
"""full: RMSNorm over num_heads*head_dim (the paper); head: per-head RMSNorm (Qwen3)."""
QK_NORM_CHOICES = typing.get_args(QkNorm)
QK_NORM_SCOPES = typing.get_args(QkNormScope)

# model_type -> q/k/v carry a bias (Qwen2); every type here is pre-norm Llama layout with RoPE.
ROPE_LLAMA_TYPES = {"llama": False, "qwen2": True}
NO_ROPE_TYPES = ("gpt2", "gpt_neo", "gptj", "opt", "bloom", "mpt", "falcon", "bert", "gpt_bigcode")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                   "merges.txt", "generation_config.json", "chat_template*")
INDEX_NAME = "model.safetensors.index.json"
# Config keys of Qwen2 / GGUF loading that mean nothing to a DroPE model.
_DROPPED_KEYS = ("architectures", "auto_map", "quantization_config", "use_sliding_window",
                 "sliding_window", "max_window_layers", "layer_types", "_name_or_path")


def rope_llama_problem(config: dict) -> str | None:
    """Why a config.json dict is not a RoPE Llama-family model DroPE can start from (None = it is)."""
    model_type = config.get("model_type")
    if model_type == "drope":
        return (f"already a DroPE checkpoint (rope_layers={config.get('rope_layers')}): there is no "
                f"RoPE left to drop; start from the original RoPE checkpoint")
    if model_type in NO_ROPE_TYPES or "n_positions" in config:
        return (f"model_type {model_type!r} uses absolute position embeddings, not RoPE: there is no "
                f"RoPE to drop; DroPE applies to Llama-family RoPE models ({', '.join(ROPE_LLAMA_TYPES)})")
    if model_type not in ROPE_LLAMA_TYPES:
        return (f"model_type {model_type!r} is not a supported Llama-family RoPE model; supported: "
                f"{', '.join(ROPE_LLAMA_TYPES)}")
    if config.get("mlp_bias") or config.get("pretraining_tp", 1) != 1:
        return "mlp_bias / pretraining_tp != 1 are not supported by the DroPE model; use a plain Llama checkpoint"
    return None


def is_rope_llama(config: dict) -> bool:
    """True when a config.json dict describes a RoPE Llama-family model (llama, qwen2)."""
    return rope_llama_problem(config) is None


def read_config(src: str | os.PathLike) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing config.json; a Hugging Face checkpoint directory needs one")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix or re-download it")


def weight_files(src: str | os.PathLike) -> tuple[list[Path], dict | None]:
    """The checkpoint's safetensors files (in order) and its index (None for a single file).

    Raises:
        CheckpointError: no weights, or only pickle weights (never loaded: they can run code).
    """
    src = Path(src)
    index_path = src / INDEX_NAME
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        names = sorted(set(index["weight_map"].values()))
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise CheckpointError(f"{src}: {INDEX_NAME} names {missing[0]} which is missing; re-download the checkpoint")
        return [src / n for n in names], index
    files = sorted(src.glob("*.safetensors"))
    if len(files) == 1:
        return files, None
    if len(files) > 1:
        raise CheckpointError(f"{src}: {len(files)} safetensors files but no {INDEX_NAME}; add the index")
    pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{src}: only pickle weights ({pickles[0]}); pickles can run code and are refused: "
                              f"convert to safetensors first (save_pretrained(..., safe_serialization=True))")
    raise CheckpointError(f"{src}: no *.safetensors weights found; point SRC at a checkpoint directory")


def rope_scaling(config: dict) -> dict | None:
    """The config's RoPE scaling (rope_parameters / rope_scaling with a rope_type other than default),
    or None for plain RoPE."""
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) == "default":
        return None
    return dict(rope)


def pretraining_context(config: dict, scaling: dict | None) -> int | None:
    """C_train: the context before any RoPE scaling (original_max_position_embeddings), else
    max_position_embeddings when the config is plain RoPE. Raises for a scaled config that does not say."""
    if scaling is None:
        return config.get("original_max_position_embeddings") or config.get("max_position_embeddings")
    context = scaling.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    if not context:
        kind = scaling.get("rope_type", scaling.get("type"))
        raise CheckpointError(f"config.json: RoPE scaling {kind!r} (factor {scaling.get('factor')}) without "
                              f"original_max_position_embeddings: the pretraining context is unknown; pass "
                              f"--original-context (model.original_context) with it")
    return int(context)


def layers_keeping_rope(num_layers: int, rope_layers=None, nope_every=None) -> list[int]:
    """Indices of layers that keep RoPE: explicit, SmolLM3-style (every Nth layer NoPE), or none."""
    if rope_layers is not None and nope_every is not None:
        raise CheckpointError("give either rope_layers (--keep-rope-layers) or nope_every (--nope-every), not both")
    if nope_every is not None:
        if int(nope_every) < 1:
            raise CheckpointError(f"nope_every={nope_every}: must be >= 1 (1 = every layer NoPE)")
        return [i for i in range(num_layers) if (i + 1) % int(nope_every) != 0]
    layers = sorted({int(i) for i in (rope_layers or [])})
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise CheckpointError(f"rope_layers: layer {bad[0]} out of range; the model has layers 0..{num_layers - 1}")
    return layers


def drope_config_fields(src_config: dict, *, qk_norm: str, qk_norm_scope: str, rope_layers: list[int],
                        original_context: int | None, source_model: str, source_sha256: str) -> dict:
    """The DroPE config's fields for a RoPE Llama-family config dict (checked here without transformers)."""
    if qk_norm not in QK_NORM_CHOICES:
        raise CheckpointError(f"qk_norm={qk_norm!r}: choose one of {', '.join(QK_NORM_CHOICES)}")
    if qk_norm_scope not in QK_NORM_SCOPES:
        raise CheckpointError(f"qk_norm_scope={qk_norm_scope!r}: choose one of {', '.join(QK_NORM_SCOPES)}")
    fields = {k: v for k, v in src_config.items() if k not in _DROPPED_KEYS and k != "model_type"}
    if original_context is not None and not int(original_context) >= 1:
        raise CheckpointError(f"original_context={original_context}: C_train must be >= 1 tokens (e.g. 2048), "
                              f"or leave it unset for the config's")
    scaling = rope_scaling(src_config)
    context = original_context or pretraining_context(src_config, scaling)
    if not context or int(context) < 1:
        raise CheckpointError("original_context: the source config has no max_position_embeddings; pass --original-context")
    if scaling:  # layers that keep RoPE get the plain RoPE they were pretrained with
        fields.pop("rope_scaling", None)
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": scaling.get(
            "rope_theta", src_config.get("rope_theta", 10000.0))}
    fields.update(
        rope_layers=rope_layers, qk_norm=qk_norm, qk_norm_scope=qk_norm_scope, logit_scale=1.0,
        logit_scale_c=None, original_max_position_embeddings=int(context),
        qkv_bias=ROPE_LLAMA_TYPES[src_config["model_type"]], source_model=source_model,
        source_sha256=source_sha256, architectures=["DropeForCausalLM"], source_rope_parameters=scaling,
    )
    return fields


def check_config(fields: dict) -> None:
    """Refuse fields transformers would refuse when it builds the DroPE config (see config_types)."""
    problem = config_problem(fields)
    if problem:
        raise CheckpointError(f"config.json: cannot make a DroPE config from it ({problem}); fix that field")


def config_json(fields: dict) -> str:
    """config.json of the DroPE checkpoint: the fields as given (transformers fills its defaults on load)."""
    from importlib.metadata import version

    config = {**fields, "model_type": "drope", "transformers_version": version("transformers")}
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


# --- safetensors at the byte level: 8-byte little-endian header size N, N bytes of JSON header
# {name: {dtype, shape, data_offsets: [begin, end]}} padded to 8 bytes, then the data block.
_ONE = {"F64": struct.pack("<d", 1.0), "F32": struct.pack("<f", 1.0), "F16": b"\x00\x3c", "BF16": b"\x80\x3f"}
COPY_CHUNK = 8 << 20  # bytes per read; one such buffer per hashing thread is the surgery's working set


@dataclass(frozen=True)
class Ones:
    """A 1-D weight of ones as safetensors stores it: what a fresh RMSNorm starts from."""

    dtype: str  # safetensors dtype name: F64, F32, F16 or BF16
    length: int

    def tobytes(self) -> bytes:
        return _ONE[self.dtype] * self.length


def attention_widths(config: dict) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) of a config.json dict, as LlamaConfig derives them."""
    heads = config["num_attention_heads"]
    return heads, config.get("num_key_value_heads") or heads, config.get("head_dim") or config["hidden_size"] // heads


def norm_weights(config: dict, layer: int, dtype: str) -> dict[str, Ones]:
    """q_norm / k_norm weights of ones for one layer of a DroPE config dict: full width (H*D) or per head (D)."""
    heads, kv_heads, head_dim = attention_widths(config)
    full = config["qk_norm_scope"] == "full"
    prefix = f"model.layers.{layer}.self_attn"
    out = {}
    if config["qk_norm"] in ("qk", "q"):
        out[f"{prefix}.q_norm.weight"] = Ones(dtype, heads * head_dim if full else head_dim)
    if config["qk_norm"] in ("qk", "k"):
        out[f"{prefix}.k_norm.weight"] = Ones(dtype, kv_heads * head_dim if full else head_dim)
    return out


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header dict and where its data block starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        size = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < size < (100 << 20):
            raise CheckpointError(f"{path}: not a safetensors file (bad header); re-download or re-save it")
        try:
            return json.loads(f.read(size)), 8 + size
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header; re-download or re-save it")


def data_length(header: dict) -> int:
    """Bytes of a safetensors file's data block, from its header: where the last tensor ends."""
    return max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)


def float_dtype(name: str, key: str) -> str:
    if name not in _ONE:
        raise CheckpointError(f"{key}: dtype {name} is not a float type; dequantize to F32/F16/BF16 first")
    return name


NORM_SHARD = "qk-norm.safetensors"
"""The one shard a DroPE checkpoint gains: every layer's q_norm / k_norm. The source's shards stay as they are."""
LONE_SHARD = "model-00001-of-00001.safetensors"
"""What a single-file source's model.safetensors is called once an index lists a second shard
(transformers loads a directory's model.safetensors alone when one is there, index or not)."""


def norm_shard_bytes(added: dict[str, Ones]) -> bytes:
    """A whole safetensors file holding the given ones-weights, in order."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in added.items():
        blob = t.tobytes()
        header[name] = {"dtype": t.dtype, "shape": [t.length], "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data block 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def _copy_range(src_fd: int, dst_fd: int, count: int) -> None:
    """Copy count bytes from the start of src_fd in the kernel (copy_file_range, what `cp` uses: no trip
    through user space, a reflink where the filesystem can), else pread/pwrite where it refuses."""
    offset = 0
    try:
        while offset < count:
            n = os.copy_file_range(src_fd, dst_fd, min(count - offset, 1 << 30), offset, offset)
            if n == 0:
                raise CheckpointError(f"source ended early while copying (fd {src_fd}); re-download it")
            offset += n
    except (OSError, AttributeError):  # EXDEV / ENOSYS / EINVAL, or no copy_file_range on this OS
        while offset < count:
            data = os.pread(src_fd, min(count - offset, COPY_CHUNK), offset)
            if not data:
                raise CheckpointError(f"source ended early while copying (fd {src_fd}); re-download it")
            os.pwrite(dst_fd, data, offset)
            offset += len(data)


def copy_shards(files: list[Path], out_dir: Path, names: dict[Path, str] | None = None, *,
                link: bool = False, progress: bool = True, desc: str = "copy") -> dict[str, str]:
    """Copy each shard byte for byte to out_dir (under names[f], default its own name) while reading the
    source once to hash it; returns {output name: sha256}, the source's digests, which are the copies'.

    One thread has the kernel copy the shards in turn (as `cp` does) while a thread per core hashes
    them, both largest first (the two reads of a shard then meet in the page cache), each hashing
    thread reading through its own COPY_CHUNK buffer (file reads and hashlib release the GIL): sha256
    costs more CPU than the kernel's copy and a shard's digest is sequential, so the shards are hashed
    side by side on the cores the copy leaves.
    link=True hard-links a shard instead where out_dir is on the source's filesystem (no bytes written;
    only for a source nothing rewrites in place, such as a stage output) and copies it elsewhere.
    Each shard's size is checked against its header first (a truncated download is refused).
    """
    sizes = {f: _checked_size(f) for f in files}
    outs = {f: out_dir / (names or {}).get(f, f.name) for f in files}
    largest_first = sorted(files, key=sizes.get, reverse=True)  # the copy too: each shard read while cached
    to_copy = [f for f in largest_first if not (link and _hard_link(f, outs[f]))]
    chunk = min(COPY_CHUNK, max(sizes.values()))
    threads = max(1, min(len(files), len(os.sched_getaffinity(0))))
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc=desc, disable=not progress) as bar, \
            ThreadPoolExecutor(1) as copier, ThreadPoolExecutor(threads) as hashers:
        copying = copier.submit(_copy_files, to_copy, outs, sizes)
        lock = threading.Lock()

        def advance(n: int) -> None:
            with lock:
                bar.update(n)

        digests = {f: hashers.submit(_sha256, f, sizes[f], chunk, advance) for f in largest_first}
        hashes = {outs[f].name: digests[f].result() for f in files}
        copying.result()
    return hashes


def _copy_files(files: list[Path], outs: dict[Path, Path], sizes: dict[Path, int]) -> None:
    for f in files:
        with open(f, "rb", buffering=0) as fi, open(outs[f], "wb", buffering=0) as fo:
            _copy_range(fi.fileno(), fo.fileno(), sizes[f])


def _sha256(path: Path, size: int, chunk: int, advance) -> str:
    """sha256 of the file's first size bytes, read through one chunk-sized buffer; advance(n) per chunk."""
    digest, buf = hashlib.sha256(), memoryview(bytearray(chunk))
    with open(path, "rb", buffering=0) as fi:
        for offset in range(0, size, chunk):
            part = _read_into(fi.fileno(), buf[: min(chunk, size - offset)], offset, path)
            digest.update(part)
            advance(len(part))
    return digest.hexdigest()


def _hard_link(src: Path, dst: Path) -> bool:
    try:
        os.link(src, dst)
        return True
    except OSError:  # another filesystem, or links not allowed: copy instead
        return False


def _checked_size(path: Path) -> int:
    """The file's size, refused unless it is exactly its header plus the data block the header describes."""
    header, start = read_header(path)
    size = path.stat().st_size
    if size != start + data_length(header):
        raise CheckpointError(f"{path}: size does not match its header (truncated?); re-download it")
    return size


def _read_into(fd: int, buf: memoryview, offset: int, path: Path) -> memoryview:
    """Fill buf from fd at offset (pread until full)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if not n:
            raise CheckpointError(f"{path}: ended early while hashing; re-download it")
        done += n
    return buf


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike):
    """Yield a temporary sibling of dst; rename it to dst on success, remove it on failure."""
    dst = Path(dst)
    if dst.is_file() or (dst.is_dir() and any(dst.iterdir())):
        raise CheckpointError(f"{dst}: already exists; choose a new destination or remove it first")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.is_dir():
            dst.rmdir()  # empty (checked above)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in TOKENIZER_GLOBS:
        for p in sorted(src.glob(pattern)):
            if p.is_file() and not (dst / p.name).exists():
                shutil.copy2(p, dst / p.name)
                copied.append(p.name)
    return copied


def drop_rope(src, dst, *, qk_norm: str = "qk", qk_norm_scope: str = "full", rope_layers=None,
              nope_every: int | None = None, original_context: int | None = None,
              source_name: str | None = None, link: bool = False, progress: bool = True) -> Path:
    """Write a DroPE checkpoint at dst from the RoPE Llama-family checkpoint at src.

    Args:
        qk_norm: "qk" (paper), "q" (queries only) or "none".
        qk_norm_scope: "full" (RMSNorm over H*D, paper) or "head" (per head, Qwen3).
        rope_layers: layers that keep RoPE (default none: every layer NoPE).
        nope_every: SmolLM3-style alternative: every Nth layer NoPE, the others keep RoPE.
        original_context: C_train recorded in the config (default: the source's max_position_embeddings;
            SmolLM2-135M was pretrained at 2048 before its extension to 8192).
        source_name: provenance name (default: the source config's _name_or_path or directory name).
        link: hard-link the source's shards where dst is on its filesystem instead of copying them: for a
            source nothing rewrites in place (a stage output; a user's directory that save_pretrained may
            overwrite is copied).

    Raises:
        CheckpointError: missing config, not a RoPE Llama model, already DroPE, pickle-only weights,
            layer index out of range, dst exists, or source files that do not match their manifest.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory; SRC must be a Hugging Face checkpoint directory")
    src_config = read_config(src)
    problem = rope_llama_problem(src_config)
    if problem:
        raise CheckpointError(f"{src}: {problem}")
    files, index = weight_files(src)
    layers = layers_keeping_rope(src_config["num_hidden_layers"], rope_layers, nope_every)
    name = source_name or src_config.get("_name_or_path") or src.name
    fields = drope_config_fields(src_config, qk_norm=qk_norm, qk_norm_scope=qk_norm_scope, rope_layers=layers,
                                 original_context=original_context, source_model=str(name), source_sha256="")
    check_config(fields)
    additions = qk_norm_additions(src, files, fields)
    names = {files[0]: LONE_SHARD} if additions and index is None else {}
    with atomic_directory(dst) as tmp:
        hashes = copy_shards(files, tmp, names, link=link, progress=progress, desc=f"drop-rope {src.name}")
        if additions:
            (tmp / NORM_SHARD).write_bytes(norm_shard_bytes(additions))
        if additions or index is not None:
            write_index(tmp, files, index, names, additions)
        src_hashes = {f.name: hashes[names.get(f, f.name)] for f in files}
        fields["source_sha256"] = source_digest(src, files, src_hashes)
        (tmp / "config.json").write_text(config_json(fields))
        copy_tokenizer_files(src, tmp)
        write_manifest(tmp, hashes)
    return dst


def qk_norm_additions(src: Path, files: list[Path], fields: dict) -> dict[str, Ones]:
    """The QK-norm weights the checkpoint gains (in NORM_SHARD), each in its layer's q_proj dtype."""
    headers = {f: read_header(f)[0] for f in files}
    if any(f.name == NORM_SHARD for f in files):
        raise CheckpointError(f"{src}: already has a {NORM_SHARD}; start from a checkpoint without QK-norm")
    additions: dict[str, Ones] = {}
    for layer in range(fields["num_hidden_layers"]):
        key = f"model.layers.{layer}.self_attn.q_proj.weight"
        header = next((h for h in headers.values() if key in h), None)
        if header is None:
            raise CheckpointError(f"{src}: weights lack {key}; not a Llama-layout checkpoint")
        norms = norm_weights(fields, layer, float_dtype(header[key]["dtype"], key))
        clash = [k for k in norms if any(k in h for h in headers.values())]
        if clash:
            raise CheckpointError(f"{src}: already has {clash[0]}; start from a checkpoint without QK-norm")
        additions.update(norms)
    return additions


def source_digest(src: Path, files: list[Path], src_hashes: dict[str, str]) -> str:
    """The source's manifest digest, checked against the hashes just read (built when it has none)."""
    source_manifest = read_manifest(src)
    if source_manifest is None:
        return manifest_digest(build_manifest(src, src_hashes))
    bad = [f.name for f in files if source_manifest["files"].get(f.name, {}).get("sha256") != src_hashes[f.name]]
    if bad:
        raise CheckpointError(f"{src / bad[0]}: does not match the source's drope-manifest.json; "
                              f"the source is corrupt or changed: fetch it again")
    return manifest_digest(source_manifest)


def write_index(dst: Path, files: list[Path], index: dict | None, names: dict[Path, str],
                added: dict[str, Ones], shard: str = NORM_SHARD) -> None:
    """The safetensors index of the source's shards (renamed per names) and `shard` holding the added norms,
    total_size counting them; a single-file source gets its first index here."""
    if index is None:
        header, _ = read_header(files[0])
        index = {"metadata": {"total_size": data_length(header)},
                 "weight_map": dict.fromkeys((k for k in header if k != "__metadata__"), files[0].name)}
    renamed = {f.name: names.get(f, f.name) for f in files}
    weight_map = {k: renamed[v] for k, v in index["weight_map"].items()}
    weight_map.update(dict.fromkeys(added, shard))
    meta = dict(index.get("metadata") or {})
    meta["total_size"] = int(meta.get("total_size", 0)) + sum(len(t.tobytes()) for t in added.values())
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2))
