"""The recalibration driver: check everything before any worker starts, place the workers, launch Ray
Train's TorchTrainer over loop.train_func, translate what comes back (a worker's DropeError, a lost
node) into one line, and check the workers' output against the in-training logits.

    recalibrate(RecalibrateConfig(steps=20, global_batch=8, micro_batch=2, num_workers=2),
                DataConfig(source="shakespeare"), "ckpt/", "out/", run_name="r1", storage_path="/tmp/rr")

DeepSpeed ZeRO 1/2/3 (or ZeRO off, stage 0, on CPU) inside Ray Train workers (gloo on CPU, nccl on
GPU), resumable to the exact step: a relaunch with the same `run_name` and `storage_path`, or Ray's own
restart after a worker dies (FailureConfig), continues from the last reported checkpoint. The workers
write the final safetensors checkpoint themselves, straight to the output URI: no optimizer state
reaches the driver. Workers are handed the input checkpoint's URI, never a path of this node.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import uuid
from pathlib import Path

from drope_ops import storage
from drope_ops.data import DataConfig, check_source, check_token_budget, resolve_seq_len
from drope_ops.errors import CheckpointError, DropeError, one_line
from drope_ops.training import TrainingDivergedError
from workflows import stage_io
from workflows.ray_errors import lost_worker, worker_error, worker_failures
from workflows.recalibrate.checkpoint import STATE_FILE, latest_checkpoint_step, probe_parity, read_json
from workflows.recalibrate.config import RecalibrateConfig, workers_for
from workflows.recalibrate.engine import check_zero_settings
from workflows.recalibrate.loop import NoMetrics, train_func


def _storage(storage_path: str):
    """(storage_path, pyarrow filesystem or None). s3:// against a custom endpoint (moto, MinIO) needs
    an explicit S3FileSystem with endpoint_override, taken from AWS_ENDPOINT_URL(_S3)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not storage_path.startswith("s3://") or not endpoint:
        return storage_path, None
    import pyarrow.fs

    scheme = "http" if endpoint.startswith("http://") else "https"
    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[-1], scheme=scheme,
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return storage_path[len("s3://"):], fs


def place_workers(cfg: RecalibrateConfig) -> RecalibrateConfig:
    """Resolve num_workers: auto from the cluster, and fail within a minute (one line naming the
    numbers) when the cluster cannot hold the workers, instead of waiting forever."""
    import dataclasses

    import ray

    from workflows.tasks import node_capacity, placeable, require_resources

    per_worker = {"CPU": cfg.cpus_per_worker, "GPU": 1 if cfg.use_gpu else 0}
    if cfg.num_workers == "auto":
        slots = placeable(per_worker, 10**6, node_capacity(ray))
        if slots < 1:
            require_resources("recalibrate.num_workers=auto", per_worker)
            slots = placeable(per_worker, 10**6, node_capacity(ray))
        cfg = dataclasses.replace(cfg, num_workers=workers_for(cfg, slots))
        print(f"[recalibrate] num_workers auto -> {cfg.num_workers} (cluster holds {slots}; gradient accumulation "
              f"{cfg.grad_accum})", flush=True)
    require_resources(f"recalibrate.num_workers={cfg.num_workers} x cpus_per_worker={cfg.cpus_per_worker}"
                      + (" x 1 GPU" if cfg.use_gpu else ""), per_worker, cfg.num_workers)
    return cfg


def validate(cfg: RecalibrateConfig, data: DataConfig, checkpoint: str) -> int:
    """Check the spec against the model before any worker starts; returns the block length."""
    from transformers import AutoConfig

    import drope_ops  # noqa: F401

    meta = stage_io.materialize_metadata(checkpoint)
    if not (meta / "config.json").is_file():
        raise CheckpointError(f"{checkpoint} has no config.json; give a checkpoint directory or s3:// prefix "
                              f"(fetch it first with `drope fetch`)")
    seq_len = resolve_seq_len(data, AutoConfig.from_pretrained(meta))
    check_source(data)  # a wrong data.source / data.text_field fails here, not in every Ray Train worker
    # a source too small for the schedule (with data.max_epochs forbidding more passes) fails here too
    check_token_budget(data, steps=cfg.steps, global_batch=cfg.global_batch, seq_len=seq_len)
    check_zero_settings(cfg)
    return seq_len


def _translated(e: Exception, cfg: RecalibrateConfig, run_dir: str) -> DropeError | None:
    """What the driver raises for a failed fit: a worker's DropeError as itself (a divergence with the
    last good checkpoint named), a lost node as a one-line DropeError, None for anything else (a bug)."""
    err = worker_error(e)
    if isinstance(err, TrainingDivergedError):
        good = (err.step - 1) // cfg.checkpoint_every * cfg.checkpoint_every
        where = f"{run_dir}/checkpoint_step_{good:06d}" if good else "none yet"
        return TrainingDivergedError(f"recalibration stopped: {err}; last good checkpoint: {where}; lower "
                                     f"recalibrate.lr or raise warmup_steps, then relaunch", step=err.step)
    if err is not None:
        return err
    if lost_worker(e):
        first = next(iter(worker_failures(e)), e)
        return DropeError(f"recalibration lost a Ray Train actor (its node died or was removed): {one_line(first)}; "
                          f"`drope resume RUN_ID` continues from the last checkpoint in {run_dir}")
    return None


