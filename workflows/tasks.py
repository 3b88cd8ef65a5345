"""Independent units of work (temperature fits, evaluation groups) run as Ray tasks or right here.

    results = run_units(fit_one_length, [(ckpt, data, 2.0, cfg), ...], cpus=2, on_result=print)

With Ray initialised every unit is a Ray task asking for `cpus` CPUs, `gpus` GPUs and `memory` bytes,
and its body sets torch's threads to its CPU share (Ray reuses worker processes across tasks of other
sizes); results arrive as they finish (on_result sees each one) and come back in the units' order.
Without Ray the units run one after another in this process. A DropeError raised in a task comes
back as itself (Ray re-raises the task's exception object).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

from drope_ops.errors import SpecError
from drope_ops.hardware import run_with_cpus
from workflows.ray_errors import raised

RESOURCE_WAIT_S = 60.0
"""How long a request the cluster cannot place yet may wait for nodes (an autoscaler adding them);
DROPE_RESOURCE_WAIT_S overrides it."""


def ray_is_up() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def task_device(gpus: float) -> str:
    """Where a task given `gpus` GPUs puts its model: its GPU (Ray sets CUDA_VISIBLE_DEVICES to it), or
    the CPU for a CPU task."""
    import torch

    return "cuda" if gpus and torch.cuda.is_available() else "cpu"


def task_options(cpus: float, gpus: float = 0, memory: int | None = None) -> dict:
    """The Ray resources of one unit: CPUs, GPUs and (if given) memory in bytes."""
    options = {"num_cpus": cpus, "num_gpus": gpus}  # default retries: a unit on a lost node reruns
    if memory:
        options["memory"] = int(memory)
    return options


def node_capacity(ray) -> list[dict]:
    """Each alive node's total resources (CPU, GPU, memory)."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def placeable(per_task: dict, count: int, nodes: list[dict]) -> int:
    """How many of `count` tasks needing `per_task` resources ({"CPU": 2, "GPU": 1, "memory": B}) the
    nodes can hold at once (each task on one node)."""
    fits = 0
    for node in nodes:
        per_node = min((int(node.get(k, 0) // v) for k, v in per_task.items() if v), default=count)
        fits += per_node
    return min(fits, count)


def units_at_once(count: int, *, cpus: float, gpus: float = 0, memory: int | None = None) -> int:
    """How many of `count` units of `cpus` CPUs, `gpus` GPUs and `memory` bytes run at once: as many as
    the Ray cluster's alive nodes hold now, or 1 without Ray (they run one after another here)."""
    if not ray_is_up():
        return 1
    import ray

    return placeable({"CPU": cpus, "GPU": gpus, "memory": memory or 0}, count, node_capacity(ray))


def require_resources(what: str, per_task: dict, count: int = 1, wait_s: float | None = None) -> None:
    """Fail with one line, within `wait_s`, when the cluster cannot place `count` x `per_task` at once
    (Ray would otherwise wait forever for an infeasible request)."""
    import ray

    if wait_s is None:
        wait_s = float(os.environ.get("DROPE_RESOURCE_WAIT_S", RESOURCE_WAIT_S))
    deadline = time.monotonic() + wait_s
    while True:
        nodes = node_capacity(ray)
        if placeable(per_task, count, nodes) >= count:
            return
        if time.monotonic() > deadline:
            have = {k: sum(n.get(k, 0) for n in nodes) for k in per_task}
            shown = _show({k: v for k, v in per_task.items() if v})
            raise SpecError(f"{what}: needs {count} x ({shown}) at once, but the Ray cluster's {len(nodes)} nodes hold "
                            f"{_show(have)} (waited {wait_s:.0f}s for more); lower the request or add nodes")
        time.sleep(2)


def _show(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" if k != "memory" else f"memory {v / 2**30:.1f} GiB" for k, v in resources.items())


def run_units(fn: Callable, units: Sequence[tuple], *, cpus: float = 1, gpus: float = 0,
              memory: int | None = None, on_result: Callable | None = None, what: str = "a task") -> list:
    """[fn(*unit) for unit in units], as Ray tasks where Ray is up; `on_result(result)` per finish.
    `what` names the spec fields that size a unit, for the one-line error when no node can hold one."""
    if not ray_is_up():
        results = []
        for unit in units:
            results.append(fn(*unit))
            if on_result:
                on_result(results[-1])
        return results
    import ray

    require_resources(what, {"CPU": cpus, "GPU": gpus, "memory": memory or 0})
    task = ray.remote(run_with_cpus).options(**task_options(cpus, gpus, memory))
    pending = {task.remote(cpus, fn, *unit): i for i, unit in enumerate(units)}
    results: list = [None] * len(units)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        try:
            results[i] = ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise raised(e) from None
        if on_result:
            on_result(results[i])
    return results
