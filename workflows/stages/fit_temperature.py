"""Stage fit_temperature: the DroPE softmax temperature for contexts longer than C_train.

    drope fit-temperature CKPT OUT --factors 2 4 --sequences 4 [--data shakespeare]

For each extension factor s, beta(s) minimising the held-out loss at L = s * C_train (bounded Brent,
<= max_evals losses, drope_ops.temperature); then c in beta = 1 + c ln s by least squares. Every length
scores the first L tokens of the same held-out sequences (those of the longest length), taken from the
held-out validation documents: the evaluation's perplexity scores the test ones (drope_ops.data). OUT is the
same checkpoint (weights hard-linked, or copied across file systems) whose config.json carries
logit_scale_c = c, so the model applies beta(L) by itself at any length; temperature_fit.json holds
the per-length fits; the manifest is written last and the directory appears by one rename.
With Ray initialised and room for more than one at once, each length is its own Ray task
(workflows.tasks.run_units), handed the checkpoint's URI: it materializes the checkpoint on its own node.
Where the lengths would run one after another anyway (one task's CPUs / GPUs fill the largest node, or
no Ray), one task fits them all, longest first, and the shorter lengths reuse the longer ones' forwards
(drope_ops.temperature.fit_lengths: each forward at scale beta scores every shorter prefix too).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from drope_ops.choices import check_choices
from drope_ops.data import DataConfig
from drope_ops.errors import CheckpointError, SpecError
from drope_ops.hardware import Dtype, resolve_dtype
from drope_ops.temperature import MAX_EVALS_CAP
from workflows import stage_io
from workflows.stage import Stage
from workflows.tasks import run_units, task_device, units_at_once


@dataclass
class TemperatureConfig:
    extension_factors: list[float] = field(default_factory=lambda: [2, 4])
    """Target lengths as multiples s of C_train (each > 1); one beta is fitted per factor."""
    sequences_per_length: int = 4
    """Held-out packed sequences of length s * C_train the loss is averaged over."""
    bounds: list[float] = field(default_factory=lambda: [0.5, 3.0])
    """[low, high] of the logit-scale search."""
    max_evals: int = 12
    """Loss evaluations per length (<= 12)."""
    dtype: Dtype = "float32"
    """Weights' dtype while fitting: float32 (loss differences between scales are ~1e-3), bfloat16, or
    auto (bfloat16 where a matmul probe on the node measures it faster than float32, else float32)."""
    cpus_per_length: float = 1
    """CPUs (and torch threads) of each per-length Ray task when Ray is initialised. Lengths cost
    unequally (attention grows with L^2): on a small node, all its CPUs per length runs them one after
    another with none idle (in one task, the shorter lengths reusing the longer's forwards), where one
    CPU each leaves one idle while the longest finishes."""
    gpus_per_length: float = 0
    """GPUs of each per-length task (the model and its loss evaluations go on the task's GPU)."""
    memory_per_length_gb: float | None = None
    """Host memory Ray reserves for each per-length task (None: no reservation)."""

    def __post_init__(self):
        check_choices(self, "fit_temperature")
        if not self.extension_factors or any(float(s) <= 1 for s in self.extension_factors):
            raise SpecError(f"fit_temperature.extension_factors={self.extension_factors}: give factors > 1, e.g. [2, 4]")
        if len({float(s) for s in self.extension_factors}) != len(self.extension_factors):
            raise SpecError(f"fit_temperature.extension_factors={self.extension_factors} names a factor twice; "
                            f"list each once")
        if self.sequences_per_length < 1:
            raise SpecError(f"fit_temperature.sequences_per_length={self.sequences_per_length}: must be >= 1")
        if len(self.bounds) != 2 or not 0 < self.bounds[0] < self.bounds[1]:
            raise SpecError(f"fit_temperature.bounds={self.bounds}: give [low, high] with 0 < low < high, e.g. [0.5, 3.0]")
        if not 3 <= self.max_evals <= MAX_EVALS_CAP:
            raise SpecError(f"fit_temperature.max_evals={self.max_evals}: must be in 3..{MAX_EVALS_CAP}")


def load_drope(checkpoint_dir: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) of a DroPE checkpoint on `device`: safetensors only, no remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import drope_ops  # noqa: F401  (registers model_type "drope")

    if not (Path(checkpoint_dir) / "config.json").is_file():
        raise CheckpointError(f"{checkpoint_dir}: no config.json; give a DroPE checkpoint directory")
    cfg = AutoConfig.from_pretrained(checkpoint_dir)
    if cfg.model_type != "drope":
        raise CheckpointError(f"{checkpoint_dir}: model_type {cfg.model_type!r}, not 'drope'; fit the temperature "
                              f"of a DroPE checkpoint (drope drop-rope, then recalibrate)")
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=resolve_dtype(dtype, "fit_temperature.dtype"),
                                                 use_safetensors=True)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(checkpoint_dir)


def fit_factors(checkpoint: str, data: DataConfig, factors: list[float], cfg: TemperatureConfig) -> list[dict]:
    """beta for each of `factors`, in one task, the lengths sharing forwards: [{"factor", "length", "beta",
    "loss", "evals", "forwards"}]. A plain function (Ray task)."""
    import torch

    from drope_ops.data import heldout_blocks
    from drope_ops.temperature import fit_lengths

    model, tok = load_drope(str(stage_io.local_dir(checkpoint)), cfg.dtype, task_device(cfg.gpus_per_length))
    C = model.config.original_max_position_embeddings
    length_of = {s: int(round(s * C)) for s in factors}
    # the stage's longest length: every task scores prefixes of the same sequences, however they are split
    blocks = heldout_blocks(data, tok, int(round(max(map(float, cfg.extension_factors)) * C)), cfg.sequences_per_length,
                            split="validation")  # the evaluation scores the other held-out documents ("test")
    print(f"[fit_temperature] L={', '.join(map(str, length_of.values()))} on the first L tokens of {len(blocks)} "
          f"held-out validation sequences", flush=True)

    def say(L: int, beta: float, loss: float, shared: bool) -> None:
        print(f"[fit_temperature]   L={L} beta={beta:.4f} loss={loss:.5f}"
              + (" (from a longer length's forward)" if shared else ""), flush=True)

    with torch.inference_mode():
        fits = fit_lengths(model, blocks, list(length_of.values()), tuple(cfg.bounds), cfg.max_evals, progress=say)
    return [{"factor": s, "length": L, "beta": fits[L].beta, "loss": fits[L].loss, "evals": fits[L].evals,
             "forwards": len(fits[L].evals) - fits[L].shared} for s, L in length_of.items()]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def write_fitted_checkpoint(checkpoint_dir: str, output_dir: str, c: float, fits: list[dict]) -> Path:
    """Same weights, config.json with logit_scale_c = c, temperature_fit.json, manifest last; atomic."""
    from drope_ops.manifest import MANIFEST_NAME, write_manifest
    from drope_ops.surgery import atomic_directory

    src = Path(checkpoint_dir)
    with atomic_directory(output_dir) as tmp:
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src)
            if p.is_dir() or p.name in (MANIFEST_NAME, "config.json", "temperature_fit.json"):
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(p, tmp / rel)
        config = json.loads((src / "config.json").read_text())
        config["logit_scale_c"] = float(c)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "temperature_fit.json").write_text(json.dumps({"c": c, "fits": fits}, indent=1) + "\n")
        write_manifest(tmp)
    return Path(output_dir)


