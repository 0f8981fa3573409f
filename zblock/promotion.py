"""Promotion: pages read often from the backing file or the far tier come back into the pool.

zswap never does this (its loads from disk bypass it); zram's writeback has no way back either.
zblock counts the client reads of each written-back page (in the entry's `fill`, unused while
the page is on disk; the far tier keeps its own counts) and, once a page has been read more than
`promote_after` times, stores it again, clean (the file still holds it) or dirty (a far page the
file does not hold yet), if the pool is below its accept threshold. A page rewritten meanwhile
keeps its new entry: the store expects the generation the page was read with.

Lock protocol: disk_reads() runs under the pages' locks and takes the tree lock for the counts.
Each store back holds its page's lock (a reentrant one: disk_reads' caller and a read-modify-write
hold it already), or is skipped if another thread holds it: a store to disk of the same page in
flight bumps the generation only when it lands, and the older bytes would otherwise go in over it.
A clean store keeps a dirty bit set meanwhile (a failed sync re-dirties pages without a new
generation).
"""

from __future__ import annotations

from . import PAGE_SIZE
from .entries import DISK


class Promotion:
    def __init__(self, cache):
        self.cache = cache

    def allowed(self) -> bool:
        """Caller holds the tree lock. Pages read often may come back: the pool is below its
        accept threshold."""
        return self.cache.table.pool_total_size < self.cache.limits.accept_level()

    def disk_reads(self, first: int, gens: list[int], data) -> None:
        """Pages first .. first+len(gens) were read from the backing file while DISK with
        generations `gens` (caller holds their page locks; a whole-page write takes none, so
        each is checked again): count the reads, and promote the pages read often."""
        cache = self.cache
        after = cache.config.promote_after
        if not after or cache.config.read_only:
            return
        table = cache.table
        with cache.tree_lock:
            hot = []
            for i, gen in enumerate(gens):
                p = first + i
                if table.state[p] != DISK or table.gen[p] != gen:
                    continue                # written or discarded since: its fill is not ours
                table.fill[p] = min(table.fill[p] + 1, 1 << 16)
                if table.fill[p] > after:
                    hot.append(i)
            if not hot or not self.allowed():
                return
        mv = memoryview(data)
        self.promote([(first + i, mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], gens[i], True)
                      for i in hot])

    def promote(self, pages: list) -> None:
        """Store pages back into the pool: (page, bytes, the generation they were read with,
        clean)."""
        cache = self.cache
        for page, data, gen, clean in pages:
            lock = cache.page_locks.hold_one(page)
            if not lock.acquire(blocking=False):
                continue            # busy (a write, writeback, a far send): promote it later
            try:
                stored = cache.store_pages(page, data, expect_gen=gen, may_wait=False, clean=clean)
            finally:
                lock.release()
            if stored:
                with cache.tree_lock:
                    cache.c.promoted_pages += 1