def _trainer(cfg: RecalibrateConfig, *, train_loop_config: dict, run_name: str, path: str, filesystem):
    """The TorchTrainer: sizing in ScalingConfig, resume and retention in RunConfig (same name = resume)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_func,
        train_loop_config=train_loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}),
    )


def _fit_releasing_controller(trainer):
    """trainer.fit(), then the SIGINT handler as it was. Ray Train's fit (main thread) registers a
    handler that holds its TrainController actor's handle and never removes it: the controller and its
    DatasetManager then outlive the training, polling on the box's CPUs through the whole fit and
    evaluation that follow in the same process. Restored, the last handle goes and Ray ends them."""
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or handler is None:
        return trainer.fit()  # off the main thread fit registers nothing (and nothing could be restored)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGINT, handler)


def recalibrate(cfg: RecalibrateConfig, data: DataConfig, checkpoint: str, output_dir: str, *,
                run_name: str, storage_path: str, metrics_sink=None) -> dict:
    """Train `checkpoint` (a local directory or an s3:// URI) on `data` with DeepSpeed ZeRO on Ray Train;
    the workers write the trained checkpoint to `output_dir` (a directory every worker can reach, or an
    s3:// URI), manifest last.

    Returns {"output", "steps", "final_loss", "history", "checkpoint", "probe_max_abs_diff", "start_step"}.
    Raises SpecError / CheckpointError before any worker starts, TrainingDivergedError on a NaN or a
    loss spike (the last good checkpoint stays in storage, a relaunch resumes from it).
    """
    import ray

    seq_len = validate(cfg, data, checkpoint)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    cfg = place_workers(cfg)
    path, filesystem = _storage(storage_path)
    launch = uuid.uuid4().hex
    if newest := latest_checkpoint_step(path, filesystem, run_name):
        print(f"[recalibrate] {run_name}: checkpoint directories up to step {newest} in storage; resuming from "
              f"the newest one Ray Train registered as complete", flush=True)
    if not stage_io.is_remote(checkpoint):
        checkpoint = str(Path(checkpoint).resolve())
    output_dir = _fresh_output(output_dir)
    trainer = _trainer(cfg, train_loop_config={
        "cfg": cfg, "data": data, "seq_len": seq_len, "checkpoint": checkpoint, "output": output_dir,
        "metrics_sink": metrics_sink or NoMetrics(), "run_name": run_name, "launch": launch},
        run_name=run_name, path=path, filesystem=filesystem)
    try:
        result = _fit_releasing_controller(trainer)
    except Exception as e:
        if (translated := _translated(e, cfg, f"{storage_path}/{run_name}")) is None:
            raise
        raise translated from None
    return _outcome(result, cfg, run_name, storage_path, output_dir, launch)


def _outcome(result, cfg: RecalibrateConfig, run_name: str, storage_path: str, output_dir: str, launch: str) -> dict:
    """recalibrate's answer from Ray Train's result: the run's history and step from its last checkpoint's
    train_state.json, and, once the last step is done, the workers' output checked against the probe."""
    if result.checkpoint is None:
        raise CheckpointError(f"run {run_name} ended without a checkpoint in {storage_path}")
    metrics = result.metrics or {}
    state = read_json(result.checkpoint, STATE_FILE)  # the driver reads two small files, no shard
    # a launch that found the run finished ran no step and reported no checkpoint of its own
    start_step = int(metrics["resumed_from"]) if metrics.get("launch") == launch else state["step"]
    out = {"steps": state["step"], "final_loss": state["history"][-1]["loss"], "history": state["history"],
           "checkpoint": result.checkpoint.path, "start_step": start_step}
    if state["step"] < cfg.steps:  # stopped on purpose (stop_after_step): no output yet
        return {"output": None, **out}
    if not storage.checkpoint_complete(output_dir):
        raise CheckpointError(f"run {run_name} finished but its workers' output {output_dir} is incomplete; "
                              f"relaunch with the same run_name to write it again")
    return {"output": output_dir, **out, "probe_max_abs_diff": probe_parity(result.checkpoint, output_dir)}


def _fresh_output(output_dir: str) -> str:
    """The output as workers on any node see it: an absolute local path (emptied: the workers write it
    whole, an earlier attempt's files are never read) or the s3:// URI as given."""
    if stage_io.is_remote(output_dir):
        return output_dir
    out = Path(output_dir).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return str(out)
