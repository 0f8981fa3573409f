"""Readahead for sequential reads: the next request's pages decompress on the other core.

`dd` and the loop driver read one request at a time and wait for each reply. Decompressing a
1 MiB request takes one core 0.5 ms or more, and the kernel's copy of the reply and the next
request's round trip leave the other core idle. So when a read continues the one before it, a
worker thread decompresses the windows after it while the reply goes out, and the next reads
take those bytes instead of decompressing them themselves.

Prefetched bytes are used only if nothing in their window changed since: the worker snapshots
the pages' generations (Cache.gen changes whenever a page's entry does) in the same tree-lock
hold as their entries, and the reader compares them with the current ones. A write, discard or
writeback in between (each replaces the entry, so its generation) makes the comparison fail and
the reader loads the pages itself.

The worker's loads are loads like any other: they count in zswpin and mark their pages
referenced, and a window that is dropped is counted again when the reader loads it itself.

Up to DEPTH windows are kept, for one sequential stream: random reads never start the worker
(they do not continue the read before them).

Lock protocol: `_cond` guards `_want`, `_busy`, `_ready` and `_next`. The cache's locks are
taken only inside Cache.load_pages and Cache.gens_match, never while holding `_cond`.
"""

from __future__ import annotations

import logging
import threading

from . import cpus

log = logging.getLogger(__name__)

# Reads shorter than this (libfuse 2 sends 128 KiB, swap-in 32 KiB) gain less than the worker's
# wake-up costs: 70-470 us on the project VM.
MIN_PAGES = 32
# A reader waits this long for a window the worker is still decompressing; past that it loads
# the pages itself (the worker is stuck or starved: never slower than no readahead by more).
WAIT = 0.05
# Windows decompressed ahead of the reader. With one, the reader often arrived while the worker
# was still on it and waited for it (two thread wake-ups per request); with two the worker runs
# from one window to the next without sleeping.
DEPTH = 2


class Readahead:
    """`load(start, n)` is cache.load_pages(start, n), served from a prefetched window when it
    is still current. Thread-safe."""

    def __init__(self, cache, npages: int, depth: int = DEPTH):
        self._cache = cache
        self._npages = npages
        self._depth = depth
        self._cond = threading.Condition(threading.Lock())
        self._next = -1                 # the page a read continuing the last one starts at
        self._want: list[tuple[int, int]] = []      # windows to decompress, in order
        self._busy: tuple[int, int] | None = None   # the window being decompressed
        # window -> (its pages' generations, as Cache.load_pages gives them; its bytes)
        self._ready: dict[tuple[int, int], tuple[object, bytes]] = {}
        self._closed = False
        self._thread: threading.Thread | None = None
        self.hits = 0                   # windows served from readahead (tests, benchmarks)

    def load(self, start: int, n: int) -> bytes:
        if n < MIN_PAGES:
            return self._cache.load_pages(start, n)
        key = (start, n)
        with self._cond:
            sequential = start == self._next
            self._next = start + n
            if self._busy == key:
                self._cond.wait_for(lambda: self._busy != key, WAIT)
            ready = self._ready.pop(key, None)
            # windows behind this read will not be asked for again
            self._ready = {k: v for k, v in self._ready.items() if k[0] > start}
            self._want = []
            if sequential and not self._closed:
                ahead = [(start + i * n, n) for i in range(1, self._depth + 1)
                         if start + (i + 1) * n <= self._npages]
                self._want = [k for k in ahead if k not in self._ready and k != self._busy]
                if self._want:
                    self._start_worker()
                    self._cond.notify_all()
        if ready is not None and self._cache.gens_match(start, ready[0]):
            self.hits += 1
            return ready[1]
        return self._cache.load_pages(start, n)

    def _start_worker(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="zblock-readahead",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        cpus.unpin()                        # started from a request: maybe on a pinned thread
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._want)
                if self._closed:
                    return
                key = self._busy = self._want.pop(0)
            start, n = key
            gens: list = []
            try:
                data = self._cache.load_pages(start, n, gens_out=gens)
            except Exception as e:      # the reader meets the same error itself, and reports it
                log.debug("readahead of pages %d..%d failed: %s", start, start + n - 1, e)
                data = None
            with self._cond:
                self._busy = None
                if data is not None and start >= self._next:
                    self._ready[key] = (gens[0], data)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5)
