"""ZeRO off's gradient all-reduce, on two real gloo processes (drope's own DeepSpeed engine on CPU).

Each rank builds the engine recalibration builds (`build`, zero_stage 0: torch's DDP reducer reduces
in backward, DeepSpeed's own reduce is off) and runs one step's two micro-batches through
`forward_backward` (and `engine.step`, as train_step does). Beside it, a plain copy of the checkpoint
runs the same micro-batches with no communication at all: its gradients are what this rank alone
computes. After the first micro-batch the engine must not have reduced (its gradients are the rank's
own, and the two ranks' differ); after the boundary's backward, before any step, both ranks must hold
the mean of the two ranks' own gradients.
"""

import json
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.fixtures.services import free_port

WORLD = 2


def _flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def _gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    torch.distributed.all_gather(out, t)
    return out


def _rank(rank: int, port: int, ckpt: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    from transformers import AutoModelForCausalLM

    from drope_ops.data import DataConfig
    from drope_ops.needle_data import inputs_and_labels
    from workflows.recalibrate.config import RecalibrateConfig
    from workflows.recalibrate.loop import build, forward_backward

    cfg = RecalibrateConfig(zero_stage=0, num_workers=WORLD, global_batch=8, micro_batch=2, steps=4)
    data = DataConfig(source="shakespeare", seq_len=64, max_tokens=20_000)
    t = build(cfg, data, ckpt, 64, rank, WORLD)
    own = AutoModelForCausalLM.from_pretrained(t.ckpt_dir, dtype=torch.float32)  # this rank alone
    micros = t.sampler.next_batch().split(cfg.micro_batch)
    facts = {"reduce_in_backward": t.reduce_in_backward, "grad_accum": len(micros)}
    for i, micro in enumerate(micros):
        boundary = t.engine.is_gradient_accumulation_boundary()
        forward_backward(t, micro, boundary)
        input_ids, labels = inputs_and_labels(micro)
        (own(input_ids=input_ids, labels=labels).loss / len(micros)).backward()
        engine_grads, own_grads = _flat_grads(t.engine.module), _flat_grads(own)
        ranks_engine, ranks_own = _gathered(engine_grads), _gathered(own_grads)
        mean_own = (ranks_own[0] + ranks_own[1]) / WORLD
        facts[f"micro{i}"] = {
            "boundary": boundary,
            "engine_is_own": bool(torch.equal(engine_grads, own_grads)),
            "ranks_differ": float((ranks_engine[0] - ranks_engine[1]).abs().max()),
            "engine_minus_mean_own": float((engine_grads - mean_own).abs().max()),
        }
        t.engine.step()  # counts the micro-batch (the update itself only at the boundary), as train_step does
    t.sampler.close()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(facts))
    torch.distributed.destroy_process_group()


def test_zero_off_reduces_once_at_the_boundary_inside_backward(debug_checkpoint, tmp_path):
    mp.start_processes(_rank, args=(free_port(), str(debug_checkpoint), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    for rank in range(WORLD):
        facts = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert facts["reduce_in_backward"] and facts["grad_accum"] == 2
        first, last = facts["micro0"], facts["micro1"]
        assert not first["boundary"] and last["boundary"]
        # no communication before the boundary: the rank's own gradients, not its peer's
        assert first["engine_is_own"] and first["ranks_differ"] > 0
        # the boundary's backward leaves both ranks the mean of their own accumulated gradients
        assert last["ranks_differ"] == 0.0 and last["engine_minus_mean_own"] <= 1e-7
