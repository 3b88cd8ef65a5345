"""The next batch tokenized and packed in a background thread while the current step runs.

    sampler = Prefetcher(make_sampler(cfg, tokenizer, seq_len, global_batch=512, rank=r, world=W))
    sampler.load_state_dict(saved)   # a resume: before or after batches were taken
    x = sampler.next_batch()         # waits only when the thread is behind
    state = sampler.state_dict()     # the position after the batches taken, never the prefetched ones
    sampler.close()                  # stops the thread (also on `with Prefetcher(...) as sampler:`)

Once its thread runs, only the thread advances the sampler. Each batch travels with the sampler's
state and epoch taken right after it was made, so a checkpoint records exactly the batches training
consumed, and a resume continues with the first batch it had not (prefetched ones are made again).
An exception in the thread (a source that ran out, a read error) is raised by the next_batch that
would have returned that batch, and by every call after it.
"""

from __future__ import annotations

import queue
import threading
import time

BATCH_WAIT_S = 900.0
"""Longest a step waits for its batch before it fails naming the data source (a stalled read)."""
STOP_WAIT_S = 120.0
"""Longest close() waits for the thread to finish the batch it is making."""


class Prefetcher:
    """A sampler's face (next_batch, state_dict, load_state_dict, epoch) that keeps `depth` batches
    ready in a bounded queue, made by a daemon thread started at the first next_batch."""

    def __init__(self, sampler, depth: int = 1):
        if depth < 1:
            raise ValueError(f"depth={depth}: a prefetcher keeps at least one batch ready")
        self.sampler, self.depth = sampler, depth
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._ahead = False  # the sampler has made batches that were not taken (rewound before a restart)
        self._state, self._epoch = sampler.state_dict(), getattr(sampler, "epoch", 0)

    @property
    def epoch(self) -> int:
        """The sampler's epoch after the latest batch taken (what the training loop logs)."""
        return self._epoch

    def next_batch(self):
        """The next batch in the sampler's order; raises what the thread raised making it."""
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._start()
        item = self._take()
        if isinstance(item, BaseException):
            self._error = item
            raise item
        batch, self._state, self._epoch = item
        return batch

    def _take(self):
        """The next item of the queue, or an error when none comes within BATCH_WAIT_S."""
        deadline = time.monotonic() + BATCH_WAIT_S
        while True:
            try:
                return self._queue.get(timeout=min(1.0, BATCH_WAIT_S))
            except queue.Empty:
                if not self._thread.is_alive():
                    return RuntimeError("the data prefetch thread ended without a batch or an error")
                if time.monotonic() > deadline:
                    return TimeoutError(f"no batch from the data source within {BATCH_WAIT_S:.0f} s: a read of "
                                        f"data.source is stalled (check that it is reachable)")

    def state_dict(self) -> dict:
        """The sampler's state after the batches taken so far (to save with a checkpoint)."""
        return self._state

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state: the thread stops, prefetched batches are dropped."""
        self.close()
        self.sampler.load_state_dict(state)
        self._ahead, self._error = False, None
        self._state, self._epoch = self.sampler.state_dict(), getattr(self.sampler, "epoch", 0)

    def close(self) -> None:
        """Stop the thread (waiting for a batch it is making); a later next_batch restarts it where
        the batches taken end."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=STOP_WAIT_S)
        if self._thread.is_alive():  # stuck in a read: it must not touch the sampler after a restart
            raise TimeoutError(f"the data prefetch thread did not stop within {STOP_WAIT_S:.0f} s: a read of "
                               f"data.source is stalled (check that it is reachable)")
        self._thread, self._queue, self._ahead = None, None, True

    def _start(self) -> None:
        if self._ahead:
            self.sampler.load_state_dict(self._state)
            self._ahead = False
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(target=self._make_batches, args=(self._queue, self._stop),
                                        name="drope-prefetch", daemon=True)
        self._thread.start()

    def _make_batches(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                batch = self.sampler.next_batch()
                if not _put(out, (batch, self.sampler.state_dict(), getattr(self.sampler, "epoch", 0)), stop):
                    return
        except BaseException as e:  # handed to the training loop, which raises it
            _put(out, e, stop)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put item once there is room; False when stopped first."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False
