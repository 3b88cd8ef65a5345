"""`drope fetch SOURCE DEST`: bring a base checkpoint to local disk or S3, verified and resumable.

    drope fetch hf://HuggingFaceTB/SmolLM2-135M@main ./ckpt/smollm2
    drope fetch s3://bucket/models/llama ./ckpt/llama          # run again after a kill: resumes
    drope fetch ./ckpt/llama s3://bucket/runs/r1/base
    drope fetch SmolLM2-135M-Instruct.Q4_1.gguf ./ckpt/smollm2
    drope fetch hf://SakanaAI/SmolLM-360M-DroPE ./ckpt/smollm-drope   # official release -> drope layout, no code run
"""

from __future__ import annotations

import logging
import sys

from workflows.commands.parser import Parser


def main_fetch(argv: list[str]) -> int:
    parser = Parser(
        prog="drope fetch",
        description="Fetch a checkpoint (hf://ORG/NAME[@REV], s3://BUCKET/PREFIX, a directory or a "
                    ".gguf file) into a local directory or s3://BUCKET/PREFIX, with a sha256 manifest.")
    parser.add_argument("source", help="hf://ORG/NAME[@REVISION] | s3://BUCKET/PREFIX | DIR | FILE.gguf")
    parser.add_argument("dest", help="local directory or s3://BUCKET/PREFIX (complete or absent afterwards)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept *.bin / *.pt weights (loaded with weights_only=True, stored as safetensors)")
    parser.add_argument("--allow-code", action="store_true",
                        help="also copy custom *.py files and keep auto_map (never executed by drope)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)  # never echo signed request details

    from drope_ops.fetch import fetch

    result = fetch(args.source, args.dest, allow_pickle=args.allow_pickle, allow_code=args.allow_code,
                   expect=None, progress=not args.no_progress)  # a RoPE model, or one already DroPE
    print(f"fetched {args.source} -> {result.dest}: {result.files_transferred} files, "
          f"{result.bytes_transferred / 1e6:.1f} MB transferred, manifest {result.manifest_digest}")
    return 0
