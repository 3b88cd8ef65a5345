"""What a stage is to the driver: its facts (`Stage`) and what it is handed (`StageContext`).

Each module in workflows/stages/ ends with `STAGE = Stage(...)`: its name, its `run(spec, ctx)`, the
spec sections that make its fingerprint, the stages it reads, the LoggedModel name of what it
writes and the MLflow dataset it logs. workflows/pipeline.py loops over those and knows no stage
by name; workflows/stages/__init__.py lists them in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

SOURCE = "source"
"""The role of the stage that brings the base checkpoint (fetch, or pretrain in the micro repro)."""
RECALIBRATED = "recalibrate"
"""The checkpoint fit_temperature starts from: the recalibrate stage's output (the role has its name), or
fetch_drope's when model.already_drope skips drop_rope and recalibrate."""


@dataclass
class StageContext:
    run_id: str
    run_uri: str
    fingerprint: str
    output: str
    """Where this stage's output must appear (local dir or s3:// prefix), keyed by its fingerprint."""
    sink: object = None
    """Picklable MLflow sink of the stage's child run: .log_metrics(dict, step), .log_artifact(path)."""
    inputs: dict = field(default_factory=dict)
    """Upstream stage name (or role, e.g. "source") -> output URI."""
    input_results: dict = field(default_factory=dict)
    """Upstream stage name (or role) -> its ledger result facts."""
    input_models: dict = field(default_factory=dict)
    """Upstream stage name (or role) -> the MLflow LoggedModel id of its checkpoint ("" if none), so a
    stage's metrics can name the model they scored."""


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable
    """run(spec: WorkflowSpec, ctx: StageContext) -> dict of small JSON facts for the ledger; it runs
    inside a Ray task, reads its inputs from ctx.inputs (URIs) and publishes its output at ctx.output.
    A "headline" entry ({metric key: number}) is logged on the workflow's parent run as well, so it
    is a column of MLflow's runs list."""
    sections: tuple[str, ...]
    """Spec sections (dotted paths) whose values make the stage's fingerprint."""
    inputs: tuple[str, ...] = ()
    """Upstream stages (or roles) whose outputs it reads."""
    role: str = ""
    """A role this stage fills for downstream stages (SOURCE), besides its name."""
    logged_model: str | None = None
    """MLflow LoggedModel name of the checkpoint it writes (None: it writes no model)."""
    dataset_context: str | None = None
    """MLflow dataset context of spec.data it logs as a run input ("training", "validation"), or None."""
    label: str = ""
    """What `drope lineage` calls its output."""
    enabled: Callable = lambda spec: True
    """enabled(spec) -> bool: whether this spec runs the stage at all."""
