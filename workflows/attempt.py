"""One attempt of one stage, as the driver books it: the stage's ledger record (what resume reads) and
its MLflow child run (what people browse) start together and end together, in the same status.

    attempt = StageAttempt.start(books, stage, inputs, params, fp)
    result = <run stage.run(spec, attempt.context()) as a Ray task>
    record = attempt.succeed(result)      # or attempt.fail(err) / attempt.killed(err), then raise

workflows/pipeline.py holds the order of the stages; this module holds every paired ledger + tracking
call a stage costs, so neither half can be forgotten on one path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from drope_ops import storage
from drope_ops.errors import one_line
from workflows.ledger import FAILED, KILLED, SUCCEEDED, Ledger, StageRecord
from workflows.stage import Stage, StageContext


@dataclass
class RunBooks:
    """What every attempt of a workflow run writes to: the run's ledger and its MLflow parent run."""

    spec: object
    run_id: str
    run_uri: str
    ledger: Ledger
    tracker: object
    parent: str
    """The MLflow parent run's id."""


@dataclass
class StageAttempt:
    books: RunBooks
    stage: Stage
    inputs: dict
    """Upstream stage name (or role) -> its StageRecord."""
    fingerprint: str
    record: StageRecord
    child: str
    """The stage's MLflow child run id."""
    output: str
    started: float = field(default_factory=time.time)

    @classmethod
    def start(cls, books: RunBooks, stage: Stage, inputs: dict, params: dict, fp: str) -> StageAttempt:
        """Open the MLflow child run (the stage's spec sections as its params) and the ledger record."""
        number = books.ledger.get(stage.name).attempts + 1
        child = books.tracker.start_stage(books.parent, books.run_id, stage.name, number, params)
        record = books.ledger.start(stage.name, fp, child)
        output = storage.join(books.run_uri, "stages", stage.name, fp[:12])
        print(f"[drope] {stage.name}: running (attempt {record.attempts}) -> {output}", flush=True)
        return cls(books, stage, inputs, fp, record, child, output)

    def context(self) -> StageContext:
        """What the stage's run(spec, ctx) is handed: URIs, facts and model ids, never Python objects."""
        return StageContext(run_id=self.books.run_id, run_uri=self.books.run_uri, fingerprint=self.fingerprint,
                            output=self.output, sink=self.books.tracker.sink(self.child),
                            inputs={k: v.output for k, v in self.inputs.items()},
                            input_results={k: v.result for k, v in self.inputs.items()},
                            input_models={k: v.model_id for k, v in self.inputs.items()})

    def succeed(self, result: dict) -> StageRecord:
        """Register what the stage wrote, log its facts (its headline on the parent run too), end both."""
        tracker = self.books.tracker
        model_id = self._register_outputs()
        tracker.log_metrics(self.child, {k: v for k, v in result.items() if isinstance(v, (int, float))})
        tracker.log_metrics(self.books.parent, result.get("headline") or {})  # columns of the runs list
        self._end(SUCCEEDED, output=self.output, result=result, model_id=model_id)
        print(f"[drope] {self.stage.name}: succeeded in {time.time() - self.started:.0f}s", flush=True)
        return self.books.ledger.get(self.stage.name)

    def fail(self, err: BaseException) -> None:
        """The stage raised `err` (unwrapped from Ray's): both records FAILED with its one line."""
        self._end_with(FAILED, err)

    def killed(self, err: BaseException) -> None:
        """Ctrl-C or SIGTERM while the stage ran: both records KILLED."""
        self._end_with(KILLED, err)

    def _end_with(self, status: str, err: BaseException) -> None:
        msg = one_line(err)
        self._end(status, error=msg)
        print(f"[drope] {self.stage.name}: {status.upper()} after {time.time() - self.started:.0f}s: {msg}", flush=True)

    def _register_outputs(self) -> str:
        """The stage's checkpoint as an MLflow LoggedModel (lineage to its parent model) and the dataset it
        read; returns the model id ('' for a stage that writes no model)."""
        spec, stage, tracker = self.books.spec, self.stage, self.books.tracker
        if stage.dataset_context:
            tracker.log_dataset(self.child, spec.data.source, spec.data.source, self.fingerprint, stage.dataset_context)
        if not stage.logged_model:
            return ""
        parent_model = next((r.model_id for r in self.inputs.values() if r.model_id), "")
        return tracker.register_checkpoint(
            self.child, stage.logged_model, self.output, fingerprint=self.fingerprint, parent_model_id=parent_model,
            data=spec.data.source if stage.dataset_context else "",
            extra={"stage": stage.name, "run_id": self.books.run_id})

    def _end(self, status: str, **fields) -> None:
        """The ledger record and the MLflow run end together, in the same status (the MLflow run also when
        the ledger refuses the write: this driver lost the run's lease)."""
        tracker = self.books.tracker
        try:
            self.books.ledger.finish(self.record, status, **fields)
        finally:
            tracker.end_run(self.child, status, error=fields.get("error", ""))
        try:  # the next successful call replays what the stage buffered during a tracking outage
            tracker.replay_buffered(patient=False)
        except Exception as e:
            print(f"[drope] buffered metrics not replayed yet ({one_line(e)}): `drope resume` replays them", flush=True)