def _gib(gb: float | None) -> int | None:
    return int(gb * 2**30) if gb else None


def fit_temperature(cfg: TemperatureConfig, data: DataConfig, checkpoint: str, output_dir: str, *,
                    metrics_sink=None) -> dict:
    """Fit beta per length and c for `checkpoint` (local directory or s3:// URI); write the fitted
    checkpoint to the local directory `output_dir`. Returns
    {"output", "c", "betas": {factor: beta}, "losses": {factor: loss}, "lengths": {factor: L}}."""
    from drope_ops.temperature import fit_c

    factors = sorted((float(s) for s in cfg.extension_factors), reverse=True)  # longest first
    memory = _gib(cfg.memory_per_length_gb)
    if units_at_once(len(factors), cpus=cfg.cpus_per_length, gpus=cfg.gpus_per_length, memory=memory) > 1:
        groups = [[s] for s in factors]  # side by side, one task a length
    else:
        groups = [factors]  # one after another anyway: one task, the shorter lengths reusing the longer's forwards
    per_group = run_units(fit_factors, [(checkpoint, data, g, cfg) for g in groups], cpus=cfg.cpus_per_length,
                          gpus=cfg.gpus_per_length, memory=memory,
                          what="fit_temperature.cpus_per_length / gpus_per_length / memory_per_length_gb")
    order = [float(s) for s in cfg.extension_factors]
    fits = sorted((f for fs in per_group for f in fs), key=lambda f: order.index(f["factor"]))
    betas = {f["factor"]: f["beta"] for f in fits}
    c = fit_c(betas)
    for step, f in enumerate(fits):
        print(f"[fit_temperature] s={f['factor']:g} L={f['length']} beta={f['beta']:.4f} loss={f['loss']:.4f} "
              f"({len(f['evals'])} evals, {f['forwards']} forwards)", flush=True)
        if metrics_sink is not None:
            metrics_sink.log_metrics({"beta": f["beta"], "heldout_loss": f["loss"], "length": f["length"]}, step)
    if metrics_sink is not None:
        metrics_sink.log_metrics({"logit_scale_c": c}, len(fits))
    print(f"[fit_temperature] c = {c:.4f} (paper: 0.103 SmolLM-DroPE, 0.412 from scratch)", flush=True)
    write_fitted_checkpoint(str(stage_io.local_dir(checkpoint)), output_dir, c, fits)
    return {"output": str(output_dir), "c": c, "betas": betas,
            "losses": {f["factor"]: f["loss"] for f in fits}, "lengths": {f["factor"]: f["length"] for f in fits}}


def run(spec, ctx) -> dict:
    with stage_io.output_dir(ctx.output) as out:
        res = fit_temperature(spec.fit_temperature, spec.data, ctx.inputs["recalibrate"], str(out), metrics_sink=ctx.sink)
    return {"c": res["c"], "betas": {str(k): v for k, v in res["betas"].items()}}


STAGE = Stage(name="fit_temperature", run=run, sections=("fit_temperature", "data"), inputs=("recalibrate",),
              logged_model="temperature-fitted", dataset_context="validation", label="temperature-fitted")
