"""One driver per run: a lease on the run, kept in the run's storage at {run_uri}/lease.json.

    {"holder": "host:pid", "host": ..., "pid": ..., "since": ..., "expires_at": ..., "token": ...}

Taking it is one atomic step: on S3 a conditional write, put_object(IfNoneMatch="*"); locally a
check-and-write under an fcntl lock of lease.json.lock. A heartbeat thread renews it every TTL/4
(DROPE_LEASE_TTL_S, default 60 s; on S3 put_object(IfMatch=etag)), so a lease lasts only as long as
its driver: a dead driver's lease expires after TTL (at once when it was on this host and its pid is
gone) and the next driver takes it over (on S3 with IfMatch on the expired lease's etag, so only one
of several wins). `--take-over` replaces a live lease: the old driver's heartbeat sees a token not its
own and says so.
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from drope_ops import storage
from drope_ops.errors import DropeError

LEASE_NAME = "lease.json"


def lease_ttl_s() -> float:
    return float(os.environ.get("DROPE_LEASE_TTL_S", "60"))


def _holder_gone(held: dict) -> bool:
    """A holder on this host whose process is gone (killed -9) holds nothing: no need to wait for expiry."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RunBusy(DropeError):
    """Another driver holds the run's lease."""


class LeaseLost(DropeError):
    """This driver's lease was taken over: it stops its stage work and writes nothing more to the ledger."""


class RunLease:
    def __init__(self, run_uri: str, run_id: str, ttl_s: float | None = None):
        self.uri = storage.join(run_uri, LEASE_NAME)
        self.run_id = run_id
        self.ttl_s = ttl_s or lease_ttl_s()
        self.token = secrets.token_hex(8)
        self.since = time.time()
        self.lost = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        host, pid = socket.gethostname(), os.getpid()
        return json.dumps({"holder": f"{host}:{pid}", "host": host, "pid": pid, "since": self.since,
                           "expires_at": time.time() + self.ttl_s, "token": self.token, "run_id": self.run_id}).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        """(lease, etag) or (None, None) when there is none."""
        if storage.is_s3(self.uri):
            from botocore.exceptions import ClientError

            bucket, key = storage.split_s3(self.uri)
            try:
                resp = storage.s3_client().get_object(Bucket=bucket, Key=key)
            except ClientError as e:
                if storage.is_missing(e):
                    return None, None
                raise storage.s3_error(e, self.uri) from None
            return json.loads(resp["Body"].read()), resp["ETag"]
        try:
            return json.loads(Path(self.uri).read_text()), None
        except FileNotFoundError:
            return None, None
        except ValueError:  # a lease being written this instant: treat it as held, briefly
            return {"holder": "?", "since": time.time(), "expires_at": time.time() + 5}, None

    def _create(self, if_match: str | None = None) -> bool:
        """S3: atomically write our lease where there is none (or where the etag still is if_match)."""
        from botocore.exceptions import ClientError

        bucket, key = storage.split_s3(self.uri)
        cond = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        try:
            storage.s3_client().put_object(Bucket=bucket, Key=key, Body=self._body(), **cond)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise storage.s3_error(e, self.uri) from None
        return True

    # -- acquire, renew, release --------------------------------------------------------------------
    def acquire(self, take_over: bool = False) -> "RunLease":
        if not storage.is_s3(self.uri):
            with self._local_lock():  # check-and-write as one step among this filesystem's drivers
                held, _ = self._read()
                if held is not None and not take_over and not self._free(held):
                    raise RunBusy(self._busy_line(held))
                storage.write_bytes(self.uri, self._body())
            return self._start_heartbeat()
        for _ in range(5):
            if self._create():
                return self._start_heartbeat()
            held, etag = self._read()
            if held is None:
                continue  # released between our create and read: try again
            if not take_over and not self._free(held):
                raise RunBusy(self._busy_line(held))
            if self._create(if_match=etag):  # only one of several drivers taking it over wins
                return self._start_heartbeat()
        raise RunBusy(f"run {self.run_id}: could not take its lease {self.uri} (other drivers keep taking it); "
                      "check `drope status` and try again")

    @staticmethod
    def _free(held: dict) -> bool:
        return held.get("expires_at", 0) <= time.time() or _holder_gone(held)

    @contextlib.contextmanager
    def _local_lock(self):
        path = Path(self.uri + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _busy_line(self, held: dict) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("since", 0)))
        left = max(0, held.get("expires_at", 0) - time.time())
        return (f"run {self.run_id} is being driven by {held.get('holder', '?')} (host {held.get('host', '?')}, "
                f"pid {held.get('pid', '?')}) since {since}: wait for it to finish (or stop it), or if that driver "
                f"is gone, its lease {self.uri} expires in {left:.0f}s; `drope resume {self.run_id} --take-over` "
                "takes the run over now")

    def _start_heartbeat(self) -> "RunLease":
        self._thread = threading.Thread(target=self._heartbeat, name="drope-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4) and not self.lost:  # lost found by check(): it raised already
            try:
                self.renew()
            except Exception as e:  # storage briefly unreachable: the next beat tries again
                print(f"[drope] lease {self.uri}: renewal failed ({e}); retrying", flush=True)
            if self.lost:
                print(f"[drope] run {self.run_id}: its lease was taken over by {self.lost}; stopping this "
                      "driver's stage work", flush=True)
                _thread.interrupt_main()  # the driver's ray.get / stage loop stops with KeyboardInterrupt
                return

    def renew(self) -> None:
        if not storage.is_s3(self.uri):
            with self._local_lock():
                return self._renew()
        return self._renew()

    def _renew(self) -> None:
        held, etag = self._read()
        if held is None or held.get("token") != self.token:
            self.lost = self.lost or (held or {}).get("holder", "nobody")
            return
        if storage.is_s3(self.uri):
            self._create(if_match=etag)
        else:
            storage.write_bytes(self.uri, self._body())

    def check(self) -> None:
        """Raise LeaseLost unless this driver still holds the lease (read from storage, not cached): the
        ledger calls it before each write, so a driver that was taken over writes nothing more."""
        if not self.lost:
            held, _ = self._read()
            if held is None or held.get("token") != self.token:
                self.lost = (held or {}).get("holder", "nobody")
        if self.lost:
            raise LeaseLost(self.lost_line())

    def lost_line(self) -> str:
        return (f"run {self.run_id}: another driver ({self.lost}) took over its lease {self.uri}; this driver stopped "
                f"its stage work and wrote nothing more to the ledger: follow the run with `drope status {self.run_id}`")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not storage.is_s3(self.uri):
            with self._local_lock():
                held, _ = self._read()
                if held is not None and held.get("token") == self.token:
                    Path(self.uri).unlink(missing_ok=True)
            return
        held, _ = self._read()
        if held is not None and held.get("token") == self.token:
            bucket, key = storage.split_s3(self.uri)
            storage.s3_call(self.uri, storage.s3_client().delete_object, Bucket=bucket, Key=key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
