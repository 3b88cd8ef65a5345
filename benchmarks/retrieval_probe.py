"""Does a tiny RoPE Llama learn niah_single_1 at its training length on this box? (README, micro reproduction)

One process, no Ray: trains from random init on a mix of RULER needle prompts (answers included, seeds
disjoint from the evaluation's), optional copy documents (a random span of digits or tokens, a newline, the same span:
only an induction head predicts the second half) and Shakespeare, and scores NIAH at 1x and 2x every
--eval-every steps. The micro reproduction can only show DroPE's retrieval claim once this says yes.

    python benchmarks/retrieval_probe.py --tokenizer bpe --seq 256 --steps 1500 --needles 0.34 --copies 0.33
    python benchmarks/retrieval_probe.py --tokenizer bytes --seq 512 --batch 8 --steps 800 --needles 1
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch


def copy_block(tok, seq: int, rng: random.Random, kind: str, max_span: int = 0,
               pack: bool = False) -> tuple[list[int], list[int], int]:
    """(ids, labels, start of the first repeat): a random span, a newline, the same span again, then
    (pack) more such episodes until seq is full, EOS-padded to seq. labels are -100 except on the
    repeats (the spans themselves are unpredictable noise; the repeats need an induction head).
    kind "digits": random digits (10 symbols, so copying must match several previous tokens);
    kind "tokens": random vocabulary tokens (each one nearly unique: plain one-token induction)."""
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids)
    ids: list[int] = []
    labels: list[int] = []
    first = None
    while len(ids) < seq - 2 * (8 + len(newline)):
        n = rng.randint(8, min(max_span or seq, (seq - len(ids)) // 2 - 2))
        if kind == "digits":
            span = tok("".join(rng.choice("0123456789") for _ in range(n)), add_special_tokens=False)["input_ids"]
        else:
            span = [t for t in (rng.randrange(len(tok)) for _ in range(2 * n)) if t not in special][:n]
        first = len(ids) + len(span) + len(newline) if first is None else first
        ids += span + newline + span + newline
        labels += [-100] * (len(span) + len(newline) + 1) + span[1:] + newline
        if not pack:
            break
    ids, labels = ids[:seq], labels[:seq]
    pad = seq - len(ids)
    return ids + [tok.eos_token_id] * pad, labels + [-100] * pad, first


@torch.no_grad()
def copy_loss(model, blocks: torch.Tensor, starts: list[int]) -> float:
    """Mean loss on the repeated half of copy documents (ln 10 or ln |V| without an induction head, ~0 with)."""
    logits = model(input_ids=blocks).logits.float()
    losses = []
    for row, start in enumerate(starts):
        n = start - 1  # the span's length
        target = blocks[row, start + 1:start + n]
        losses.append(torch.nn.functional.cross_entropy(logits[row, start:start + n - 1], target))
    return float(torch.stack(losses).mean())


def main() -> None:
    from transformers import LlamaForCausalLM

    from drope_ops import assets
    from drope_ops.debugmodel import bpe_tokenizer, byte_level_tokenizer, debug_config
    from drope_ops.evals.niah import evaluate_cell
    from drope_ops.needle_data import inputs_and_labels, needle_block

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", choices=["bytes", "bpe"], default="bpe")
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--needles", type=float, default=0.34, help="fraction of each batch that is needle prompts")
    p.add_argument("--copies", type=float, default=0.33, help="fraction of each batch that is copy documents")
    p.add_argument("--copy-kind", choices=["digits", "tokens"], default="digits")
    p.add_argument("--mix-copy-kind", choices=["digits", "tokens"], default=None,
                   help="copy documents after the warm-up (default: --copy-kind)")
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--copy-warmup", type=int, default=0,
                   help="first N steps: copy documents only (an induction head forms first, needles after)")
    p.add_argument("--warmup-seq", type=int, default=0,
                   help="copy warm-up at this shorter length, with batch x seq / warmup-seq documents a step")
    p.add_argument("--copy-max", type=int, default=0, help="longest copied span (0: half the sequence)")
    p.add_argument("--pack", action="store_true", help="copy documents hold copy episodes until full")
    p.add_argument("--mask", action="store_true",
                   help="score copy documents on their repeated half only, and no EOS padding anywhere")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    texts = [f.read_text(errors="ignore") for f in assets.shakespeare_texts()]
    tok = byte_level_tokenizer() if args.tokenizer == "bytes" else bpe_tokenizer(texts, args.vocab)
    cfg = debug_config(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                       max_position_embeddings=args.seq, bos_token_id=tok.eos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(tok)}", flush=True)

    n_pool = 4000
    needles, needle_labels = inputs_and_labels(torch.stack([  # padding after the answer's EOS: ~eos, unscored
        needle_block(tok, args.seq, task="niah_single_1", index=i, seed=args.seed) for i in range(n_pool)]))
    rng = random.Random(args.seed)
    train_pool = [copy_block(tok, args.seq, rng, args.mix_copy_kind or args.copy_kind, args.copy_max, args.pack)
                  for _ in range(n_pool)]
    probe_pool = [copy_block(tok, args.seq, rng, args.copy_kind) for _ in range(16)]
    wseq = args.warmup_seq or args.seq
    warm_pool = [copy_block(tok, wseq, rng, args.copy_kind, args.copy_max, args.pack) for _ in range(n_pool)]
    warm_copies = torch.tensor([ids for ids, _, _ in warm_pool])
    warm_labels = torch.tensor([labels for _, labels, _ in warm_pool])
    copies = torch.tensor([ids for ids, _, _ in train_pool])
    copy_labels = torch.tensor([labels for _, labels, _ in train_pool])
    probe_copies = torch.tensor([ids for ids, _, _ in probe_pool])
    probe_starts = [start for _, _, start in probe_pool]
    ids = torch.tensor(tok("\n".join(texts)[:3_000_000])["input_ids"])
    text = ids[: len(ids) // args.seq * args.seq].view(-1, args.seq)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    k_needle, k_copy = round(args.batch * args.needles), round(args.batch * args.copies)
    t0 = time.time()
    for step in range(args.steps):
        scale = min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = args.lr * max(scale, 0.1)
        if step < args.copy_warmup:  # copy documents only, at the warm-up length
            pick = torch.randint(0, n_pool, (args.batch * args.seq // wseq,), generator=g)
            x = warm_copies[pick]
            y = warm_labels[pick] if args.mask else x
        else:
            pick_n = torch.randint(0, n_pool, (k_needle,), generator=g)
            pick_c = torch.randint(0, n_pool, (k_copy,), generator=g)
            x = torch.cat([needles[pick_n], copies[pick_c],
                           text[torch.randint(0, len(text), (args.batch - k_needle - k_copy,), generator=g)]])
            y = x.clone()
            if args.mask:
                y[:k_needle] = needle_labels[pick_n]
                y[k_needle:k_needle + k_copy] = copy_labels[pick_c]
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} ({(time.time() - t0) / (step + 1):.2f} s/step)", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            model.eval()
            with torch.no_grad():
                print(f"  copy loss (repeated half, held-out) after {step + 1} steps: "
                      f"{copy_loss(model, probe_copies, probe_starts):.3f}", flush=True)
                for length in (args.seq, 2 * args.seq):
                    r = evaluate_cell(model, tok, "niah_single_1", length, depths=[0, 25, 50, 75, 100], samples=10,
                                      max_new_tokens=12, seed=args.seed)
                    first = r["samples"][0]
                    print(f"  NIAH@{length} after {step + 1} steps: {r['score']:.0f} "
                          f"(asked {first['answers']}, got {first['output']!r})", flush=True)
            model.train()


if __name__ == "__main__":
    main()
