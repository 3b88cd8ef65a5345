"""Resumable S3 downloads: ranged GETs on a thread pool into sparse part files, with a journal.

boto3's transfer manager parallelises the same way but cannot resume a half-written file, and
multi-GB shards are exactly what gets interrupted. Here each object is cut into chunks fetched as
`Range: bytes=a-b` GETs (concurrently, across all files); every MiB written appends a line
"CHUNK_INDEX BYTES_DONE" to `NAME.drope-part.chunks`, so after a kill the next call asks only for the
bytes that never landed. A finished file is sha256-checked before it gets its final name.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from tqdm.auto import tqdm

from drope_ops import manifest as mf
from drope_ops import storage_base


class RangedDownload:
    """Ranged, journaled, concurrent GETs of several objects into sparse part files.

    Journal `NAME.drope-part.chunks`: one line "CHUNK_INDEX BYTES_DONE" after every PIECE written, so a
    kill wastes at most one piece per in-flight request.
    """

    PIECE = 1 << 20

    def __init__(self, uri: str, files: dict, stage: Path, stats, on_chunk=None, *, chunk: int,
                 concurrency: int):
        """files: the manifest's table (name -> sha256, size); stats: a TransferStats to add to."""
        self.uri, self.files, self.stage, self.stats, self.on_chunk = uri, files, stage, stats, on_chunk
        self.chunk, self.concurrency = chunk, concurrency
        self.bucket, self.base = storage_base.split_s3(uri)
        self.client = storage_base.s3_client(max_pool_connections=concurrency * 2)
        self.lock = threading.Lock()
        self.remaining: dict[str, int] = {}
        self.journals: dict[str, int] = {}  # rel -> O_APPEND fd (unbuffered: a line is on disk or not)
        self.bad: list[str] = []
        self.bar = None

    def _paths(self, rel: str) -> tuple[Path, Path, Path]:
        out = self.stage / rel
        return out, out.with_name(out.name + ".drope-part"), out.with_name(out.name + ".drope-part.chunks")

    def run(self, rels: list[str], progress: bool = False) -> list[str]:
        jobs, todo_bytes = [], 0
        for rel in rels:
            size = self.files[rel]["size"]
            out, part, journal = self._paths(rel)
            out.parent.mkdir(parents=True, exist_ok=True)
            done: dict[int, int] = {}
            if part.exists() and journal.exists() and part.stat().st_size == size:
                for line in journal.read_text().split("\n")[:-1]:  # a torn last line is ignored
                    i, _, n = line.partition(" ")
                    if i.isdigit() and n.isdigit():
                        done[int(i)] = max(done.get(int(i), 0), int(n))
            else:
                with open(part, "wb") as f:
                    f.truncate(size)  # sparse; chunks land at their offsets
                journal.write_text("")
            chunks = []
            for i in range(max(1, -(-size // self.chunk))):
                length = min(self.chunk, size - i * self.chunk)
                if done.get(i, 0) < length or (size == 0 and i not in done):
                    chunks.append((rel, i, done.get(i, 0)))
                    todo_bytes += length - done.get(i, 0)
            self.remaining[rel] = len(chunks)
            self.journals[rel] = os.open(journal, os.O_WRONLY | os.O_APPEND)
            jobs += chunks
            if not chunks:
                self._finish(rel)
        self.bar = tqdm(total=todo_bytes, unit="B", unit_scale=True, desc="download", disable=not progress)
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="drope-get")
        try:
            futures = [pool.submit(self._get_chunk, *job) for job in jobs]
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in finished:
                if f.exception() is not None:
                    raise f.exception()
        finally:  # on any error or Ctrl-C: drop queued chunks; what landed is in the journals
            pool.shutdown(wait=True, cancel_futures=True)
            self.bar.close()
            for fd in self.journals.values():
                os.close(fd)
            self.journals.clear()
        return self.bad

    def _get_chunk(self, rel: str, i: int, already: int) -> None:
        size = self.files[rel]["size"]
        start, end = i * self.chunk + already, min(size, (i + 1) * self.chunk) - 1
        _, part, _ = self._paths(rel)
        key = f"{self.base}/{rel}" if self.base else rel
        got = 0
        if start <= end:
            resp = storage_base.s3_call(self.uri, self.client.get_object, Bucket=self.bucket, Key=key,
                                    Range=f"bytes={start}-{end}")
            fd = os.open(part, os.O_WRONLY)
            try:
                for piece in resp["Body"].iter_chunks(self.PIECE):
                    os.pwrite(fd, piece, start + got)
                    got += len(piece)
                    with self.lock:
                        os.write(self.journals[rel], f"{i} {already + got}\n".encode())
                        self.stats.bytes += len(piece)
                    self.bar.update(len(piece))
                    if self.on_chunk:
                        self.on_chunk(len(piece))
            finally:
                os.close(fd)
        with self.lock:
            if size == 0:
                os.write(self.journals[rel], f"{i} 0\n".encode())
            self.remaining[rel] -= 1
            last = self.remaining[rel] == 0
        if last:
            self._finish(rel)

    def _finish(self, rel: str) -> None:
        _, part, journal = self._paths(rel)
        ok = mf.sha256_file(part) == self.files[rel]["sha256"]
        with self.lock:
            if rel in self.journals:
                os.close(self.journals.pop(rel))
            journal.unlink(missing_ok=True)
            if ok:
                os.replace(part, self.stage / rel)
                self.stats.files += 1
            else:
                part.unlink()
                self.bad.append(rel)
