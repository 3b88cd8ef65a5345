"""Recalibration's resumable checkpoints: what each rank saves and reports to Ray Train every
`checkpoint_every` steps (its DeepSpeed shard, data position, RNG states; rank 0 the step and metric
history), how a relaunched rank restores them reading only its own files, and the parity probe that
checks the final weights against the in-training model.

Each rank writes and reads only its own shard files (`own_shards`, `keep_own_shards`); a checkpoint
missing one rank's shard is refused, naming the rank (`missing_rank`). The driver reads two small files
of the last checkpoint (`read_json`, the probe), never a shard.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch

from drope_ops.errors import CheckpointError, SpecError
from workflows import stage_io
from workflows.recalibrate.config import RecalibrateConfig, zero_name

DS_TAG = "ds"  # DeepSpeed checkpoint tag inside every reported checkpoint directory
STATE_FILE = "train_state.json"  # step and metric history (rank 0); data_rank{r}.json: each rank's data position
PROBE_FILE = "probe_logits.pt"  # final in-training logits on a fixed batch (rank 0), for the parity check
PROBE_TOKENS = 256
"""Tokens a probe row keeps: every weight takes part in every token's logits, so a short probe checks the
consolidation as a whole block would (SmolLM2 at 2048 tokens: a 400 MB logits file and a 0.55 TFLOP
forward on one rank's thread, against 50 MB and 1/8 of the forward)."""

# Checkpoints: each rank writes and reads only its own shard files.

SHARED_FILES = {0: ("mp_rank_00_model_states.pt",), 1: ("mp_rank_00_model_states.pt",),
                2: ("mp_rank_00_model_states.pt",), 3: ()}
"""DeepSpeed files every rank reads, written by rank 0 only (ZeRO-1/2: the module weights; ZeRO off:
the module weights and the whole optimizer state, no per-rank shard at all)."""


def own_shards(rank: int, names: list[str]) -> list[str]:
    """The shard files of rank `rank` among a DeepSpeed tag directory's file names."""
    return [n for n in names if re.match(rf"(?:bf16_)?zero_pp_rank_{rank}_mp_rank_\d+_", n)]


def missing_rank(names: list[str], world: int, zero_stage: int) -> str | None:
    """Why a checkpoint (its tag directory's file names) cannot be resumed by `world` ranks, naming the
    first rank whose shard is missing; None when complete. ZeRO-3: every rank needs its optimizer and
    model-states shard; ZeRO-1/2: its optimizer shard, and rank 0's module weights; ZeRO off: rank 0's
    module weights and optimizer state only."""
    if zero_stage == 0 and any(own_shards(rank, names) for rank in range(world)):
        return "it holds ZeRO's per-rank optimizer shards (written with zero_stage 1-3)"
    kinds = {0: (), 3: ("optim_states", "model_states")}.get(zero_stage, ("optim_states",))
    for rank in range(world):
        mine = own_shards(rank, names)
        for kind in kinds:
            if not any(kind in n for n in mine):
                return f"the {kind} shard of rank {rank} is missing"
    for name in SHARED_FILES[zero_stage]:
        if name not in names:
            return f"{name} (rank 0's module weights{' and optimizer state' if zero_stage == 0 else ''}) is missing"
    return None


# Reading a Ray Train checkpoint (local or S3) file by file, never as a whole directory.


def checkpoint_files(checkpoint) -> list[str]:
    """Relative paths of every file in a Ray Train checkpoint (local or S3), without downloading any."""
    import pyarrow.fs

    root = checkpoint.path.rstrip("/")
    infos = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    return sorted(i.path[len(root) + 1:] for i in infos if i.type == pyarrow.fs.FileType.File)


def download(checkpoint, names: list[str], local_dir: str) -> None:
    """Copy the named files of a Ray Train checkpoint into local_dir (and nothing else)."""
    for name in names:
        (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{name}") as src, \
                open(Path(local_dir) / name, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


def keep_own_shards(d: Path, tag: str, rank: int) -> None:
    """Delete what DeepSpeed wrote on this node besides this rank's shards (node-local storage makes
    each node's first rank write the shared files too: `latest`, ZeRO-1/2 module weights)."""
    for p in d.iterdir():
        if p.is_file():
            p.unlink()
    for p in (d / tag).iterdir():
        if p.name not in own_shards(rank, [p.name]):
            p.unlink()


def read_json(checkpoint, name: str) -> dict:
    """One JSON file of a Ray Train checkpoint, read in place."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{name}") as f:
        return json.loads(f.read())



def latest_checkpoint_step(path: str, filesystem, run_name: str) -> int:
    """Step of the newest checkpoint_step_NNNNNN Ray Train kept for `run_name` (0: a fresh run)."""
    import pyarrow.fs

    fs = filesystem or pyarrow.fs.LocalFileSystem()
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{path.rstrip('/')}/{run_name}", allow_not_found=True))
    except OSError:
        return 0
    steps = [int(m.group(1)) for i in infos if (m := re.fullmatch(r"checkpoint_step_(\d+)", i.base_name))]
    return max(steps, default=0)


# ---------------------------------------------------------------------------------------------------
# Save and restore, on the workers.


def save(t, done: int, metrics: dict, report: dict, probe: dict | None) -> None:
    """Write this rank's part of the step-`done` checkpoint and report it; Ray Train merges the ranks'
    parts into checkpoint_step_NNNNNN in the run's storage."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix=f"recal-r{t.rank}-") as d:
        if probe is not None and t.rank == 0:
            torch.save(probe, Path(d) / PROBE_FILE)
        t.engine.save_checkpoint(d, tag=DS_TAG)
        if t.rank != 0:  # only its own shards: rank 0 alone writes what every rank shares
            keep_own_shards(Path(d), DS_TAG, t.rank)
        version, state, _ = random.getstate()
        torch.save({"torch": torch.get_rng_state(), "python_version": version, "python_state": list(state)},
                   Path(d) / f"rng_rank{t.rank}.pt")
        (Path(d) / f"data_rank{t.rank}.json").write_text(json.dumps(t.sampler.state_dict()))
        if t.rank == 0:
            (Path(d) / STATE_FILE).write_text(json.dumps({"step": done, "history": t.history}))
        ray.train.report({**metrics, **report}, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_step_{done:06d}")


def restore(t, cfg: RecalibrateConfig, checkpoint) -> None:
    """Load a reported checkpoint: DeepSpeed state (weights, optimizer, step counters), this rank's
    data position and RNG states, and the metric history. This rank downloads only its own files."""
    if checkpoint is None:
        return
    names = checkpoint_files(checkpoint)
    tag_files = [n[len(DS_TAG) + 1:] for n in names if n.startswith(f"{DS_TAG}/")]
    if why := missing_rank(tag_files, t.world, cfg.zero_stage):
        raise CheckpointError(f"checkpoint {checkpoint.path} cannot resume {zero_name(cfg.zero_stage)} with {t.world} "
                              f"ranks: {why}; relaunch with the num_workers and zero_stage it was written with, or a new run_name")
    if f"data_rank{t.rank}.json" not in names:
        raise SpecError(f"checkpoint {checkpoint.path} has no data position for rank {t.rank}; relaunch with "
                        f"the num_workers it was written with, or start a new run_name")
    mine = [STATE_FILE, f"data_rank{t.rank}.json", f"rng_rank{t.rank}.pt",
            *(f"{DS_TAG}/{n}" for n in own_shards(t.rank, tag_files)),
            *(f"{DS_TAG}/{n}" for n in SHARED_FILES[cfg.zero_stage])]
    with tempfile.TemporaryDirectory(prefix=f"recal-restore-r{t.rank}-") as d:
        download(checkpoint, mine, d)
        t.engine.load_checkpoint(d, tag=DS_TAG, load_lr_scheduler_states=False)
        t.sampler.load_state_dict(json.loads((Path(d) / f"data_rank{t.rank}.json").read_text()))
        state = json.loads((Path(d) / STATE_FILE).read_text())
        t.start, t.history = state["step"], state["history"]
        rng = torch.load(Path(d) / f"rng_rank{t.rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["python_version"], tuple(rng["python_state"]), None))


# ---------------------------------------------------------------------------------------------------
# The parity probe: in-training logits (a worker) against the written checkpoint (the driver).


def probe_logits(t, input_ids: torch.Tensor) -> dict:
    """Logits of the model as trained on a fixed input (any will do), for the parity check after
    consolidation: up to 2 rows, their first PROBE_TOKENS tokens."""
    probe = input_ids[:2, :PROBE_TOKENS].cpu()
    t.engine.eval()
    with torch.no_grad():
        logits = t.engine(input_ids=probe.to(t.engine.device)).logits.float().cpu()
    t.engine.train()
    return {"input_ids": probe, "logits": logits}


def probe_parity(checkpoint, output: str) -> float | None:
    """Max |logit difference| between the checkpoint the workers wrote at `output` and the in-training
    model on the probe batch of the final Ray Train checkpoint (None if it carries no probe). Reads only
    the probe file of that checkpoint, never its optimizer states."""
    from transformers import AutoModelForCausalLM

    import drope_ops  # noqa: F401

    if PROBE_FILE not in checkpoint_files(checkpoint):
        return None
    with tempfile.TemporaryDirectory(prefix="recal-probe-") as d:
        download(checkpoint, [PROBE_FILE], d)
        probe = torch.load(Path(d) / PROBE_FILE, weights_only=True)
    reloaded = AutoModelForCausalLM.from_pretrained(stage_io.materialize(output), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = reloaded(input_ids=probe["input_ids"]).logits
    return float((ours - probe["logits"]).abs().max())
