"""Model commands: drop-rope, export, import-gguf (thin faces over drope_ops).

    drope import-gguf SmolLM2-135M-Instruct.Q4_1.gguf ckpt/smollm2
    drope drop-rope ckpt/smollm2 ckpt/smollm2-drope --qk-norm qk --original-context 2048
    drope drop-rope ckpt/smollm2 ckpt/smollm2-nope4 --qk-norm none --nope-every 4
    drope export ckpt/smollm2-drope out/smollm2-drope-rc --format remote-code
    drope export ckpt/smollm2-drope out/smollm2-drope-sakana --format sakana
"""

from __future__ import annotations

import argparse

from workflows.commands.parser import Parser


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices, e.g. 0,4,8")


def main_drop_rope(argv: list[str]) -> int:
    from drope_ops.surgery import QK_NORM_CHOICES, QK_NORM_SCOPES, drop_rope  # no torch, no transformers yet

    p = Parser(prog="drope drop-rope", description="Drop RoPE from a Llama-family checkpoint and insert QK-norm.")
    p.add_argument("src", help="Hugging Face checkpoint directory (safetensors, single or sharded)")
    p.add_argument("dst", help="new directory for the DroPE checkpoint (must not exist)")
    p.add_argument("--qk-norm", choices=QK_NORM_CHOICES, default="qk", help="RMSNorm on q and k (paper), q only, or none")
    p.add_argument("--qk-norm-scope", choices=QK_NORM_SCOPES, default="full",
                   help="full: over all heads (paper); head: per head (Qwen3, exports natively)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--nope-every", type=int, metavar="N", help="SmolLM3-style: every Nth layer NoPE, others keep RoPE")
    which.add_argument("--keep-rope-layers", type=_layer_list, metavar="I,J,...", help="layers that keep RoPE")
    p.add_argument("--original-context", type=int, metavar="C",
                   help="context the model was pretrained at (default: config max_position_embeddings)")
    p.add_argument("--link", action="store_true",
                   help="hard-link the source's shards (same filesystem) instead of copying them: only for a "
                        "source nothing rewrites in place")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    out = drop_rope(a.src, a.dst, qk_norm=a.qk_norm, qk_norm_scope=a.qk_norm_scope, rope_layers=a.keep_rope_layers,
                    nope_every=a.nope_every, original_context=a.original_context, link=a.link,
                    progress=not a.no_progress)
    print(out)
    return 0


def main_export(argv: list[str]) -> int:
    p = Parser(prog="drope export", description="Export a DroPE checkpoint natively or with its modeling code.")
    p.add_argument("src", help="DroPE checkpoint directory")
    p.add_argument("dst", help="new directory for the export (must not exist)")
    p.add_argument("--format", choices=("native", "remote-code", "sakana"), default="native",
                   help="native: loads in vanilla transformers; remote-code: auto_map + modeling_drope.py; "
                        "sakana: the official DroPE code's llama_drope / qwen2_drope layout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    from drope_ops.export import export_checkpoint

    print(export_checkpoint(a.src, a.dst, format=a.format, progress=not a.no_progress))
    return 0


def main_import_gguf(argv: list[str]) -> int:
    p = Parser(prog="drope import-gguf", description="Convert a GGUF model file to a safetensors checkpoint.")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("dst", help="new directory for the checkpoint (must not exist)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the saved weights (GGUF tensors are dequantized to it)")
    a = p.parse_args(argv)
    import torch

    from drope_ops.gguf import import_gguf

    print(import_gguf(a.file, a.dst, dtype=getattr(torch, a.dtype)))
    return 0
