"""A named tiny Llama ("debugmodel", after torchtitan) with a byte-level tokenizer, made on the fly.

Used by every test and by the `debug` preset: a real Hugging Face checkpoint directory (config.json,
safetensors, tokenizer.json) small enough to train in seconds on CPU. Nothing is committed to disk
in the repository: it is generated, deterministically from a seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

BYTE_VOCAB = 256
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def byte_level_tokenizer():
    """A PreTrainedTokenizerFast mapping each UTF-8 byte to one token (ids 0..255) plus specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_to_unicode = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_to_unicode)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def bpe_tokenizer(texts, vocab_size: int = 2048):
    """A byte-level BPE of `vocab_size` trained on `texts`, every digit its own token (numbers are
    copied digit by digit, as NIAH answers need); specials as byte_level_tokenizer's. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")


def _byte_of(ch: str) -> int:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def debug_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=BYTE_VOCAB + len(SPECIAL_TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=BYTE_VOCAB,
        eos_token_id=BYTE_VOCAB,
        pad_token_id=BYTE_VOCAB + 1,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def make_debug_checkpoint(
    path: str | Path, *, seed: int = 0, max_shard_size: str | None = None, tokenizer=None, **config_overrides
) -> Path:
    """Write a random-weight tiny Llama checkpoint (safetensors + tokenizer) to `path`: the byte-level
    tokenizer by default, or `tokenizer` (e.g. a bpe_tokenizer), whose size and special ids it takes."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    if tokenizer is None:
        tokenizer = byte_level_tokenizer()  # debug_config's defaults already match it
    elif "vocab_size" not in config_overrides:
        config_overrides = dict(config_overrides, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(debug_config(**config_overrides))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path
