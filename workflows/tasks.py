"""Independent units of work (temperature fits, evaluation groups) run as Ray tasks or right here.

    results = run_units(fit_one_length, [(ckpt, data, 2.0, cfg), ...], cpus=2, on_result=print)

With Ray initialised every unit is a Ray task asking for `cpus` CPUs, `gpus` GPUs and `memory` bytes,
and its body sets torch's threads to its CPU share (Ray reuses worker processes across tasks of other
sizes); results arrive as they finish (on_result sees each one) and come back in the units' order.
Without Ray the units run one after another in this process. A DropeError raised in a task comes
back as itself (Ray re-raises the task's exception object).
"""

from __future__ import annotations

from typing import Callable, Sequence

from drope_ops.hardware import run_with_cpus


def ray_is_up() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def run_units(fn: Callable, units: Sequence[tuple], *, cpus: float = 1, gpus: float = 0,
              memory: int | None = None, on_result: Callable | None = None) -> list:
    """[fn(*unit) for unit in units], as Ray tasks where Ray is up; `on_result(result)` per finish."""
    if not ray_is_up():
        results = []
        for unit in units:
            results.append(fn(*unit))
            if on_result:
                on_result(results[-1])
        return results
    import ray

    options = {"num_cpus": cpus, "num_gpus": gpus}  # default retries: a unit on a lost node reruns
    if memory:
        options["memory"] = int(memory)
    task = ray.remote(run_with_cpus).options(**options)
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
            raise (e.cause if e.cause is not None else e) from None
        if on_result:
            on_result(results[i])
    return results
