"""Where the CPU goes while drope's recalibration steps under Ray Train: the ranks against Ray's own processes.

    .venv/bin/python benchmarks/ray_cpu_share.py --hidden 512 --layers 6 --seq 512     # ~2 min on 2 cores

recalibrate_vs_peers.py finds the same DeepSpeed train_step 7-11% slower inside Ray Train than under
torchrun. This runs recalibrate() once (local Ray, ZeRO-2, --workers CPU workers of 1 thread) while a thread
samples every process of the Ray session (psutil, every 0.2 s), and rank 0's metrics sink writes a
timestamp per step. Over the steady steps (after --skip) it prints the CPU seconds of each kind of
process: the two ranks (RayTrainWorker), the Train controller and its helper actors, the raylet, the
GCS, the dashboard and its agents, the driver, and what they take of the box's cores; then the helper
actors one by one (by their `ray::` process title: idle pooled workers show as `ray::IDLE`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from recalibrate_step_time import shape_arguments  # noqa: E402  (benchmarks/ is on sys.path above)


class StepClock:
    """Metrics sink for rank 0: appends `step wall-time` to a file each logged step."""

    def __init__(self, path: str):
        self.path = path

    def log_metrics(self, metrics, step):
        with open(self.path, "a") as f:
            f.write(f"{step} {time.time()}\n")


RANKS = "ranks (RayTrainWorker)"
HELPERS = "Train controller + helper actors"


def kind(p: psutil.Process) -> str | None:
    """The kind of a Ray session process, or None for a process outside it."""
    try:
        cmd = " ".join(p.cmdline())
        name = p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if p.pid == os.getpid():
        return "driver (this process)"
    if "RayTrainWorker" in cmd or "RayTrainWorker" in name:
        return RANKS
    if name.startswith("ray::") or cmd.startswith("ray::"):
        return HELPERS
    if "raylet" in name:
        return "raylet"
    if "gcs_server" in name:
        return "gcs_server"
    if "ray" in cmd and ("dashboard" in cmd or "agent" in cmd or "log_monitor" in cmd or "monitor.py" in cmd):
        return "dashboard, agents, log monitor"
    if "default_worker.py" in cmd or "ray/_private/workers" in cmd:
        return "idle Ray workers"
    return None


def title(p: psutil.Process) -> str:
    """A Ray worker's process title (`ray::TrainController.run`, `ray::IDLE`, ...)."""
    try:
        return p.name() if p.name().startswith("ray::") else p.cmdline()[0].split()[0]
    except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
        return "?"


def sample(samples: list, stop: threading.Event) -> None:
    """[(time, {pid: (kind, title, user+system CPU seconds)})] every 0.2 s."""
    while not stop.is_set():
        now, seen = time.time(), {}
        for p in psutil.process_iter():
            k = kind(p)
            if k is None:
                continue
            try:
                t = p.cpu_times()
                seen[p.pid] = (k, title(p) if k == HELPERS else "", t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        samples.append((now, seen))
        stop.wait(0.2)


def cpu_between(samples, t0: float, t1: float, by_title: bool = False) -> dict[str, float]:
    """CPU seconds per kind (or per helper actor's title) between the samples nearest t0 and t1
    (pids alive in both)."""
    a = min(samples, key=lambda s: abs(s[0] - t0))[1]
    b = min(samples, key=lambda s: abs(s[0] - t1))[1]
    out: dict[str, float] = {}
    for pid, (k, name, cpu) in b.items():
        if pid in a and (k == HELPERS or not by_title):
            key = name if by_title else k
            out[key] = out.get(key, 0.0) + cpu - a[pid][2]
    return out


def main() -> int:
    p = shape_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=10, skip=2)
    p.set_defaults(hidden=512, layers=6, seq=512)
    args = p.parse_args()
    import ray

    from drope_ops.data import DataConfig
    from drope_ops.debugmodel import make_debug_checkpoint
    from workflows.recalibrate.config import RecalibrateConfig
    from workflows.recalibrate.launch import recalibrate

    tmp = tempfile.mkdtemp(prefix="bench-raycpu-")
    ckpt = str(make_debug_checkpoint(f"{tmp}/ckpt", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                     num_hidden_layers=args.layers, max_position_embeddings=args.seq))
    cfg = RecalibrateConfig(steps=args.steps, global_batch=args.global_batch, micro_batch=args.micro_batch,
                            num_workers=args.workers, zero_stage=2, checkpoint_every=args.steps, max_failures=0, lr=1e-3,
                            warmup_steps=1, loss_spike_factor=None)
    data = DataConfig(source="shakespeare", seq_len=args.seq,
                      max_tokens=(args.steps + 2) * args.global_batch * args.seq)
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=sample, args=(samples, stop), daemon=True)
    ray.init(num_cpus=4, include_dashboard=None, dashboard_host="127.0.0.1", address="local", log_to_driver=False)
    sampler.start()
    clock = f"{tmp}/steps.txt"
    try:
        recalibrate(cfg, data, ckpt, f"{tmp}/out", run_name="raycpu", storage_path=f"{tmp}/storage",
                    metrics_sink=StepClock(clock))
    finally:
        stop.set()
        sampler.join()
        ray.shutdown()
    stamps = {int(s): float(t) for s, t in (line.split() for line in Path(clock).read_text().splitlines())}
    t0, t1 = stamps[args.skip], stamps[args.steps]
    wall, cores = t1 - t0, psutil.cpu_count()
    used = cpu_between(samples, t0, t1)
    total = sum(used.values())
    print(f"model: hidden {args.hidden}, {args.layers} layers, seq {args.seq}; steps {args.skip + 1}-{args.steps} "
          f"({wall:.1f} s wall, {wall / (args.steps - args.skip):.2f} s a step); {cores} cores "
          f"({cores * wall:.1f} CPU-s available); load average {os.getloadavg()[0]:.2f}")
    print(f"\n| process | CPU-s | share of the Ray session's CPU | cores busy |\n|---|---|---|---|")
    for k, v in sorted(used.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.2f} | {v / total:.1%} | {v / wall:.2f} |")
    helpers = cpu_between(samples, t0, t1, by_title=True)
    print(f"\n| {HELPERS}, one by one | CPU-s | cores busy |\n|---|---|---|")
    for name, v in sorted(helpers.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {v:.2f} | {v / wall:.3f} |")
    others = total - used.get(RANKS, 0.0)
    print(f"\nnot the ranks: {others:.2f} CPU-s = {others / (cores * wall):.1%} of the box's cores over the steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
