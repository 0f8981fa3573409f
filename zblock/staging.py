"""Write-behind: whole-page writes are acknowledged once queued and stored by workers.

The kernel hands the server one write to the file at a time, so with synchronous stores the FUSE
path (receiving the request, copying its 1 MiB) and compression take turns on the cores. Queueing
the pages lets the next request arrive while the previous ones are stored: two workers, so that
one item's compression or disk write (both without the GIL) runs beside the next item's
(docs/performance.md has the measurements).

4 KiB writes (put_page) are batched: the worker waits up to GATHER after the first for more and
stores up to BATCH_PAGES in one call (Cache.store_pages at their page numbers: one acomp request,
one install). Their compression then runs on the other core while the next write comes in, and
the worker is woken about once per batch, not per write.

Invariants:
    * Items are taken in the order they were queued (FIFO), and an item is taken only when no
      item being stored covers any of its pages (`_busy`), so a later write to a page always
      wins over an earlier one. A batch of one-page items never holds a page twice, and one
      worker at a time gathers and stores such a batch (`_batching`).
    * A worker gathers a batch only while nobody waits for queued pages (`_waiters`).
    * `staged[p]` counts queued items covering page p. Anything that reads a page or changes it
      some other way (partial write, discard, read, fsync) first waits until its pages have no
      staged item: `wait_range` / `drain`.
    * At most `limit` bytes wait; `put` blocks beyond that (back-pressure, never unbounded).
    * A store that fails in the worker is not lost: its pages read as EIO until written again
      (`failed`), and its error is raised once by the next `drain` (fsync) or `close`, as a
      disk reports a failed write-back at fsync. Nothing else consumes that error: a read of
      another page must not eat what fsync has to report.

Lock protocol: `_cond` guards the queue, `_busy`, `_batching`, `staged`, `failed`, `_nfailed`,
`_queued_bytes`, `_singles`, `_idle`, `_big_since_idle`, `_waiters`, `_error` and `_closed`.
`wait_range` reads `_queued_bytes` and `_nfailed` without it first: both are zero only when
nothing can be waited for (a put that races it is a concurrent write, which may land either side
of the read). It is never held while storing (compression, disk I/O).

Not here: byte ranges and partial pages (store.py), compression (cache.py).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Callable

from . import PAGE_SIZE, pagemem, vec
from .errors import DataError, ZblockError

log = logging.getLogger(__name__)

WAIT = 600.0    # a stuck worker fails the waiter instead of hanging it forever
# One-page writes (put_page) are stored in batches of up to BATCH_PAGES: the worker waits up to
# GATHER after the first for the rest. Random 4 KiB writes arrive one at a time (the kernel
# serialises writes to the file) every ~150 us, so a batch holds about ten.
BATCH_PAGES = 32
GATHER = 0.002
# Two workers: LZ4 and the disk write release the GIL, so one item's compression or write runs
# beside the next item's Python (dd of the /usr tar 411-413 -> 652-669 MB/s; a third: no gain).
WORKERS = 2
SCAN_STEP = 1 << 20         # pages failed_pages() looks at a time


class WriteBehind:
    """A bounded FIFO of (first page, bytes) items stored by `workers` threads.

    `store_pages(page, data)` stores an item; `store_scattered(pages, data)` (optional) stores a
    batch of one-page items (put_page) for the page numbers `pages` (a list of ints) in one
    call."""

    def __init__(self, store_pages: Callable[[int, bytes], None], npages: int, limit: int,
                 on_idle: Callable[[], None] | None = None,
                 store_scattered: Callable[[list[int], bytes], None] | None = None,
                 workers: int = WORKERS):
        self._store_pages = store_pages
        self._store_scattered = store_scattered
        self._on_idle = on_idle         # called by the worker when the queue runs empty
        self.limit = limit
        self.staged = pagemem.array(npages, "H")
        self._staged_bytes = self.staged.cast("B")  # for _count and _queued
        self._singles = 0               # one-page items queued (put_page), not yet taken
        self._idle = 0                  # workers waiting for an item they may take
        # items being stored: (first page, end page, the pages of a batch or None for a range)
        self._busy: list[tuple[int, int, frozenset | None]] = []
        self._batching = False          # a worker gathers or stores a batch of one-page items
        self._waiters = 0               # callers waiting for queued pages: no gathering
        self._big_since_idle = False    # a request buffer was stored since the queue last ran empty
        self.failed = pagemem.array(npages, "B")     # 0/1
        self.arrays = (self.staged, self.failed)        # per-page: counted in table_bytes
        self._nfailed = 0               # pages in `failed`: lets wait_range skip the lock
        self._queue: collections.deque = collections.deque()
        self._queued_bytes = 0
        self._lock = lock = threading.Lock()
        self._cond = threading.Condition(lock)      # producers and waiters for queued pages
        self._work = threading.Condition(lock)      # workers waiting for an item or a batch
        self._error: BaseException | None = None
        self._closed = False
        self._workers = [threading.Thread(target=self._run, name=f"zblock-write-behind-{i}",
                                          daemon=True) for i in range(workers)]
        for t in self._workers:
            t.start()

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
            self._count(range(page, page + n), 1)
            if self._nfailed:
                self._forget(page, n)               # this write replaces the lost one
            if self._single((page, data)):
                self._singles += 1
            self._work.notify_all()                 # a gathering worker stops: see _gather

    def put_page(self, page: int, data: bytes) -> None:
        """put() for one page (a 4 KiB write). The worker stores the one-page items queued
        together in one batch (store_scattered): it waits up to GATHER after the first for up
        to BATCH_PAGES of them, so that neither the compression nor a wake-up of the worker
        is paid on every write. The writer is answered before its page is compressed."""
        self._lock.acquire()        # _cond's lock; not `with _cond`: two Python frames less
        try:
            if self._queued_bytes >= self.limit or self._closed:
                if not self._cond.wait_for(lambda: self._queued_bytes < self.limit or self._closed,
                                           WAIT):
                    raise DataError("write-behind queue stuck: the store worker made no progress")
                if self._closed:
                    raise DataError("store is closed")
            self._queue.append((page, data))
            self._queued_bytes += PAGE_SIZE
            self.staged[page] += 1
            if self._nfailed:
                self._forget(page, 1)               # this write replaces the lost one
            if self._store_scattered is not None:
                self._singles += 1
            # a gathering worker is woken by its timeout, or when the batch is full; an idle one
            # only if it may take the page, not while another gathers or stores a batch
            if self._singles == BATCH_PAGES:
                self._work.notify_all()
            elif self._idle and not self._batching:
                self._work.notify()
        finally:
            self._lock.release()

    def wait_range(self, first: int, count: int, forget_failed: bool = False) -> None:
        """Return once no queued item covers pages first .. first+count. DataError (EIO) if one
        of them lost a queued write, unless `forget_failed` (a discard: the pages are zeros now)."""
        if not self._queued_bytes and not self._nfailed:
            return                  # nothing queued, nothing lost: the common case, lock-free
        with self._cond:
            if self._queued(first, count):
                with self._waiting():
                    if not self._cond.wait_for(
                            lambda: not self._queued(first, count) or self._worker_dead(), WAIT):
                        raise DataError("write-behind queue stuck: the store worker made no progress")
            if not self._nfailed:
                return
            if forget_failed:
                self._forget(first, count)
            elif vec.count(self.failed, 0, first, first + count) != count:
                bad = vec.nonzero(self.failed, first, first + count)[0]
                raise DataError(f"page {bad}: a queued write to it failed")

    def drain(self) -> None:
        """Return once every queued item is stored; raises the first error a store hit."""
        with self._cond:
            with self._waiting():
                if not self._cond.wait_for(lambda: not self._queued_bytes or self._worker_dead(),
                                           WAIT):
                    raise DataError("write-behind queue stuck: the store worker made no progress")
            self._raise_error()

    def settle(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until the queue is empty, leaving any error for the next writer:
        stats taken after a write then count that write."""
        with self._cond, self._waiting():
            self._cond.wait_for(lambda: not self._queued_bytes or self._worker_dead(), timeout)

    def failed_pages(self) -> list[int]:
        """The pages whose queued write failed (they read EIO until written again), ascending,
        found a step at a time: no temporary the size of the disk."""
        with self._cond:
            if not self._nfailed:
                return []
            n = len(self.failed)
            return [p for lo in range(0, n, SCAN_STEP)
                    for p in vec.nonzero(self.failed, lo, min(lo + SCAN_STEP, n))]

    def close(self) -> None:
        """Store what is queued, then stop the worker (bounded join). Idempotent."""
        try:
            self.drain()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
                self._work.notify_all()
            deadline = time.monotonic() + 30
            for t in self._workers:
                t.join(max(0.0, deadline - time.monotonic()))
            if any(t.is_alive() for t in self._workers):
                log.warning("a write-behind worker did not stop within 30 s")

    @contextlib.contextmanager
    def _waiting(self):
        """Around a wait for queued pages: the worker does not gather meanwhile (a reader must
        not wait GATHER for a batch to fill). Caller holds _cond."""
        self._waiters += 1
        self._work.notify_all()
        try:
            yield
        finally:
            self._waiters -= 1

    def _forget(self, first: int, count: int) -> None:
        """Caller holds _cond."""
        self._nfailed -= count - vec.count(self.failed, 0, first, first + count)
        vec.fill(self.failed, first, first + count, 0)

    def _queued(self, first: int, count: int) -> bool:
        """Whether a queued item covers a page of first .. first+count. Caller holds _cond."""
        return vec.count(self._staged_bytes, 0, 2 * first, 2 * (first + count)) != 2 * count

    def _count(self, where, delta: int) -> None:
        """staged[p] += delta (1 or -1) for the pages `where`, a range or a list. Caller holds
        _cond. A range's counts move as one big int (vec.add_to_run; a loop cost a 1 MiB item
        12 us): no count carries or borrows into its neighbour, as none reaches 2**16 (the queue
        is bounded) and each counts the item being added or removed."""
        if type(where) is not range:
            for p in where:
                self.staged[p] += delta
            return
        vec.add_to_run(self.staged, where.start, where.stop, delta)

    def _raise_error(self) -> None:
        """Caller holds _cond."""
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, ZblockError) or not isinstance(err, Exception):
                raise err           # also a test's Crash (a BaseException): it must go on up
            raise DataError(f"a queued write failed: {err}") from err

    def _worker_dead(self) -> bool:
        """A worker has ended (they end only at close, or when a bug killed one): its item will
        never be stored, so nobody may wait for it."""
        return not all(t.is_alive() for t in self._workers)

    # -- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                self._work.wait_for(lambda: self._takeable() or (self._closed and not self._queue))
                self._idle -= 1
                if not self._queue:
                    return                      # closed and empty
                items, busy = self._take()
            trim = self._store(items, busy)
            del items               # the request buffers are free heap before the trim
            if trim and self._on_idle is not None:
                try:
                    self._on_idle()
                except Exception:
                    log.warning("write-behind idle hook failed", exc_info=True)

    def _single(self, item) -> bool:
        """Whether a queued item is a one-page write that goes into a batch (_gather)."""
        return self._store_scattered is not None and len(item[1]) == PAGE_SIZE

    def _overlaps_busy(self, lo: int, hi: int) -> bool:
        """Whether an item being stored covers a page of lo .. hi. Caller holds _cond."""
        for blo, bhi, pages in self._busy:
            if lo < bhi and blo < hi and (pages is None or any(lo <= p < hi for p in pages)):
                return True
        return False

    def _takeable(self) -> bool:
        """Whether the head of the queue may be taken now. Caller holds _cond."""
        if not self._queue:
            return False
        head = self._queue[0]
        page, data = head
        if self._single(head):
            return not self._batching and not self._overlaps_busy(page, page + 1)
        return not self._overlaps_busy(page, page + len(data) // PAGE_SIZE)

    def _take(self) -> tuple[list, tuple]:
        """Take the head of the queue: one item, or a batch of one-page items (_gather); and
        its entry in `_busy`, where it stays until _store is done with it. Caller holds _cond."""
        if self._single(self._queue[0]):
            self._batching = True
            items = self._gather()
            pages = frozenset(page for page, _ in items)
            busy = (min(pages), max(pages) + 1, pages)
            self._singles -= len(items)
        else:
            items = [self._queue[0]]
            page, data = items[0]
            busy = (page, page + len(data) // PAGE_SIZE, None)
        self._busy.append(busy)
        for _ in items:
            self._queue.popleft()
        return items, busy

    def _gather(self) -> list:
        """The one-page items at the head of the queue, after waiting up to GATHER for up to
        BATCH_PAGES of them. A page queued twice ends the batch: its later write must be stored
        after the earlier one; so does a page an item being stored covers. Caller holds _cond
        and `_batching`: no other worker takes the head meanwhile."""
        deadline = time.monotonic() + GATHER
        # until the batch is full, a request is queued behind it, someone waits or GATHER passed
        while (self._singles < BATCH_PAGES and len(self._queue) == self._singles
               and not self._waiters and not self._closed):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._work.wait(left)
        batch, seen = [], set()
        for page, data in self._queue:
            if (len(data) != PAGE_SIZE or page in seen or len(batch) == BATCH_PAGES
                    or (batch and self._overlaps_busy(page, page + 1))):
                break
            seen.add(page)
            batch.append((page, data))
        return batch

    def _store(self, items: list, busy: tuple) -> bool:
        """Store items taken from the queue: one item, or a batch of one-page items in one
        store_scattered call. True when the queue ran empty after request buffers: time for the
        idle hook (not after 4 KiB pages alone, which would wake the writeback worker every few
        milliseconds for a few pages of heap)."""
        if len(items) == 1:
            page, data = items[0]
            where = range(page, page + len(data) // PAGE_SIZE)
        else:
            where = [page for page, _ in items]
        nbytes = sum(len(data) for _, data in items)
        try:
            if len(items) == 1:
                self._store_pages(page, data)
            else:
                self._store_scattered(where, b"".join([data for _, data in items]))
        except BaseException as e:      # no worker exception is lost: fsync gets it
            log.error("queued write of %d bytes (first page %d) failed: %s", nbytes, items[0][0], e)
            with self._cond:
                if self._error is None:
                    self._error = e
                lost = [p for p in where if not self.failed[p]]
                vec.scatter(self.failed, lost, 1)
                self._nfailed += len(lost)
        with self._cond:
            self._busy.remove(busy)
            if busy[2] is not None:         # a batch: the next one may be gathered
                self._batching = False
            self._queued_bytes -= nbytes
            self._count(where, -1)
            self._cond.notify_all()
            # this worker takes the head next; a request behind it is work for another one (a
            # batch is not: one worker at a time gathers, and a wake-up per batch costs 4 KiB
            # writes about 8% of their IOPS)
            if len(self._queue) > self._singles:
                self._work.notify()
            if nbytes > len(items) * PAGE_SIZE:
                self._big_since_idle = True
            if self._queue or self._busy or not self._big_since_idle:
                return False
            self._big_since_idle = False
            return True

