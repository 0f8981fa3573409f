"""The compressed front cache (zswap): the store, load and invalidate policy over the entry table.

A store is zswap_store() for a whole write request: the limit checks (zswap_check_limits: the
pool at its limit is a `pool_limit_hit`; under the `zswap` policy stores are then rejected until
the pool is below the accept threshold, under `evict` they are admitted and the coldest pages
written back), then one acomp compress request for the request's pages on a context of the
current pool (zblock.acomp: same-filled check, compression, the incompressible rule), then one
install into the entry table. Pages rejected go to disk, and so do the stores of a stream past
the sequential cutoff (zblock.sequential), without the pool. A load is one path too: the entries
are read under the tree lock, then disk pages are read and compressed ones decompressed with it
released; a single page (a 4 KiB read) has a path of its own that takes no lists.

The parts, each a module with its own invariants:
    zblock.entries    the entry table and the only install/free/accounting code
    zblock.pools      the pools and engines (find-get, holds, death outside the tree lock)
    zblock.limits     the pool limit, the accept threshold, back-pressure, the writeback budget
    zblock.lru        second-chance victim selection
    zblock.writeback  the writeback worker, shrink, flush and close
    zblock.writethrough  stored pages on to the backing file in the background (persistent mode)
    zblock.farpages   the far tier (Redis Cluster) between the pool and the backing file
    zblock.ondemand   zram's writeback on demand and recompression
    zblock.promotion  pages read often from the file or the far tier back into the pool
    zblock.diskread   loads of on-disk pages, one read a run, with readahead along streams
    zblock.sequential which stores are part of a stream past the sequential cutoff
    zblock.stats      counters and the stats snapshot

Invariants: an entry changes only under the tree lock, and its generation with it; slow work
(compression, decompression, disk I/O) is done with the tree lock released and re-validated by
comparing generations afterwards (zswap_reclaim_entry). A store that goes to disk first erases
the older cached entry afterwards, unless a newer store replaced it meanwhile.

Lock protocol (docs/concurrency.md has the order across every module):
    page locks  striped RLocks (page // STRIPE_PAGES % NSTRIPES), held across a page's disk
                I/O (writeback, flush, disk reads, store-to-disk) and a partial page's
                read-modify-write; several are taken in ascending stripe order. Taken before
                the tree lock, never after.
    tree_lock   guards the entry table, the pool registry and the counters; held only for
                bookkeeping, never across compression or disk I/O.
    wb_cond     (on tree_lock) wakes the writeback worker and writers waiting for pool space.

The cache does not know about byte ranges (zblock.store) or files (zblock.backing).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from array import array
from typing import Callable, Sequence

from . import PAGE_SIZE, handoff, vec
from .compressors import CompressionError
from .config import Config
from .diskread import DiskReader
from .entries import DISK, FAR, EntryTable
from .errors import DataError, DiskError
from .farpages import FarPages
from .limits import Limits
from .ondemand import OnDemand
from .pagemem import resident_bytes
from .pool import Trimmer
from .pools import PoolRegistry
from .promotion import Promotion
from .sequential import SequentialCutoff
from .scan import COMP, NONE, RAW, SAME, ZERO_PAGE, Scan, filled_page
from .stats import Counters, snapshot
from .writeback import Writeback
from .writethrough import WriteThrough

log = logging.getLogger(__name__)

NSTRIPES = 256
# Pages per stripe: a swap-in cluster takes one or two locks, a 1 MiB request 32 or 33 (one per
# page made a 1 MiB store to disk take 256 locks, about 40 us).
STRIPE_PAGES = 8


class PageLocks:
    """Striped page locks: pages first .. first+STRIPE_PAGES-1 of an aligned group share a
    stripe, stripe (page // stripe_pages) % nstripes. RLock so a read-modify-write may load the
    page it holds."""

    def __init__(self, nstripes: int = NSTRIPES, stripe_pages: int = STRIPE_PAGES):
        assert stripe_pages & (stripe_pages - 1) == 0, "stripe_pages is a power of two"
        self.n = nstripes
        self._shift = stripe_pages.bit_length() - 1
        self.wrap = nstripes * stripe_pages     # pages after which the stripes repeat
        self._locks = [threading.RLock() for _ in range(nstripes)]

    def hold(self, pages):
        """A context manager that holds the locks of `pages` (any iterable of ints), taken in
        ascending stripe order. Pages of one stripe get its lock itself: a 4 KiB request's
        path, where the generator below cost about 2 us."""
        locks = self._ordered(pages)
        return locks[0] if len(locks) == 1 else self._hold_all(locks)

    @staticmethod
    @contextlib.contextmanager
    def _hold_all(locks: list):
        taken = []
        try:
            for lock in locks:
                lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()

    def _ordered(self, pages) -> list:
        """The locks of `pages` in ascending stripe order. A range of pages is cut from the
        stripe list directly, without a set of its stripes to build and sort."""
        n, shift = self.n, self._shift
        if type(pages) is range and pages.step == 1:
            if not pages:
                return []
            first, last = pages.start >> shift, (pages.stop - 1) >> shift
            if last - first >= n - 1:
                return self._locks
            a, b = first % n, last % n
            if a <= b:
                return self._locks[a:b + 1]
            return self._locks[:b + 1] + self._locks[a:]
        return [self._locks[s] for s in sorted({(p >> shift) % n for p in pages})]

    def hold_one(self, page: int) -> threading.RLock:
        """hold() for one page: its lock, as a context manager."""
        return self._locks[(page >> self._shift) % self.n]

    def hold_range(self, start: int, count: int):
        return self.hold(range(start, start + count))

    def pages_before_wrap(self, page: int) -> int:
        """How many pages from `page` on have stripes above or equal to its own: a range that
        starts at `page` and is no longer takes its stripes without wrapping to lower ones."""
        return self.wrap - page % self.wrap


class Cache:
    """zswap over a page-indexed table. `backing` needs read_pages/write_pages/discard/sync."""

    def __init__(self, npages: int, config: Config, backing, *, on_disk=None,
                 memory_pressure: Callable[[], bool] | None = None, engine_factory=None,
                 far=None):
        """`far`: a connected zblock.far.FarTier, or None for no far tier."""
        self.npages = npages
        self.config = config
        self.backing = backing
        self.tree_lock = threading.Lock()
        self.wb_cond = threading.Condition(self.tree_lock)
        self.page_locks = PageLocks()
        self.c = Counters()
        self.registry = PoolRegistry(config, engine_factory)
        self.table = EntryTable(npages, self.registry, on_disk, dedup=config.dedup)
        self.table.on_freed = self._freed
        self.limits = Limits(self)
        self.table.referenced_on_store = config.limit_policy == "zswap"
        self.writeback = Writeback(self, memory_pressure)
        self.write_through = None if config.swap or config.read_only else WriteThrough(self)
        self.sequential = None if config.swap or config.read_only else SequentialCutoff(config)
        self.far_pages = None if far is None else FarPages(self, far)
        self.on_demand = OnDemand(self)
        self.promotion = Promotion(self)
        self.disk_reader = DiskReader(self)
        self.table.clock.start()

    @property
    def trimmer(self) -> Trimmer:
        return self.writeback.trimmer

    @trimmer.setter
    def trimmer(self, trimmer: Trimmer) -> None:
        self.writeback.trimmer = trimmer

    # =========================================================================================
    # pool memory given back
    def _freed(self, nbytes: int) -> None:
        """The table gave pool memory back (tree lock held): the worker trims when it adds up."""
        if self.writeback.trimmer.freed(nbytes):
            self.writeback.wake()

    def request_trim(self) -> None:
        """Have the worker give free heap back (e.g. request buffers after a burst of writes)."""
        with self.tree_lock:
            self.writeback.trimmer.request()
            self.writeback.wake()

    # =========================================================================================
    # pools

    def switch_pool(self) -> None:
        """After a pool param change: a new current pool; the old one lives on while entries
        reference it."""
        with self.tree_lock:
            self.registry.switch()
        self.registry.reap()

    def _pool_get(self, may_wait: bool, pages: int):
        """zswap_store()'s checks for a store of `pages` pages: (the current pool, held while we
        compress; reject?)."""
        with self.tree_lock:
            reject = self.limits.reject(pages)
            if reject:
                self.c.reject_pool_limit += pages
            elif may_wait and self.config.limit_policy == "evict":
                self.limits.wait_for_space_locked()
            pool = self.registry.current
            pool.holds.append(None)
        return pool, reject

    # =========================================================================================
    # store

    def store_pages(self, where, buf, expect_gen: int | None = None,
                    may_wait: bool = True, clean: bool = False) -> bool:
        """Store whole pages from `buf` (bytes-like, a multiple of PAGE_SIZE long) at pages
        `where ..` (an int), or at the page numbers in `where` (a list, no page twice:
        the write-behind queue's batch of 4 KiB writes).

        `expect_gen` (one page, read-modify-write): store only if the page's entry is still the
        one the caller read; False if another store replaced it meanwhile (the caller retries).
        `may_wait=False`: no back-pressure wait (the caller holds a page lock the writeback worker
        may need: it calls limits.wait_for_space() before taking it). A store at a first page that
        carries a stream past the sequential cutoff goes to disk instead. `clean`: the backing file
        already holds these bytes (promotion): the pages go in with their old entries' dirty
        bits (clean unless a failed sync re-dirtied them), and those the pool rejects stay where
        they are, unwritten."""
        mv = memoryview(buf).cast("B")
        n = len(mv) // PAGE_SIZE
        first = where if type(where) is int else where[0]
        if (self.sequential is not None and n and type(where) is int and not clean
                and expect_gen is None and self.sequential.bypass(first, n)
                and not self.limits.disk_failing()):
            # (not while the disk fails: the pages would be held raw over the limit instead)
            return self._store_to_disk(mv, range(first, first + n), bypass=True)
        pool, reject = self._pool_get(may_wait, n)
        try:
            if reject:
                return False if clean else self._store_to_disk(mv, _pages(where, range(n)),
                                                               expect_gen)
            cfg = self.config
            scan = pool.contexts.compress(mv, detect_same=cfg.same_filled_pages_enabled,
                                          raw_poor=cfg.incompressible_policy == "store_raw")
            poor = [i for i, s in enumerate(scan.states) if s == NONE] \
                if NONE in scan.states else []
            through = self.write_through is not None and cfg.write_through and not clean
            if self.table.dedup:
                self.table.dedup.prepare(scan)
            with self.tree_lock:
                if expect_gen is not None and self.table.gen[first] != expect_gen:
                    return False
                self.c.reject_compress_poor += len(poor)
                self.c.reject_compress_fail += scan.failed
                if clean:
                    was_dirty = bytes(self.table.dirty[first:first + n])
                # rejected pages keep their old entry until their disk write lands (below)
                installed = self.table.install(where, scan, pool)
                self.c.zswpout += installed
                if clean:       # installed pages get their old bit; the others keep theirs
                    dirty = self.table.dirty
                    dirty[first:first + n] = vec.mask_and(bytes(dirty[first:first + n]), was_dirty)
                if through:
                    index = vec.nonzero(scan.states)
                    pages = _pages(where, index)
                    gens = vec.gather(self.table.gen, pages)
                if self.limits.over():
                    self.writeback.wake()
        finally:
            self.registry.release((pool,))
        if through and len(index):
            # the queue keeps a reference: copy unless the caller's buffer is immutable
            self.write_through.submit(pages, mv if mv.readonly else memoryview(bytes(mv)),
                                      index, gens)
        if clean:
            return installed > 0
        if poor:
            pages = [mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in poor]
            return self._store_to_disk(b"".join(pages), _pages(where, poor), expect_gen)
        return True

    def _store_to_disk(self, buf, idxs: Sequence[int], expect_gen: int | None = None,
                       bypass: bool = False) -> bool:
        """A store that goes to disk first (rejected by the pool, or past the sequential cutoff:
        `bypass`): write under the pages' locks, then erase the older cached entries (unless a
        newer store replaced them meanwhile). A disk that refuses the write gets the pages
        cached raw and dirty instead, over the limit if need be: the write succeeds, and the
        next fsync retries the disk and reports the error."""
        mv = memoryview(buf).cast("B")
        with self.page_locks.hold(idxs):
            with self.tree_lock:
                gens = vec.gather(self.table.gen, idxs)
            if expect_gen is not None and gens[0] != expect_gen:
                return False
            handoff.blocking()
            try:
                self.backing.write_pages(idxs, mv)     # one write where idxs are one run
                failed = False
            except DiskError as e:
                log.warning("store to disk failed, caching the pages instead: %s", e)
                failed = True
                self.writeback.failed_at = time.monotonic()
            with self.tree_lock:
                now = vec.gather(self.table.gen, idxs)
                keep = [i for i, (g, was) in enumerate(zip(now, gens)) if g == was]
                same = idxs if len(keep) == len(idxs) else [idxs[i] for i in keep]
                if not failed:
                    self.table.free(same)
                    self.table.set_disk(same)
                    if bypass:
                        self.c.bypassed_pages += len(idxs)
                elif keep:
                    kept = [bytes(mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in keep]
                    n = len(kept)
                    raw = Scan(kept, bytes((RAW,)) * n, array("H", (PAGE_SIZE,)) * n,
                               array("Q", b"".join(d[:8] for d in kept)), 0)
                    self.c.zswpout += self.table.install(same, raw, self.registry.current)
                    if self.limits.over():
                        self.writeback.wake()
        return True

    # =========================================================================================
    # load

    def load_pages(self, start: int, n: int, gens_out: list | None = None) -> bytes:
        """The bytes of pages start .. start+n. Raises DataError (EIO) if one cannot be read.
        `gens_out` (readahead): gets the pages' generations, taken with their entries.

        The entries are classified with one pass of Python over the states."""
        if n == 1 and gens_out is None:
            return self.load_page(start)
        table = self.table
        end = start + n
        comp: list[int] = []                    # compressed pages
        disk: list[int] = []                    # indices into the request
        far: list[int] = []
        with self.tree_lock:
            if gens_out is not None:
                gens_out.append(table.gen[start:end].tolist())
            parts = table.objs_range(start, end)    # COMP/RAW objects; the rest set below
            pid, fl, ref, at = table.pool_id, table.fill, table.referenced, table.atime
            now = table.clock.tick
            missed = 0
            for p, s in zip(range(start, end), table.state[start:end].tolist()):
                if s == COMP:
                    comp.append(p)
                    ref[p] = True
                elif s == RAW:
                    ref[p] = True
                elif s == SAME:
                    parts[p - start] = filled_page(fl[p])
                else:                       # NONE reads zeros; DISK and FAR are read below
                    i = p - start
                    parts[i] = ZERO_PAGE
                    if s == DISK:
                        disk.append(i)
                    elif s == FAR:
                        far.append(i)
                    missed += 1
                    continue
                at[p] = now
            self.c.zswpin += n - missed
            comp_pools = [pid[p] for p in comp]
            pools = self.registry.hold(set(comp_pools)) if comp else {}
        try:
            if disk:
                self.disk_reader.load(start, n, disk, parts)
            if far:
                for i, data in zip(far, self.far_pages.read([start + i for i in far])):
                    parts[i] = data
            if len(pools) == 1:
                # every part but the compressed ones is a whole page: one request decompresses
                # and joins them
                try:
                    return next(iter(pools.values())).contexts.decompress(parts, join=True)
                except CompressionError:
                    pass                        # page by page below names the bad page
            for pool_id, pool in pools.items():
                items = [p - start for p, q in zip(comp, comp_pools) if q == pool_id]
                for i, r in zip(items, pool.contexts.decompress([parts[i] for i in items])):
                    if type(r) is not bytes:
                        self._decompress_failed(start + i, r)
                    parts[i] = r
        finally:
            if pools:
                self.registry.release(pools.values())
        return b"".join(parts)

    def load_page(self, page: int) -> bytes:
        """load_pages for one page with scalar code: a 4 KiB read's path."""
        table = self.table
        self.tree_lock.acquire()        # not `with`: about 1,000 instructions less a read
        try:
            st = table.state[page]
            if NONE < st < DISK:                # SAME, COMP, RAW: an access (idle tracking)
                table.atime[page] = table.clock.tick
            if st == COMP:
                obj = table.obj(page)
                table.referenced[page] = True
                self.c.zswpin += 1
                pool = self.registry.pools[table.pool_id[page]]
                pool.holds.append(None)     # not closed while we decompress with it unlocked
            elif st == RAW:
                table.referenced[page] = True
                self.c.zswpin += 1
                return table.obj(page)
            elif st == SAME:
                self.c.zswpin += 1
                return filled_page(table.fill[page])
            elif st == NONE:
                return ZERO_PAGE
        finally:
            self.tree_lock.release()
        if st == FAR:
            return self.far_pages.read([page])[0]
        if st == COMP:
            try:
                return pool.contexts.decompress([obj], join=True)
            except CompressionError as e:
                self._decompress_failed(page, e)
            finally:
                self.registry.release((pool,))
        data = self.disk_reader.read(page, 1, self.disk_reader.continues(page, 1))
        # cached again (or discarded) since our look: take the current bytes
        return self.load_page(page) if data is None else data

    def _decompress_failed(self, page: int, err) -> None:
        with self.tree_lock:
            self.c.decompress_fail += 1
        raise DataError(f"page {page}: decompression failed ({err})")

    # =========================================================================================
    # zram-style controls: idle pages, compaction (zblock.ondemand has writeback on demand and
    # recompression, zblock.limits the writeback budget)

    def mark_idle(self, older_than: float | None = None) -> int:
        with self.tree_lock:
            return self.table.mark_idle(older_than)

    def compact(self) -> None:
        """Give free heap back to the system now (zram's `compact`)."""
        self.writeback.trimmer.trim(force=True)

    def page_gen(self, page: int) -> int:
        """The generation of a page's entry (changes whenever the entry does)."""
        with self.tree_lock:
            return self.table.gen[page]

    def gens_match(self, start: int, gens: list[int]) -> bool:
        """True if no entry of pages start .. start+len(gens) changed since `gens` was taken."""
        with self.tree_lock:
            return self.table.gen[start:start + len(gens)].tolist() == list(gens)

    # =========================================================================================
    # invalidate (discard)

    def invalidate_pages(self, start: int, n: int) -> None:
        """Drop whole pages (discard): cached entries freed, backing punched, reads give zeros."""
        with self.page_locks.hold_range(start, n):
            with self.tree_lock:
                self.table.discard(start, start + n)
                self.c.discarded_pages += n
            self.disk_reader.forget(start, n)
            self.backing.discard(start, n)
        self.registry.reap()

    # =========================================================================================
    # flush, close, stats

    def flush(self) -> int:
        if self.write_through is not None:
            self.write_through.drain()
        return self.writeback.flush()

    def dirty_pages(self) -> list[int]:
        """Pages whose data the backing file does not hold durably (after a failed close: the
        pages to mark lost)."""
        with self.tree_lock:
            return self.table.find(lambda s: self.table.dirty[s])

    def close(self, write_back: bool = True) -> None:
        """Stop the worker, write everything back (unless `write_back` is False), free pools."""
        try:
            if self.write_through is not None:
                self.write_through.close()
            self.writeback.close(write_back)
        finally:
            try:
                if self.far_pages is not None:
                    self.far_pages.close()
            finally:
                self.table.clock.stop()
                self.registry.close()

    def check_worker(self) -> None:
        self.writeback.check()

    def snapshot(self) -> dict:
        return snapshot(self)

    def table_bytes(self, more_arrays=()) -> int:
        """Memory the per-page tables hold now: the entry table's arrays and object slots, and
        `more_arrays` (other layers' per-page arrays). Caller holds no lock: reading what is
        resident (/proc/self/pagemap) takes milliseconds, so only the slots are counted under the
        tree lock."""
        with self.tree_lock:
            slots = self.table.objs_bytes()
        return slots + resident_bytes([*self.table.arrays, *more_arrays])


def _pages(where, idx) -> Sequence[int]:
    """The page numbers of a store's pages idx: where + i for a first page (an int; a range
    for a range), where[i] for a list of page numbers (see Cache.store_pages)."""
    if type(where) is int:
        if type(idx) is range:
            return range(where + idx.start, where + idx.stop)
        return [where + i for i in idx]
    return [where[i] for i in idx]
