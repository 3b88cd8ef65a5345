"""What Ray hands back when work failed elsewhere, unwrapped to the exception that was raised there.

A Ray task's exception arrives wrapped in RayTaskError (the original in `.cause`); Ray Train hands the
driver each worker's exception in WorkerGroupError.worker_failures, and a lost process or node as an
actor error in the chain. Duck-typed: nothing here imports Ray, so the CLI can call it in any process.
"""

from __future__ import annotations

from drope_ops.errors import DropeError


def raised(e: BaseException) -> BaseException:
    """The exception a Ray task raised, as itself (RayTaskError keeps it in `.cause`); `e` otherwise."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def worker_failures(e: BaseException) -> list[BaseException]:
    """The exceptions Ray Train's workers raised (WorkerGroupError.worker_failures), none for others."""
    return list(getattr(e, "worker_failures", {}).values())


def worker_error(e: BaseException) -> DropeError | None:
    """The DropeError a Ray Train worker raised, or None."""
    return next((f for f in worker_failures(e) if isinstance(f, DropeError)), None)


def lost_worker(e: BaseException) -> bool:
    """Whether Ray Train failed because a worker's (or its controller's) process or node went away, not
    because of a bug in the loop (Ray Train wraps those in WorkerGroupError / ControllerError)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError

    lost = (ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError)
    causes = [e, getattr(e, "controller_failure", None), e.__cause__, *worker_failures(e)]
    return any(isinstance(c, lost) for c in causes)
