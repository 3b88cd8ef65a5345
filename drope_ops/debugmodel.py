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


def make_debug_release(path: str | Path, *, attention_type: str = "qk_norm_nope", softmax_scale: float | None = 0.3,
                       seed: int = 0, **config_overrides) -> Path:
    """Write the debugmodel in the official DroPE release layout (drope_ops.sakana): config model_type
    llama_drope with attention_type / softmax_scale, and for the *_norm_nope types full-width
    self_attn.q_norm / k_norm weights near 1 (1 + 0.1 * N(0, 1): a parity check sees them), as their
    model saves them. For tests and the `sakana-debug-eval` preset: what `drope fetch` imports."""
    import json

    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = debug_config(**config_overrides)
    tensors = {k: v.contiguous() for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    head_dim = config.hidden_size // config.num_attention_heads
    if attention_type != "nope":
        for i in range(config.num_hidden_layers):
            for name, heads in (("q_norm", config.num_attention_heads), ("k_norm", config.num_key_value_heads)):
                tensors[f"model.layers.{i}.self_attn.{name}.weight"] = 1 + 0.1 * torch.randn(heads * head_dim)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    raw = {**config.to_dict(), "model_type": "llama_drope", "architectures": ["DroPELlamaForCausalLM"],
           "attention_type": attention_type, "head_dim": head_dim,
           "auto_map": {"AutoConfig": "drope.DroPELlamaConfig", "AutoModelForCausalLM": "drope.DroPELlamaForCausalLM"}}
    if softmax_scale is not None:
        raw["softmax_scale"] = softmax_scale
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    byte_level_tokenizer().save_pretrained(path)
    return path
