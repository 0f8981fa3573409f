"""Write-through: the pages a store has just cached go on to the backing file in the background,
from the request's own bytes, so that fsync has little left to write.

Without it, fsync decompressed and wrote every dirty page only when it was called: a durable
`dd` spent as long in its fsync as in its writes. Here a store (Cache.store_pages) hands its
installed pages, their bytes and their generations to one thread, which writes them while the
next requests are compressed, and marks them clean: fsync then only waits for this queue, writes
what is left and syncs. Evicting a clean page costs nothing (the file holds it).

Invariants:
    * A page is written under its page lock, after checking under the tree lock that its entry
      is still the one the bytes belong to (same generation), still dirty and not under
      writeback. A newer store changes the generation, and any write of newer bytes (writeback,
      flush, a store that goes to disk) holds the page lock, so older bytes never land over
      newer ones.
    * A page is marked clean only if its generation did not change during the write. A failed
      write leaves it dirty: fsync or writeback writes it again and reports the error. A failed
      sync makes the clean pages the file has not made durable dirty again
      (Writeback._redirty_unsynced), so the next fsync writes them again and a failed close
      marks them lost.
    * fsync waits only for the items queued before it (drain), not for what writers queue
      meanwhile.
    * Nothing waits for this queue but fsync and close: past LIMIT bytes queued, a store's pages
      are simply not queued (they stay dirty, as without write-through).

Lock order: page locks -> tree lock (the cache's); `_cond` is never held with either.
Not used in swap mode (the area is ephemeral) or read-only. `cache` is the owning
zblock.cache.Cache.
"""

from __future__ import annotations

import collections
import logging
import threading


from . import PAGE_SIZE, vec
from .errors import DiskError

log = logging.getLogger(__name__)

LIMIT = 64 << 20            # bytes of request buffers held for writing at most
DRAIN_WAIT = 60.0           # fsync waits this long for the queue, then writes the rest itself


class WriteThrough:
    """One writer thread over a bounded queue of (pages, their bytes, generations)."""

    def __init__(self, cache, limit: int = LIMIT):
        self.cache = cache
        self.limit = limit
        self._queue: collections.deque = collections.deque()
        self._bytes = 0
        self._submitted = 0             # items queued so far; drain waits for those before it
        self._finished = 0              # items written or given up
        self._closed = False
        self._cond = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._run, name="zblock-write-through", daemon=True)
        self._thread.start()

    def submit(self, pages: list[int], data: memoryview, index: list[int],
               gens: list[int]) -> None:
        """Queue pages `pages`, whose bytes are the pages `index` of `data`, as of
        generations `gens`. Never blocks: a full queue drops them (they stay dirty). The whole
        of `data` counts toward the limit: the item keeps it alive."""
        nbytes = data.nbytes
        with self._cond:
            if self._closed or self._bytes + nbytes > self.limit:
                return
            self._queue.append((pages, data, index, gens))
            self._submitted += 1
            self._bytes += nbytes
            self._cond.notify_all()

    def drain(self, timeout: float = DRAIN_WAIT) -> None:
        """Wait (bounded) until everything queued before this call is written or given up
        (not what other writers queue meanwhile: fsync must not wait for them)."""
        with self._cond:
            target = self._submitted
            self._cond.wait_for(lambda: self._finished >= target or self._closed
                                or not self._thread.is_alive(), timeout)

    def close(self) -> None:
        """Stop the thread; what is still queued is left to the caller's flush."""
        with self._cond:
            self._closed = True
            self._bytes -= sum(item[1].nbytes for item in self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            log.warning("write-through worker did not stop within 30 s")

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                item = self._queue.popleft()
            try:
                self._write(*item)
            except BaseException:       # whatever it was, the pages stay dirty: fsync writes them
                log.exception("write-through failed; the pages stay dirty for fsync")
            finally:
                with self._cond:
                    self._bytes -= item[1].nbytes
                    self._finished += 1
                    self._cond.notify_all()

    def _write(self, pages: list[int], data: memoryview, index: list[int],
               gens: list[int]) -> None:
        cache = self.cache
        table = cache.table
        gen, dirty, under_wb = table.gen, table.dirty, table.under_wb
        with cache.page_locks.hold(pages):
            with cache.tree_lock:
                ok = [(p, i, g) for p, i, g in zip(pages, index, gens)
                      if gen[p] == g and dirty[p] and not under_wb[p]]
            if not ok:
                return
            pages, index, gens = [p for p, _, _ in ok], [i for _, i, _ in ok], [g for *_, g in ok]
            try:
                cache.backing.write_pages(
                    pages, [data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in index])
            except DiskError as e:
                log.warning("write-through failed, the pages stay dirty for fsync: %s", e)
                return
            with cache.tree_lock:
                same = table.unchanged(pages, gens)
                vec.scatter(dirty, same, 0)
                cache.c.written_through_pages += len(same)
