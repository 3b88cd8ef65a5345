"""What README command 1 no longer computes twice, before against after, side by side in one process.

    .venv/bin/python benchmarks/shared_forwards.py --run /tmp/q11/runs/q11          # a finished smollm2-135m-cpu run
    .venv/bin/python benchmarks/shared_forwards.py --run /tmp/q11/runs/q11 --parts eval probe

The real SmolLM2-135M of that run (its fetched base checkpoint and its recalibrated DroPE checkpoint),
fp32, Shakespeare's held-out text as the preset reads it. Parts, each timing before and then after on
the same inputs:
  fit    the temperature fit at 8192 and 4096 tokens (bounds [0.5, 3], 5 losses each, 2 threads): each
         length's search on its own (before) against fit_lengths (the 4096 search takes the 8192
         forwards' prefix losses where it asks for the same beta)
  eval   the base model's perplexity at 2048 / 4096 / 8192 and crop's at 4096 / 8192 (1 thread, as an
         evaluation unit): a pass per length (before) against one pass for all (perplexity_points)
  gguf   load_gguf of the PyPI GGUF after a warm-up call: transformers parsing the file three times
         (before) against once
  probe  the recalibration's parity probe on one thread (a rank's share): 2048 tokens against PROBE_TOKENS
Prints each part's seconds, the ratio after / before, and the numbers both ways (equal to float noise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from unittest import mock

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
C_TRAIN = 2048


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def report(part: str, before: float, after: float, detail: str) -> None:
    print(f"{part}: before {before:.1f} s, after {after:.1f} s, after / before {after / before:.3f}  ({detail})",
          flush=True)


def stage_output(run: Path, stage: str) -> str:
    return json.loads((run / "ledger" / f"{stage}.json").read_text())["output"]


def shakespeare():
    from drope_ops.data import DataConfig

    return DataConfig(source="shakespeare", seq_len=C_TRAIN, max_tokens=400000)


def part_fit(run: Path) -> None:
    from drope_ops.data import heldout_blocks
    from drope_ops.temperature import fit_length, fit_lengths
    from workflows.stages.fit_temperature import load_drope

    torch.set_num_threads(2)
    model, tok = load_drope(stage_output(run, "recalibrate"), "float32")
    blocks = heldout_blocks(shakespeare(), tok, 4 * C_TRAIN, 1, split="validation")
    with torch.inference_mode():
        before, t_before = timed(lambda: {L: fit_length(model, blocks[:, :L], (0.5, 3.0), 5) for L in (8192, 4096)})
        after, t_after = timed(lambda: fit_lengths(model, blocks, [4096, 8192], (0.5, 3.0), 5))
    for L in (4096, 8192):
        print(f"  L={L}: beta {before[L].beta:.6f} / {after[L].beta:.6f}, loss {before[L].loss:.6f} / "
              f"{after[L].loss:.6f}, forwards {len(before[L].evals)} / {len(after[L].evals) - after[L].shared}")
    report("fit", t_before, t_after, "5 + 5 losses; shared: " + ", ".join(
        f"L={L} {after[L].shared}" for L in (4096, 8192)))


def part_eval(run: Path) -> None:
    from drope_ops import rope_scaling
    from drope_ops.data import heldout_blocks
    from drope_ops.evals.perplexity import perplexity_points
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    base = stage_output(run, "fetch")
    model = rope_scaling.load_variant(base, "rope", 4.0, C_TRAIN)
    blocks = heldout_blocks(shakespeare(), AutoTokenizer.from_pretrained(base), 4 * C_TRAIN, 1, split="test")
    lengths, cropped = [2048, 4096, 8192], [4096, 8192]

    def one_pass_each():
        full = {L: perplexity_points(model, blocks[:, :L], [L])[L] for L in lengths}
        crop = {L: perplexity_points(model, blocks[:, :L], [L], crop_to=C_TRAIN)[L] for L in cropped}
        return full, crop

    def one_pass():
        return perplexity_points(model, blocks, lengths), perplexity_points(model, blocks, cropped, crop_to=C_TRAIN)

    with torch.inference_mode():
        (full_b, crop_b), t_before = timed(one_pass_each)
        (full_a, crop_a), t_after = timed(one_pass)
    for name, b, a in (("rope", full_b, full_a), ("crop", crop_b, crop_a)):
        print(f"  {name}: " + ", ".join(f"ppl@{L} {b[L]['ppl']:.4f} / {a[L]['ppl']:.4f}" for L in b))
    report("eval", t_before, t_after, "rope ppl at 3 lengths + crop at 2, one thread")


def part_gguf() -> None:
    from drope_ops import assets, gguf

    path = assets.smollm2_gguf()
    path.read_bytes()  # in the page cache for both
    gguf.load_gguf(path)  # warm-up: the first call in a process also imports transformers' GGUF and tokenizer code
    with mock.patch.object(gguf, "_gguf_parsed_once", contextlib.nullcontext):
        (_, tok_b), t_before = timed(lambda: gguf.load_gguf(path))
    (_, tok_a), t_after = timed(lambda: gguf.load_gguf(path))
    report("gguf", t_before, t_after, f"{path.name}; vocabularies {len(tok_b)} / {len(tok_a)}")


def part_probe(run: Path) -> None:
    from transformers import AutoModelForCausalLM

    import drope_ops  # noqa: F401
    from workflows.recalibrate.checkpoint import PROBE_TOKENS

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(stage_output(run, "recalibrate"), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, C_TRAIN))
    with torch.no_grad():
        logits, t_before = timed(lambda: model(input_ids=ids).logits.float())
        short, t_after = timed(lambda: model(input_ids=ids[:, :PROBE_TOKENS]).logits.float())
    report("probe", t_before, t_after, f"{C_TRAIN} -> {PROBE_TOKENS} tokens; logits "
           f"{logits.numel() * 4 / 1e6:.0f} -> {short.numel() * 4 / 1e6:.0f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a finished smollm2-135m-cpu run: $DROPE_HOME/runs/RUN_ID")
    p.add_argument("--parts", nargs="+", choices=["fit", "eval", "gguf", "probe"], default=["gguf", "probe", "eval", "fit"])
    args = p.parse_args()
    print(f"cpu: {open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    for part in args.parts:
        {"fit": lambda: part_fit(args.run), "eval": lambda: part_eval(args.run), "gguf": part_gguf,
         "probe": lambda: part_probe(args.run)}[part]()


if __name__ == "__main__":
    main()
