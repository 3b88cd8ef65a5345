"""Stage pretrain (micro reproduction only): train a small RoPE Llama from random init, so the
lineage starts at step 0. It is the recalibration loop (Ray Train + DeepSpeed) on a random-init
checkpoint; the paper's Section 5.1 setting then drops RoPE near the end of this training.

    drope run micro-repro          # runs pretrain -> drop_rope -> recalibrate -> fit_temperature -> evaluate

With `pretrain.tokenizer: bpe` the checkpoint gets a BPE trained on the train split of data.source.
With `pretrain.warmup` the stage trains twice: first on copy documents alone at a short length (the
induction head forms there: benchmarks/retrieval_probe.py), then the main phase on data (text,
needles, copies) from the warm-up's weights. The warm-up's metrics carry the prefix `warmup_`.
The random init and the warm-up's weights are published to the run's storage before the Ray Train
workers read them, so no worker depends on the disk of the node this stage runs on.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Literal

from drope_ops import storage
from drope_ops.choices import check_choices
from drope_ops.data import DataConfig, iter_documents
from drope_ops.errors import SpecError
from drope_ops.manifest import write_manifest
from workflows import stage_io
from workflows.config import from_dict
from workflows.stage import SOURCE, Stage
from workflows.recalibrate.config import RecalibrateConfig

WARMUP_DATA_FIELDS = ("seq_len", "copies", "copy_max_span")


@dataclass
class PretrainConfig:
    """Optional stage 0 (the micro reproduction): train a small RoPE Llama from random init first."""

    enabled: bool = False
    """Run the pretrain stage; model.source is then ignored."""
    config: dict = field(default_factory=dict)
    """LlamaConfig overrides for the random-init model (hidden_size, num_hidden_layers, ...)."""
    train: dict = field(default_factory=dict)
    """RecalibrateConfig fields for the pretraining run (steps, lr, global_batch, ...)."""
    tokenizer: Literal["bytes", "bpe"] = "bytes"
    """bytes (258 tokens) or bpe: a byte-level BPE trained on data.source's train split, digits split."""
    vocab_size: int = 2048
    """Size of the bpe tokenizer."""
    warmup: dict = field(default_factory=dict)
    """Optional first phase on copy documents only ({} = none): RecalibrateConfig fields plus seq_len,
    copies (documents) and copy_max_span. A small model learns content-based copying (the induction
    head NIAH needs) there, not in the mixed data (benchmarks/retrieval_probe.py)."""

    def __post_init__(self):
        check_choices(self, "pretrain")
        if self.vocab_size < 300:
            raise SpecError(f"pretrain.vocab_size={self.vocab_size}: give at least 300 (256 bytes + merges)")


class PrefixedSink:
    """A metrics sink that renames every metric `prefix + name` (picklable, as the sink it wraps)."""

    def __init__(self, sink, prefix: str):
        self.sink, self.prefix = sink, prefix

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.sink is not None:
            self.sink.log_metrics({self.prefix + k: v for k, v in metrics.items()}, step)


def warmup_configs(spec) -> tuple[RecalibrateConfig, DataConfig] | None:
    """(training, data) of the copy warm-up phase, or None without one."""
    warm = dict(spec.pretrain.warmup)
    if not warm:
        return None
    data = {k: warm.pop(k) for k in WARMUP_DATA_FIELDS if k in warm}
    if not data.get("copies"):
        raise SpecError("pretrain.warmup.copies is missing: give the number of copy documents, e.g. 4000")
    cfg = from_dict(RecalibrateConfig, {**spec.pretrain.train, **warm}, "pretrain.warmup.")
    return cfg, dataclasses.replace(spec.data, source="copies", needles=0, **data)


def make_tokenizer(spec):
    """None (the byte-level default) or a BPE trained on the train split of data.source."""
    if spec.pretrain.tokenizer != "bpe":
        return None
    from drope_ops import debugmodel

    return debugmodel.bpe_tokenizer(iter_documents(spec.data, "train"), spec.pretrain.vocab_size)


def _published(local_dir: str, ctx, name: str) -> str:
    """The checkpoint at local_dir as the workers should see it: on S3 storage, uploaded next to the
    stage's output (<output>-<name>); on local storage, the local path."""
    if not stage_io.is_remote(ctx.output):
        return local_dir
    uri = f"{ctx.output.rstrip('/')}-{name}"
    storage.put_checkpoint(local_dir, uri)
    return uri


def pretrain_stage(spec, ctx) -> dict:
    # torch, transformers and DeepSpeed load when the stage runs, not when a spec (PretrainConfig) loads
    from drope_ops import debugmodel
    from workflows.recalibrate.launch import recalibrate

    cfg = from_dict(RecalibrateConfig, spec.pretrain.train, "pretrain.train.")
    warmup = warmup_configs(spec)
    init = tempfile.mkdtemp(dir=stage_io.scratch_root(), prefix="pretrain-init-")
    ray_storage = storage.join(ctx.run_uri, "ray-train")
    try:
        debugmodel.make_debug_checkpoint(f"{init}/ckpt", seed=cfg.seed, tokenizer=make_tokenizer(spec),
                                         **spec.pretrain.config)
        write_manifest(f"{init}/ckpt")
        start = _published(f"{init}/ckpt", ctx, "init")
        if warmup is not None:
            warm_cfg, warm_data = warmup
            print(f"[pretrain] warm-up: {warm_cfg.steps} steps on {warm_data.copies} copy documents of "
                  f"{warm_data.seq_len} tokens", flush=True)
            recalibrate(warm_cfg, warm_data, start, f"{init}/warm", run_name=f"pretrain-warmup-{ctx.fingerprint[:12]}",
                        storage_path=ray_storage, metrics_sink=PrefixedSink(ctx.sink, "warmup_"))
            start = _published(f"{init}/warm", ctx, "warmup")
        with stage_io.output_dir(ctx.output) as out:
            res = recalibrate(cfg, spec.data, start, str(out), run_name=f"pretrain-{ctx.fingerprint[:12]}",
                              storage_path=ray_storage, metrics_sink=ctx.sink)
    finally:
        shutil.rmtree(init, ignore_errors=True)
    return res


def run(spec, ctx) -> dict:
    from workflows.recalibrate.report import report_training

    return report_training(ctx, pretrain_stage(spec, ctx))


STAGE = Stage(name="pretrain", run=run, sections=("pretrain", "data"), role=SOURCE, logged_model="pretrained",
              dataset_context="training", label="pretrained (step 0)", enabled=lambda spec: spec.pretrain.enabled)
