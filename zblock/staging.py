"""Write-behind: whole-page writes are acknowledged once queued and compressed by a worker.

The kernel hands the server one write to the file at a time, so with synchronous stores the FUSE
path (receiving the request, copying its 1 MiB) and compression take turns on the cores. Queueing
the pages lets the next request arrive while the previous one compresses. Measured with
`dd bs=1M oflag=direct` of 256 MiB through a mount (tests/perf/test_seq.py): see the closing
note of the performance issue and the comment at WRITE_BEHIND_BYTES in store.py.

Invariants:
    * Items are stored in the order they were queued (one worker, FIFO), so a later write to a
      page always wins over an earlier one.
    * `staged[p]` counts queued items covering page p. Anything that reads a page or changes it
      some other way (partial write, discard, read, fsync) first waits until its pages have no
      staged item: `wait_range` / `drain`.
    * At most `limit` bytes wait; `put` blocks beyond that (back-pressure, never unbounded).
    * A store that fails in the worker is not lost: its pages read as EIO until written again
      (`failed`), and its error is raised once by the next `drain` (fsync) or `close`, as a
      disk reports a failed write-back at fsync. Nothing else consumes that error: a read of
      another page must not eat what fsync has to report.

Lock protocol: `_cond` guards the queue, `staged`, `failed`, `_nfailed`, `_queued_bytes`,
`_error` and `_closed`. `wait_range` reads `_queued_bytes` and `_nfailed` without it first: both
are zero only when nothing can be waited for (a put that races it is a concurrent write, which
may land either side of the read). It is
never held while storing (compression, disk I/O).

Not here: byte ranges and partial pages (store.py), compression (cache.py).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

import numpy as np

from . import PAGE_SIZE
from .errors import DataError, ZblockError

log = logging.getLogger(__name__)

WAIT = 600.0    # a stuck worker fails the waiter instead of hanging it forever


class WriteBehind:
    """A bounded FIFO of (first page, bytes) items stored by one worker thread."""

    def __init__(self, store_pages: Callable[[int, bytes], None], npages: int, limit: int,
                 on_idle: Callable[[], None] | None = None):
        self._store_pages = store_pages
        self._on_idle = on_idle         # called by the worker when the queue runs empty
        self.limit = limit
        self.staged = np.zeros(npages, np.uint16)
        self.failed = np.zeros(npages, np.bool_)
        self._nfailed = 0               # pages in `failed`: lets wait_range skip the lock
        self._queue: collections.deque = collections.deque()
        self._queued_bytes = 0
        self._cond = threading.Condition(threading.Lock())
        self._error: BaseException | None = None
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="zblock-write-behind", daemon=True)
        self._worker.start()

    # -- producer side ----------------------------------------------------------------------

    def put(self, page: int, data) -> None:
        """Queue whole pages starting at `page`; blocks while `limit` bytes are waiting."""
        n = len(data) // PAGE_SIZE
        with self._cond:
            if not self._cond.wait_for(lambda: self._queued_bytes < self.limit or self._closed, WAIT):
                raise DataError("write-behind queue stuck: the store worker made no progress")
            if self._closed:
                raise DataError("store is closed")
            self._queue.append((page, data))
            self._queued_bytes += len(data)
            self.staged[page:page + n] += 1
            if self._nfailed:
                self._forget(page, n)               # this write replaces the lost one
            self._cond.notify_all()

    def wait_range(self, first: int, count: int, forget_failed: bool = False) -> None:
        """Return once no queued item covers pages first .. first+count. DataError (EIO) if one
        of them lost a queued write, unless `forget_failed` (a discard: the pages are zeros now)."""
        if not self._queued_bytes and not self._nfailed:
            return                  # nothing queued, nothing lost: the common case, lock-free
        with self._cond:
            if self.staged[first:first + count].any():
                if not self._cond.wait_for(
                        lambda: not self.staged[first:first + count].any() or self._worker_dead(),
                        WAIT):
                    raise DataError("write-behind queue stuck: the store worker made no progress")
            if not self._nfailed:
                return
            if forget_failed:
                self._forget(first, count)
            elif self.failed[first:first + count].any():
                bad = first + int(np.flatnonzero(self.failed[first:first + count])[0])
                raise DataError(f"page {bad}: a queued write to it failed")

    def drain(self) -> None:
        """Return once every queued item is stored; raises the first error a store hit."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._queued_bytes or self._worker_dead(), WAIT):
                raise DataError("write-behind queue stuck: the store worker made no progress")
            self._raise_error()

    def settle(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until the queue is empty, leaving any error for the next writer:
        stats taken after a write then count that write."""
        with self._cond:
            self._cond.wait_for(lambda: not self._queued_bytes or self._worker_dead(), timeout)

    def close(self) -> None:
        """Store what is queued, then stop the worker (bounded join). Idempotent."""
        try:
            self.drain()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._worker.join(timeout=30)
            if self._worker.is_alive():
                log.warning("write-behind worker did not stop within 30 s")

    def _forget(self, first: int, count: int) -> None:
        """Caller holds _cond."""
        self.failed[first:first + count] = False
        self._nfailed = int(np.count_nonzero(self.failed))

    def _raise_error(self) -> None:
        """Caller holds _cond."""
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, ZblockError) or not isinstance(err, Exception):
                raise err           # also a test's Crash (a BaseException): it must go on up
            raise DataError(f"a queued write failed: {err}") from err

    def _worker_dead(self) -> bool:
        return not self._worker.is_alive()

    # -- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return          # closed and empty
                page, data = self._queue[0]
            try:
                self._store_pages(page, data)
            except BaseException as e:      # no worker exception is lost: fsync gets it
                log.error("queued write of %d bytes at page %d failed: %s", len(data), page, e)
                with self._cond:
                    if self._error is None:
                        self._error = e
                    self.failed[page:page + len(data) // PAGE_SIZE] = True
                    self._nfailed = int(np.count_nonzero(self.failed))
            with self._cond:
                self._queue.popleft()
                self._queued_bytes -= len(data)
                n = len(data) // PAGE_SIZE
                self.staged[page:page + n] -= 1
                self._cond.notify_all()
                idle = not self._queue
            del data
            if idle and self._on_idle is not None:
                try:
                    self._on_idle()
                except Exception:
                    log.warning("write-behind idle hook failed", exc_info=True)
