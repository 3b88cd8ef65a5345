"""The run ledger: one JSON record per stage under the run's storage, the heart of resume.

    {run_uri}/run.json               run id, spec name, MLflow parent run id, attempts
    {run_uri}/spec.yaml              the resolved spec of the latest attempt
    {run_uri}/ledger/{stage}.json    status, fingerprint, output URI, attempts, timings, MLflow run id

Writes go through drope_ops.storage.write_bytes (local: temp file + rename; S3: one PUT), so a record
is always whole. A stage is skipped on resume exactly when its record says succeeded with the same
fingerprint; the fingerprint hashes the stage's resolved spec and its inputs' fingerprints, so a
changed spec invalidates that stage and everything downstream of it, and nothing upstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from drope_ops import storage
from drope_ops.errors import DropeError

PENDING, RUNNING, SUCCEEDED, FAILED, KILLED = "pending", "running", "succeeded", "failed", "killed"


def fingerprint(stage: str, stage_spec: dict, input_fingerprints: list[str]) -> str:
    payload = json.dumps({"stage": stage, "spec": stage_spec, "inputs": input_fingerprints}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class StageRecord:
    stage: str
    status: str = PENDING
    fingerprint: str = ""
    output: str = ""
    """URI of what the stage produced (a checkpoint, a results directory)."""
    result: dict = field(default_factory=dict)
    """Small JSON facts downstream stages and `drope status` use (betas, c, final loss, tables)."""
    attempts: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    mlflow_run_id: str = ""
    model_id: str = ""
    """MLflow LoggedModel id of the checkpoint this stage produced (lineage)."""
    error: str = ""

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.time()) - self.started_at


class Ledger:
    def __init__(self, run_uri: str, guard: Callable[[], None] | None = None):
        self.run_uri = run_uri
        self.guard = guard  # called before every write (the driver's RunLease.check): raises once the run is lost

    def _write(self, uri: str, body: bytes) -> None:
        if self.guard is not None:
            self.guard()
        storage.write_bytes(uri, body)

    # -- run-level --------------------------------------------------------------------------------
    def _run_path(self) -> str:
        return storage.join(self.run_uri, "run.json")

    def exists(self) -> bool:
        return storage.exists(self._run_path())

    def read_run(self) -> dict:
        if not self.exists():
            raise DropeError(f"no run at {self.run_uri}: check the run id with `drope status` or the storage root")
        return json.loads(storage.read_bytes(self._run_path()))

    def write_run(self, run: dict) -> None:
        self._write(self._run_path(), json.dumps(run, indent=1, sort_keys=True).encode())

    def create_run(self, run: dict) -> bool:
        """Write run.json only where there is none (two `drope run --run-id X` at once: one record).
        Local: a whole temp file hard-linked into place; S3: put_object(IfNoneMatch="*")."""
        body = json.dumps(run, indent=1, sort_keys=True).encode()
        path = self._run_path()
        if storage.is_s3(path):
            from botocore.exceptions import ClientError

            bucket, key = storage.split_s3(path)
            try:
                storage.s3_client().put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in ("PreconditionFailed", "412", "409",
                                                                      "ConditionalRequestConflict"):
                    return False
                raise storage.s3_error(e, path) from None
            return True
        tmp = storage.join(self.run_uri, f".run.json.{os.getpid()}.tmp")
        storage.write_bytes(tmp, body)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def update_run(self, **fields) -> dict:
        """Read-modify-write of run.json: only `fields` change, so another writer's fields (a
        submission's id from `drope submit`) are kept. The driver writes under the run's lease."""
        run = self.read_run() if self.exists() else {}
        run.update(fields)
        self.write_run(run)
        return run

    def write_spec(self, spec_yaml: str) -> None:
        self._write(storage.join(self.run_uri, "spec.yaml"), spec_yaml.encode())

    def read_spec(self) -> str:
        return storage.read_bytes(storage.join(self.run_uri, "spec.yaml")).decode()

    # -- stage records ----------------------------------------------------------------------------
    def _stage_path(self, stage: str) -> str:
        return storage.join(self.run_uri, "ledger", f"{stage}.json")

    def get(self, stage: str) -> StageRecord:
        path = self._stage_path(stage)
        if not storage.exists(path):
            return StageRecord(stage=stage)
        return StageRecord(**json.loads(storage.read_bytes(path)))

    def put(self, record: StageRecord) -> None:
        self._write(self._stage_path(record.stage), json.dumps(asdict(record), indent=1, sort_keys=True).encode())

    def records(self, stages: list[str]) -> list[StageRecord]:
        return [self.get(s) for s in stages]

    def should_skip(self, stage: str, fp: str) -> StageRecord | None:
        """The succeeded record to reuse, or None when the stage must run (again)."""
        rec = self.get(stage)
        if rec.status == SUCCEEDED and rec.fingerprint == fp:
            return rec
        return None

    def start(self, stage: str, fp: str, mlflow_run_id: str) -> StageRecord:
        prev = self.get(stage)
        rec = StageRecord(
            stage=stage, status=RUNNING, fingerprint=fp, attempts=prev.attempts + 1,
            started_at=time.time(), mlflow_run_id=mlflow_run_id,
        )
        self.put(rec)
        return rec

    def finish(self, rec: StageRecord, status: str, *, output: str = "", result: dict | None = None,
               error: str = "", model_id: str = "") -> StageRecord:
        rec.status, rec.ended_at, rec.error = status, time.time(), error
        rec.output = output or rec.output
        rec.result = result if result is not None else rec.result
        rec.model_id = model_id or rec.model_id
        self.put(rec)
        return rec
