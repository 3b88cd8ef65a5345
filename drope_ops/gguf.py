"""GGUF file -> a normal Hugging Face checkpoint directory (safetensors + tokenizer + manifest).

    drope import-gguf SmolLM2-135M-Instruct.Q4_1.gguf ckpt/smollm2-135m

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=name)`): it dequantizes every tensor
to a dense float model and builds the tokenizer from the GGUF metadata. Such a model still carries a
GGUF quantizer, and save_pretrained refuses it; with the quantizer and the config's
quantization_config removed it is an ordinary dense Llama and saves as safetensors. The result keeps
the GGUF's own max_position_embeddings (8192 for SmolLM2); pass drop_rope(original_context=...) for
the context the model was pretrained at (2048 for SmolLM2).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch

from drope_ops.errors import CheckpointError
from drope_ops.manifest import sha256_file, write_manifest
from drope_ops.surgery import atomic_directory, rope_llama_problem

GGUF_MAGIC = b"GGUF"
log = logging.getLogger(__name__)


def check_gguf_file(gguf_file: str | os.PathLike) -> Path:
    path = Path(gguf_file)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; give the path of a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic bytes); give a .gguf model file")
    return path


@contextlib.contextmanager
def _gguf_without_accelerate():
    """from_pretrained(gguf_file=...) refuses to start without accelerate, yet its GGUF path
    (GgufHfQuantizer, transformers 5.23) never calls it. Installing accelerate would make every
    `import transformers` model load pull in DeepSpeed (+2.6 s per process, and drope_ops must not
    import DeepSpeed), so the guard is lifted for this one call instead."""
    from transformers import modeling_utils

    if modeling_utils.is_accelerate_available():
        yield
        return
    original = modeling_utils.is_accelerate_available
    modeling_utils.is_accelerate_available = lambda: True
    try:
        yield
    finally:
        modeling_utils.is_accelerate_available = original


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF file for the config, again for the weights and again for the
    tokenizer (gguf.GGUFReader: ~6 s each for SmolLM2-135M, most of it its 49k-entry vocabulary), and
    builds gguf's tensor-name map once per module (397 times, ~5 s). Within this block each is built
    once and handed out again: transformers only reads them (fields, tensors, name lookups)."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(reader_class)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def load_gguf(gguf_file: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(dense model, tokenizer) from a GGUF file, ready for save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_gguf_file(gguf_file)
    try:
        with _gguf_parsed_once():
            with _gguf_without_accelerate():
                model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: transformers cannot read this GGUF ({first}); "
                              f"use a GGUF of a Llama-family architecture")
    # save_pretrained refuses quantized models; dequantized weights are plain tensors already.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    return model.eval(), tokenizer


def import_gguf(gguf_file: str | os.PathLike, dst: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                max_shard_size: str = "2GB") -> Path:
    """Write the GGUF model at gguf_file as a safetensors HF checkpoint at dst (atomically).

    The config records the GGUF's file name and sha256 (`gguf_source`) for lineage.

    Raises:
        CheckpointError: missing or non-GGUF file, an architecture transformers cannot read, or dst exists.
    """
    path = check_gguf_file(gguf_file)
    dst = Path(dst)
    if dst.exists() and (dst.is_file() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: already exists; choose a new destination or remove it first")
    model, tokenizer = load_gguf(path, dtype)
    model.config.gguf_source = {"file": path.name, "sha256": sha256_file(path)}
    problem = rope_llama_problem(model.config.to_dict())
    with atomic_directory(dst) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp)
    if problem:  # still a valid checkpoint; say early that drop-rope will refuse it
        log.warning("%s imported, but drop-rope will refuse it: %s", dst, problem)
    return dst
