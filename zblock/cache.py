"""The compressed front cache (zswap): entries, LRU with second chance, limits, writeback.

Every page of the disk has one slot in a set of numpy arrays (the entry table, zswap's xarray):
its state, compressed length, pool, fill value, flags and an LRU stamp; `objs` holds the stored
object of a compressed or raw page. Per-page Python work decides speed here, so stores and loads
work on whole requests (up to 256 pages): a store's pages are scanned (same-filled check,
compression) in one call and installed into the table by one C call (_lz4pages.install); loads
use vectorised numpy and one pass of Python per page.

Page states:
    NONE  never written or discarded: reads as zeros, nothing on disk
    SAME  same-filled page: a fill value, no pool memory, not on the LRU (zswap 4.14-6.9)
    COMP  compressed object in a pool, on the LRU
    RAW   incompressible page stored as-is in a pool, on the LRU (zswap 6.18)
    DISK  not cached: the backing file holds it
A cached page (SAME/COMP/RAW) is `dirty` until the backing file holds the same bytes durably.

Invariants:
    * `gen[p]` changes whenever page p's entry changes; slow work (decompression, disk I/O) is done
      with the tree lock dropped and re-validated by comparing gen afterwards (zswap_reclaim_entry).
    * A page's disk write happens under that page's lock, and its entry stays in the cache, marked
      `under_wb`, until the write completes (zram ZRAM_UNDER_WB). A store that goes to disk first
      erases the older cached entry afterwards.
    * stored_pages == sum(pool.stored_pages) + same_filled_pages under the tree lock.

Lock protocol (order: page lock -> tree lock; never a page lock while holding the tree lock):
    tree_lock  guards every array, `objs`, pool counters, the pool table and the stat counters.
               Held only for bookkeeping: never across compression or disk I/O.
    page locks striped RLocks (page % NSTRIPES). Held across a page's disk I/O (writeback, flush,
               disk reads, store-to-disk) and a partial page's read-modify-write. Several are
               taken in ascending stripe order.
    _wb_cond   (on tree_lock) wakes the writeback worker and writers waiting for pool space.

The cache does not know about byte ranges (store.py) or files (backing.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from typing import Callable

import numpy as np
import psutil

from . import PAGE_SIZE, _lz4pages
from .acomp import ContextSet
from .compressors import CompressionError
from .config import Config
from .errors import DataError, DiskError
from .pool import BYTES_HEADER, MALLOC_OVERHEAD, RAW_CHARGE, Pool, Trimmer, charge, labels

log = logging.getLogger(__name__)

NONE, SAME, COMP, RAW, DISK = 0, 1, 2, 3, 4
WORDS = PAGE_SIZE // 8
ZERO_PAGE = bytes(PAGE_SIZE)
NSTRIPES = 1024
BATCH = 256                 # pages per writeback/flush disk batch (1 MiB)
# Up to this many pages, loads (and stores not scanned by one C call) go page by page in scalar
# code: each numpy call costs 1-6 us, a batch ~40 of them (in-process, 8-page writes: 438 us
# batched; swap sends 32 KiB reads and writes of up to 512 KiB).
SMALL = 16
MAX_POOLS = 255             # pool ids are uint8
# A writer under the `evict` policy waits for the writeback worker once the pool is this far over
# its limit (back-pressure), but never longer than SPACE_WAIT: a failing disk must not hang writes.
OVERSHOOT = 8 << 20
SPACE_WAIT = 5.0
SHRINK_INTERVAL = 1.0       # seconds between shrinker passes when idle
FLUSH_WAIT = 30.0           # fsync waits this long for the worker's writes in flight


def _filled_page(fill: int) -> bytes:
    """The page a same-filled entry stands for."""
    return ZERO_PAGE if fill == 0 else int(fill).to_bytes(8, "little") * WORDS


def _pages_at(where, idx) -> list[int]:
    """The page numbers of a store's pages idx: where + i for a first page (an int), where[i]
    for an array of page numbers (see Cache.store_pages)."""
    if type(where) is int:
        return [where + i for i in idx]
    return where[list(idx)].tolist()


def _charges(lengths: np.ndarray, states: np.ndarray) -> np.ndarray:
    """pool.charge() vectorised: RAW entries cost a full page object."""
    ln = np.where(states == RAW, PAGE_SIZE, lengths.astype(np.int64))
    return (ln + BYTES_HEADER + MALLOC_OVERHEAD + 15) & ~15


class Counters:
    """zswap/zram event counters; each moved by exactly its trigger, under the tree lock."""

    NAMES = ("pool_limit_hit", "written_back_pages", "flushed_pages", "reject_compress_poor",
             "reject_compress_fail", "reject_alloc_fail", "reject_reclaim_fail", "decompress_fail",
             "zswpout", "zswpin", "zswpwb", "discarded_pages")

    def __init__(self):
        for name in self.NAMES:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.NAMES}


class PageLocks:
    """Striped per-page locks; RLock so a read-modify-write may load the page it holds."""

    def __init__(self, nstripes: int = NSTRIPES):
        self.n = nstripes
        self._locks = [threading.RLock() for _ in range(nstripes)]

    @contextlib.contextmanager
    def hold(self, pages):
        """Hold the locks of `pages` (any iterable of ints), taken in ascending stripe order."""
        stripes = sorted({p % self.n for p in pages})
        taken = []
        try:
            for s in stripes:
                self._locks[s].acquire()
                taken.append(s)
            yield
        finally:
            for s in reversed(taken):
                self._locks[s].release()

    @contextlib.contextmanager
    def hold_range(self, start: int, count: int):
        if count >= self.n:
            with self.hold(range(self.n)):
                yield
        else:
            with self.hold(range(start, start + count)):
                yield


class Cache:
    """zswap over a page-indexed table. `backing` needs read_pages/write_pages/discard/sync."""

    def __init__(self, npages: int, config: Config, backing, *, on_disk: np.ndarray | None = None,
                 memory_pressure: Callable[[], bool] | None = None, engine_factory=None):
        self.npages = npages
        self.config = config
        self.backing = backing
        self.tree_lock = threading.Lock()
        self.page_locks = PageLocks()
        self._wb_cond = threading.Condition(self.tree_lock)

        # --- the entry table
        self.state = np.zeros(npages, np.uint8)
        if on_disk is not None:
            self.state[on_disk] = DISK
        self.length = np.zeros(npages, np.uint16)
        self.pool_id = np.zeros(npages, np.uint8)
        self.fill = np.zeros(npages, np.uint64)
        self.dirty = np.zeros(npages, np.bool_)
        self.referenced = np.zeros(npages, np.bool_)
        self.under_wb = np.zeros(npages, np.bool_)
        self.stamp = np.zeros(npages, np.int64)
        self.gen = np.zeros(npages, np.uint32)
        self.objs: list = [None] * npages
        # The same memory as memoryviews, for the one-page paths: indexing one with a Python int
        # takes half the time of a numpy scalar access and gives Python ints back (measured:
        # 48 against 111 ns a read, 148 against 351 ns an increment).
        self._st = memoryview(self.state)
        self._len = memoryview(self.length)
        self._pid = memoryview(self.pool_id)
        self._fill = memoryview(self.fill)
        self._dirty = memoryview(self.dirty)
        self._ref = memoryview(self.referenced)
        self._uwb = memoryview(self.under_wb)
        self._stamp = memoryview(self.stamp)
        self._gen = memoryview(self.gen)
        # the table as _lz4pages.install takes it (the same list and arrays, never rebound)
        self._table = (self.objs, self.state, self.length, self.pool_id, self.fill, self.dirty,
                       self.referenced, self.under_wb, self.stamp, self.gen)
        self._seq = 1

        # --- gauges and counters
        self.c = Counters()
        self.same_filled_pages = 0
        self.stored_incompressible_pages = 0
        self.pool_total_size = 0
        self.mem_used_max = 0
        self.reached_full = False   # zswap policy: rejecting until below the accept threshold

        # --- pools (zswap_pools); the current one is self.pool
        self.pools: list[Pool | None] = [None] * MAX_POOLS
        self._engine_factory = engine_factory
        self._engines: dict[tuple, object] = {}
        # the `hw` stats of the engines closed so far, so its counters keep growing when the
        # accelerator goes sim -> none -> sim (a new engine starts from zero)
        self._hw_closed = _merge_hw([])
        self.pool = self._pool_find_get()
        self.trimmer = Trimmer()
        self.memory_pressure = memory_pressure or _system_memory_pressure

        self._closing = False
        self._wb_wanted = False
        self._wb_failed_at = -1e9     # when a writeback last failed (monotonic)
        self._worker = threading.Thread(target=self._writeback_worker, name="zblock-writeback",
                                        daemon=True)
        self._worker_error: BaseException | None = None
        self._worker.start()

    # =========================================================================================
    # pools

    def _pool_key(self) -> tuple:
        cfg = self.config
        level = cfg.zstd_level if cfg.compressor == "zstd" else None
        hw = None
        if cfg.accelerator == "sim":
            hw = (cfg.hw_queues, cfg.hw_depth, cfg.hw_latency_us, cfg.hw_throughput_mbps,
                  cfg.hw_mode, cfg.hw_batch, cfg.hw_fault_rate, cfg.hw_seed)
        # contexts too: a pool's context set is made with it (zswap: per-CPU, per pool)
        return (cfg.compressor, level, cfg.accelerator, hw, cfg.contexts)

    def _engine_get(self, hw: tuple):
        engine = self._engines.get(hw)
        if engine is None:
            if self._engine_factory is not None:
                engine = self._engine_factory(hw)
            else:
                from .accel import Engine
                q, d, lat, thr, mode, batch, rate, seed = hw
                engine = Engine(queues=q, depth=d, latency_us=lat, throughput_mbps=thr, mode=mode,
                                batch=batch, fault_rate=rate, seed=seed)
            self._engines[hw] = engine
        return engine

    def _pool_find_get(self) -> Pool:
        """Make the pool for the current config current, reusing a live one (zswap find-get).

        Caller holds the tree lock (or is the constructor)."""
        key = self._pool_key()
        for pool in self.pools:
            if pool is not None and pool.key == key:
                pool.current = True
                return pool
        free_id = next((i for i, p in enumerate(self.pools) if p is None), None)
        if free_id is None:
            raise DataError("too many live pools: wait for old pools' pages to be rewritten")
        engine = self._engine_get(key[3]) if key[2] == "sim" else None
        contexts = ContextSet(key[0], key[1], key[4], engine=engine)
        pool = Pool(free_id, key, contexts)
        self.pools[free_id] = pool
        return pool

    def switch_pool(self) -> None:
        """After a compressor/engine param change: a new current pool; the old one lives on
        while entries reference it."""
        with self.tree_lock:
            if self.pool.key == self._pool_key():
                return
            old = self.pool
            new = self._pool_find_get()         # may fail (too many pools): old stays current
            old.current = False
            self.pool = new
            self._pool_put_if_dead(old)

    def _pools_get(self, pids) -> dict[int, Pool]:
        """The pools of `pids`, each held (a `users` ref) so none is closed while we decompress
        with it unlocked. Caller holds the tree lock; give them back with _pools_put."""
        pools = {int(p): self.pools[int(p)] for p in pids}
        for pool in pools.values():
            pool.users += 1
        return pools

    def _pools_put(self, pools: dict[int, Pool]) -> None:
        with self.tree_lock:
            for pool in pools.values():
                pool.users -= 1
                self._pool_put_if_dead(pool)

    def _pool_put_if_dead(self, pool: Pool) -> None:
        """Free a pool nobody references. Caller holds the tree lock."""
        if pool.current:        # holds a ref of its own: the common case, and never dead
            return
        if pool.refs == 0 and self.pools[pool.id] is pool:
            self.pools[pool.id] = None
            pool.close()
            self._engines_put_unused()

    def _engines_put_unused(self) -> None:
        used = {p.key[3] for p in self.pools if p is not None and p.key[2] == "sim"}
        for hw in [hw for hw in self._engines if hw not in used]:
            engine = self._engines.pop(hw)
            self._hw_closed = _merge_hw([self._hw_closed, engine.stats()])
            engine.close()

    # =========================================================================================
    # helpers (caller holds the tree lock)

    def _free_entries(self, idx) -> None:
        """Drop the cached entries of pages `idx` (a slice or index array) from pools and gauges.

        The caller sets the new state; this only undoes the old entries' accounting."""
        st = self.state[idx]
        cached = (st == COMP) | (st == RAW)
        if cached.any():
            ids = self.pool_id[idx][cached]
            ch = _charges(self.length[idx][cached], st[cached])
            freed = int(ch.sum())
            first = int(ids[0])
            if (ids == first).all():
                # one pool, as nearly always (a request's pages were stored together): no
                # per-pool counting (two bincounts over MAX_POOLS and a loop)
                pool = self.pools[first]
                pool.stored_pages -= len(ids)
                pool.total_size -= freed
                self._pool_put_if_dead(pool)
            else:
                counts = np.bincount(ids, minlength=MAX_POOLS)
                sizes = np.bincount(ids, weights=ch, minlength=MAX_POOLS)
                for pid in np.flatnonzero(counts):
                    pool = self.pools[pid]
                    pool.stored_pages -= int(counts[pid])
                    pool.total_size -= int(sizes[pid])
                    self._pool_put_if_dead(pool)
            self.pool_total_size -= freed
            if self.trimmer.freed(freed):
                self._wake_writeback()      # the worker trims, once the objects are gone
            self.stored_incompressible_pages -= int(np.count_nonzero(st == RAW))
        self.same_filled_pages -= int(np.count_nonzero(st == SAME))
        if isinstance(idx, slice):
            self.objs[idx] = [None] * (idx.stop - idx.start)
        else:
            for p in idx.tolist():
                self.objs[p] = None
        self.gen[idx] += 1
        self.dirty[idx] = False
        self.referenced[idx] = False
        self.under_wb[idx] = False

    def _over_limit(self) -> bool:
        return self.pool_total_size >= self.config.pool_limit

    def _accept_level(self) -> int:
        return self.config.pool_limit * self.config.accept_threshold // 100

    def _check_limits(self) -> bool:
        """zswap_check_limits(): True if this store must be rejected. Caller holds the tree lock."""
        if self._over_limit():
            self.c.pool_limit_hit += 1
            self._wake_writeback()
            if self.config.limit_policy == "zswap":
                self.reached_full = True
        if self.reached_full:
            if self.config.limit_policy != "zswap" or self.pool_total_size <= self._accept_level():
                self.reached_full = False
        return self.reached_full

    def request_trim(self) -> None:
        """Have the worker give free heap back (e.g. request buffers after a burst of writes)."""
        with self.tree_lock:
            self.trimmer.request()
            self._wake_writeback()

    def _wake_writeback(self) -> None:
        self._wb_wanted = True
        self._wb_cond.notify_all()

    # =========================================================================================
    # store

    def store_pages(self, where, buf, expect_gen: int | None = None,
                    may_wait: bool = True) -> bool:
        """Store whole pages from `buf` (bytes-like, a multiple of PAGE_SIZE long) at pages
        `where ..` (an int), or at the page numbers in `where` (an int64 array, no page twice:
        the write-behind queue's batch of 4 KiB writes).

        `expect_gen` (one page, read-modify-write): store only if the page's entry is still the
        one the caller read; False if another store replaced it meanwhile (the caller retries).
        `may_wait=False`: no back-pressure wait (the caller holds a page lock the writeback worker
        may need: it calls wait_for_space() before taking it)."""
        mv = memoryview(buf).cast("B")
        n = len(mv) // PAGE_SIZE
        if n == 1:
            return self.store_page(_pages_at(where, [0])[0], buf, expect_gen, may_wait)
        pool, reject = self._store_begin(may_wait)
        try:
            if reject:
                return self._store_to_disk([mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(n)],
                                           _pages_at(where, range(n)), expect_gen)
            if n <= SMALL and not pool.contexts.scans:
                for i, page in enumerate(_pages_at(where, range(n))):
                    self._store_one(page, bytes(mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]), pool, None)
                return True
            return self._store_cached(where, mv, n, pool, expect_gen)
        finally:
            self._pool_release(pool)

    def store_page(self, page: int, data, expect_gen: int | None = None,
                   may_wait: bool = True) -> bool:
        """store_pages for exactly one page (PAGE_SIZE bytes-like), without the batch set-up:
        the path of every 4 KiB write."""
        if type(data) is not bytes:
            data = bytes(data)
        pool = self.pool
        comp = pool.direct
        # Below the limit with a stateless compressor (nearly every store): no context and no
        # `users` hold, and one tree lock hold instead of three. Reading the limit unlocked is
        # zswap's own check (zswap_check_limits reads atomics); the pool is checked to be alive
        # before its entry goes in. Measured through a mount, fio 4 KiB, two jobs: see the
        # closing note of the performance issue.
        if comp is not None and self.pool_total_size < self.config.pool_limit \
                and not self.reached_full:
            cfg = self.config
            state, obj, length, fill = comp.scan_page(
                data, cfg.same_filled_pages_enabled, cfg.incompressible_policy == "store_raw")
            with self.tree_lock:
                if state == NONE:
                    self.c.reject_compress_poor += 1
                elif self.pools[pool.id] is pool:
                    return self._put_entry(page, state, obj, length, fill, pool, expect_gen)
            if state == NONE:
                return self._store_to_disk([data], [page], expect_gen)
            # the pool was closed while we compressed (a param change): the general path
        pool, reject = self._store_begin(may_wait)
        try:
            if reject:
                return self._store_to_disk([data], [page], expect_gen)
            return self._store_one(page, data, pool, expect_gen)
        finally:
            self._pool_release(pool)

    def _store_begin(self, may_wait: bool) -> tuple[Pool, bool]:
        """zswap_store()'s checks: (the current pool, now held while we compress; reject?)."""
        with self.tree_lock:
            # below the limit and accepting (nearly every store): nothing to check further
            if self.pool_total_size < self.config.pool_limit and not self.reached_full:
                reject = False
            else:
                reject = self._check_limits()
                if not reject and may_wait and self.config.limit_policy == "evict":
                    self._wait_for_space()
            pool = self.pool
            pool.users += 1             # holds the pool while compressing (zswap_pool_get)
        return pool, reject

    def _pool_release(self, pool: Pool) -> None:
        """Drop a `users` hold taken to compress or decompress with `pool` unlocked."""
        with self.tree_lock:
            pool.users -= 1
            self._pool_put_if_dead(pool)

    def page_gen(self, page: int) -> int:
        """The generation of a page's entry (changes whenever the entry does)."""
        with self.tree_lock:
            return self._gen[page]

    def wait_for_space(self) -> None:
        """Back-pressure for the evict policy, for a caller about to take a page lock."""
        with self.tree_lock:
            if self.config.limit_policy == "evict":
                self._wait_for_space()

    def _wait_for_space(self) -> None:
        """Back-pressure for the evict policy. Caller holds the tree lock and no page lock
        (the writeback worker needs page locks to make space)."""
        if self.pool_total_size < self.config.pool_limit + OVERSHOOT:
            return
        if time.monotonic() - self._wb_failed_at < SPACE_WAIT:
            return      # writeback is failing: waiting would only slow every write to a crawl
        deadline = time.monotonic() + SPACE_WAIT
        while self.pool_total_size >= self.config.pool_limit + OVERSHOOT and not self._closing:
            self._wake_writeback()
            left = deadline - time.monotonic()
            if left <= 0:
                return      # the disk is failing (reject_reclaim_fail): keep data, exceed the limit
            self._wb_cond.wait(left)

    def _store_one(self, page: int, data: bytes, pool: Pool, expect_gen: int | None) -> bool:
        """store_pages for one page with scalar code through the pool's contexts: a numpy call
        costs 1-6 us, a 4 KiB store about 40 of them (measured: 250 us per random 4 KiB write,
        in-process)."""
        cfg = self.config
        first = data[:8]
        # first word == last word rules out nearly every other page before the full compare
        if cfg.same_filled_pages_enabled and first == data[-8:] and data == first * WORDS:
            state, obj, length = SAME, None, 0
            fill = int.from_bytes(first, "little")
        else:
            fill = 0
            r = pool.contexts.compress_page(data)
            if type(r) is bytes:
                state, obj, length = COMP, r, len(r)
            elif r == -errno.ENOSPC and cfg.incompressible_policy != "store_raw":
                with self.tree_lock:
                    self.c.reject_compress_poor += 1
                return self._store_to_disk([data], [page], expect_gen)
            else:                           # incompressible (6.18: stored raw) or an error
                state, obj, length = RAW, data, PAGE_SIZE
        with self.tree_lock:
            if not self._put_entry(page, state, obj, length, fill, pool, expect_gen):
                return False
            if state == RAW and r != -errno.ENOSPC:
                self.c.reject_compress_fail += 1
            return True

    def _put_entry(self, page: int, state: int, obj, length: int, fill: int, pool: Pool,
                   expect_gen: int | None) -> bool:
        """A scanned page into the entry table (SAME, COMP or RAW), replacing its old entry;
        False if `expect_gen` no longer matches. Caller holds the tree lock."""
        if expect_gen is not None and self._gen[page] != expect_gen:
            return False
        self._free_one(page)
        self._st[page] = state
        self._len[page] = length
        self._fill[page] = fill
        self.objs[page] = obj
        self._dirty[page] = True
        self._stamp[page] = self._seq
        self._seq += 1
        self.c.zswpout += 1
        if state == SAME:
            self.same_filled_pages += 1
            return True
        size = RAW_CHARGE if state == RAW else charge(length)
        self._pid[page] = pool.id
        pool.stored_pages += 1
        pool.total_size += size
        self.pool_total_size += size
        if state == RAW:
            self.stored_incompressible_pages += 1
        if self.pool_total_size > self.mem_used_max:
            self.mem_used_max = self.pool_total_size
        if self._over_limit():
            self._wake_writeback()
        return True

    def _free_one(self, page: int) -> None:
        """_free_entries for one page with scalar code. Caller holds the tree lock."""
        st = self._st[page]
        if st == COMP or st == RAW:
            pool = self.pools[self._pid[page]]
            size = RAW_CHARGE if st == RAW else charge(self._len[page])
            pool.stored_pages -= 1
            pool.total_size -= size
            self.pool_total_size -= size
            if st == RAW:
                self.stored_incompressible_pages -= 1
            self._pool_put_if_dead(pool)
            if self.trimmer.freed(size):
                self._wake_writeback()
        elif st == SAME:
            self.same_filled_pages -= 1
        self.objs[page] = None
        self._gen[page] = (self._gen[page] + 1) & 0xFFFFFFFF     # wraps as the uint32 array does
        self._dirty[page] = False
        self._ref[page] = False
        self._uwb[page] = False

    def _scan_pages(self, mv: memoryview, n: int, pool: Pool) -> tuple[tuple, int]:
        """zswap_store()'s per-page work for a request: ((objs, states, lengths, fills), failed),
        as _lz4pages.scan_pages returns it (states uint8, lengths uint16, fills uint64 buffers).

        Per page: SAME (fills holds its word), COMP (objs the stream, lengths its length), RAW
        (objs a copy of the page: incompressible under store_raw, or the compressor failed) or
        NONE (incompressible under reject: the caller sends it to disk). `failed` counts the
        compressor failures. Software lz4 does it all in one C call; other compressors and the
        engine go through numpy and compress_pages, with the same results."""
        cfg = self.config
        store_raw = cfg.incompressible_policy == "store_raw"
        if pool.contexts.scans:
            return pool.contexts.scan_pages(mv, cfg.same_filled_pages_enabled, store_raw), 0
        words = np.frombuffer(mv, dtype=np.uint64).reshape(n, WORDS)
        new_state = np.full(n, COMP, np.uint8)
        if cfg.same_filled_pages_enabled:
            # first word == last word filters nearly every non-same page before the full compare
            cand = np.flatnonzero(words[:, 0] == words[:, -1])
            if len(cand):
                same = cand[(words[cand] == words[cand, :1]).all(axis=1)]
                new_state[same] = SAME
        comp_idx = np.flatnonzero(new_state == COMP).tolist()
        pages = [mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in comp_idx]
        results = pool.contexts.compress_pages(pages) if pages else []

        if len(comp_idx) == n:
            new_objs = list(results)
        else:
            new_objs = [None] * n
            for i, r in zip(comp_idx, results):
                new_objs[i] = r
        new_len = np.zeros(n, np.uint16)
        new_len[comp_idx] = [len(r) if type(r) is bytes else 0 for r in results]
        fail = 0
        for i in [i for i, r in zip(comp_idx, results) if type(r) is not bytes]:
            if new_objs[i] == -errno.ENOSPC:      # did not fit in a page: incompressible
                if not store_raw:
                    new_state[i] = NONE
                    new_objs[i] = None
                    continue
            else:                                 # compressor error: 6.18 stores the page as-is
                fail += 1
            new_objs[i] = bytes(mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
            new_state[i] = RAW
            new_len[i] = PAGE_SIZE
        return (new_objs, new_state, new_len, np.ascontiguousarray(words[:, 0])), fail

    def _store_cached(self, where, mv: memoryview, n: int, pool: Pool,
                      expect_gen: int | None) -> bool:
        """Scan and install n pages at `where` (see store_pages)."""
        scan, fail = self._scan_pages(mv, n, pool)
        states = scan[1]
        to_disk = np.flatnonzero(np.frombuffer(states, np.uint8) == NONE).tolist() \
            if NONE in states else []
        with self.tree_lock:
            if expect_gen is not None and self._gen[where] != expect_gen:
                return False
            self.c.reject_compress_poor += len(to_disk)
            self.c.reject_compress_fail += fail
            # rejected pages keep their old entry until their disk write lands (below)
            self._install(where, scan, pool)
        if to_disk:
            return self._store_to_disk([mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in to_disk],
                                       _pages_at(where, to_disk), expect_gen)
        return True

    def _install(self, where, scan: tuple, pool: Pool) -> None:
        """A scan (_scan_pages) into the entry table, in C (_lz4pages.install), then the pool and
        gauge accounting of the entries it replaced and made. Caller holds the tree lock."""
        freed, old_same, old_raw, ncached, nsame, nraw, size = _lz4pages.install(
            self._table, where, scan, pool.id, self._seq, BYTES_HEADER + MALLOC_OVERHEAD)
        self._seq += 1
        if freed:
            total = 0
            for pid, count, nbytes in freed:
                old = self.pools[pid]
                old.stored_pages -= count
                old.total_size -= nbytes
                total += nbytes
                self._pool_put_if_dead(old)
            self.pool_total_size -= total
            if self.trimmer.freed(total):
                self._wake_writeback()      # the worker trims, once the objects are gone
        self.same_filled_pages += nsame - old_same
        self.stored_incompressible_pages += nraw - old_raw
        pool.stored_pages += ncached
        pool.total_size += size
        self.pool_total_size += size
        self.c.zswpout += ncached + nsame
        if self.pool_total_size > self.mem_used_max:
            self.mem_used_max = self.pool_total_size
        if self._over_limit():
            self._wake_writeback()

    def _store_to_disk(self, pages: list, idxs: list[int], expect_gen: int | None = None) -> bool:
        """A store that goes to disk first: write under the pages' locks, then erase the older
        cached entries (unless a newer store replaced them meanwhile)."""
        with self.page_locks.hold(idxs):
            with self.tree_lock:
                gens = self.gen[idxs].copy()
            if expect_gen is not None and gens[0] != expect_gen:
                return False
            datas = [bytes(p) for p in pages]
            try:
                self.backing.write_pages(idxs, datas)
                failed = False
            except DiskError as e:
                # Keep the data: cache the pages raw and dirty, over the limit if need be. The
                # write succeeds; the next fsync retries the disk and reports the error.
                log.warning("store to disk failed, caching the pages instead: %s", e)
                failed = True
            with self.tree_lock:
                arr = np.asarray(idxs)
                keep = self.gen[arr] == gens
                same = arr[keep]
                self._free_entries(same)
                if not failed:
                    self.state[same] = DISK
                else:
                    self._install_raw(same, [d for d, k in zip(datas, keep.tolist()) if k])
        return True

    def _install_raw(self, idx: np.ndarray, datas: list[bytes]) -> None:
        """Cache pages as raw dirty entries of the current pool (the disk refused them).
        Caller holds the tree lock and has freed the old entries."""
        pool = self.pool
        n = len(idx)
        self.state[idx] = RAW
        self.length[idx] = PAGE_SIZE
        self.pool_id[idx] = pool.id
        self.dirty[idx] = True
        self.stamp[idx] = self._seq
        self._seq += 1
        for p, d in zip(idx.tolist(), datas):
            self.objs[p] = d
        pool.stored_pages += n
        pool.total_size += n * RAW_CHARGE
        self.pool_total_size += n * RAW_CHARGE
        self.stored_incompressible_pages += n
        self.c.zswpout += n
        self.mem_used_max = max(self.mem_used_max, self.pool_total_size)
        if self._over_limit():
            self._wake_writeback()

    # =========================================================================================
    # load

    def load_pages(self, start: int, n: int, gens_out: list | None = None) -> bytes:
        """The bytes of pages start .. start+n. Raises DataError (EIO) if one cannot be read.
        `gens_out` (readahead): gets the pages' generations, taken with their entries."""
        if gens_out is None:
            if n == 1:
                return self.load_page(start)
            if n <= SMALL:
                data = self._load_few(start, n)
                if data is not None:
                    return data
        sel = slice(start, start + n)
        with self.tree_lock:
            if gens_out is not None:
                gens_out.append(self.gen[sel].copy())
            st = self.state[sel].copy()
            parts = self.objs[sel]          # RAW pages are their own bytes; the rest is replaced
            cached = (st == COMP) | (st == RAW)
            self.referenced[sel] |= cached
            self.c.zswpin += int(np.count_nonzero(cached | (st == SAME)))
            comp = np.flatnonzero(st == COMP)
            if len(comp):
                pids = self.pool_id[sel][comp]
                pools = self._pools_get(np.unique(pids))
            same = np.flatnonzero(st == SAME)
            fills = self.fill[sel][same].tolist() if len(same) else []
        try:
            for i in np.flatnonzero((st == NONE) | (st == DISK)).tolist():
                parts[i] = ZERO_PAGE            # DISK ones are overwritten below
            for i, f in zip(same.tolist(), fills):
                parts[i] = _filled_page(f)
            disk = np.flatnonzero(st == DISK)
            if len(disk):
                self._load_from_disk(start, disk, parts)
            if len(comp):
                # every other part is a whole page now: one call decompresses and joins
                if len(pools) == 1:
                    contexts = next(iter(pools.values())).contexts
                    if contexts.joins:
                        try:
                            return contexts.decompress_join(parts)
                        except CompressionError:
                            pass            # the page by page path below names the bad page
                self._decompress_into(parts, comp, pids, pools, start)
        finally:
            if len(comp):
                self._pools_put(pools)
        return b"".join(parts)

    def gens_match(self, start: int, gens: np.ndarray) -> bool:
        """True if no entry of pages start .. start+len(gens) changed since `gens` was taken."""
        with self.tree_lock:
            return bool((self.gen[start:start + len(gens)] == gens).all())

    def load_page(self, page: int) -> bytes:
        """load_pages for one page with scalar code (see _store_one): a 4 KiB read's path. A
        pool with a stateless compressor decompresses without a context or a `users` hold (see
        store_page): the object is ours once read, and nothing of the pool is used."""
        with self.tree_lock:
            st = self._st[page]
            if st == COMP:
                obj = self.objs[page]
                self._ref[page] = True
                self.c.zswpin += 1
                pool = self.pools[self._pid[page]]
                direct = pool.direct
                if direct is None:
                    pool.users += 1     # not closed while we decompress with it unlocked
            elif st == RAW:
                self._ref[page] = True
                self.c.zswpin += 1
                return self.objs[page]
            elif st == SAME:
                self.c.zswpin += 1
                return _filled_page(self._fill[page])
            elif st == NONE:
                return ZERO_PAGE
        if st == COMP:
            try:
                if direct is not None:
                    return direct.decompress(obj)
                try:
                    return pool.contexts.decompress_page(obj)
                finally:
                    self._pool_release(pool)
            except CompressionError as e:
                with self.tree_lock:
                    self.c.decompress_fail += 1
                raise DataError(f"page {page}: decompression failed ({e})") from None
        parts = [None]
        self._load_from_disk(page, np.zeros(1, np.int64), parts)
        return bytes(parts[0])

    def _load_few(self, start: int, n: int) -> bytes | None:
        """load_pages for a few pages (swap-in reads 32 KiB) with scalar code, one tree lock hold
        and one decompress_join call. None, with nothing changed, when a page is on disk or the
        compressed pages are not all in one pool that joins: the general path takes those."""
        end = start + n
        st_, pid_ = self._st, self._pid
        with self.tree_lock:
            parts = self.objs[start:end]
            pool = None
            cached = []
            nsame = 0
            for i, p in enumerate(range(start, end)):
                s = st_[p]
                if s == COMP:
                    if pool is None:
                        pool = self.pools[pid_[p]]
                        if not pool.contexts.joins:
                            return None
                    elif pid_[p] != pool.id:
                        return None
                    cached.append(p)
                elif s == RAW:
                    cached.append(p)
                elif s == SAME:
                    parts[i] = _filled_page(self._fill[p])
                    nsame += 1
                elif s == NONE:
                    parts[i] = ZERO_PAGE
                else:
                    return None             # DISK
            for p in cached:
                self._ref[p] = True
            self.c.zswpin += len(cached) + nsame
            if pool is None:
                return b"".join(parts)
            pool.users += 1
        try:
            return pool.contexts.decompress_join(parts)
        except CompressionError:
            # page by page, which names the bad page (DataError); compressed objects are the
            # parts shorter than a page
            comp = np.array([i for i in range(n) if len(parts[i]) < PAGE_SIZE])
            self._decompress_into(parts, comp, np.full(len(comp), pool.id), {pool.id: pool},
                                  start)
            return b"".join(parts)
        finally:
            self._pool_release(pool)

    def _decompress_into(self, parts: list, comp: np.ndarray, pids: np.ndarray, pools: dict,
                         start: int) -> None:
        """parts[i] = decompressed parts[i] for i in comp, each with its own pool's contexts."""
        groups = [(pools[int(pids[0])], comp.tolist())] if len(pools) == 1 else \
            [(pool, comp[pids == pid].tolist()) for pid, pool in pools.items()]
        for pool, items in groups:
            results = pool.contexts.decompress_pages([parts[i] for i in items])
            for i, r in zip(items, results):
                if type(r) is not bytes:
                    with self.tree_lock:
                        self.c.decompress_fail += 1
                    raise DataError(f"page {start + i}: decompression failed ({r})")
                parts[i] = r

    def _load_from_disk(self, start: int, disk: np.ndarray, parts: list) -> None:
        """Read runs of on-disk pages under their locks, re-reading any page a store or discard
        changed while we waited for the lock."""
        runs = np.split(disk, np.flatnonzero(np.diff(disk) != 1) + 1)
        for run in runs:
            first, count = int(run[0]), len(run)
            with self.page_locks.hold_range(start + first, count):
                with self.tree_lock:
                    moved = self.state[start + first:start + first + count] != DISK
                if moved.any():
                    # cached again (or discarded) since our snapshot: take the current bytes
                    data = self.load_pages(start + first, count)
                else:
                    data = self.backing.read_pages(start + first, count)
            mv = memoryview(data)
            for k in range(count):
                parts[first + k] = mv[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]

    # =========================================================================================
    # invalidate (discard)

    def invalidate_pages(self, start: int, n: int) -> None:
        """Drop whole pages (discard): cached entries freed, backing punched, reads give zeros."""
        with self.page_locks.hold_range(start, n):
            with self.tree_lock:
                sel = slice(start, start + n)
                self._free_entries(sel)
                self.state[sel] = NONE
                self.c.discarded_pages += n
            self.backing.discard(start, n)

    # =========================================================================================
    # writeback

    def _select_victims(self, want: int) -> tuple[np.ndarray, np.ndarray]:
        """The `want` coldest LRU pages not read since they were stored; referenced pages colder
        than them get their second chance (flag cleared, rotated to the tail) in the same pass.
        Caller holds the tree lock. Returns (pages, gens), marked under writeback.

        One pass in stamp order over the coldest k candidates: a loop that rotated `want`
        referenced pages per scan held the tree lock for 73 s over 512Ki referenced pages."""
        lru = np.flatnonzero(((self.state == COMP) | (self.state == RAW)) & ~self.under_wb)
        if not len(lru):
            return lru, lru
        k = min(len(lru), max(4 * want, 1024))
        while True:
            cand = lru if k >= len(lru) else lru[np.argpartition(self.stamp[lru], k - 1)[:k]]
            cand = cand[np.argsort(self.stamp[cand], kind="stable")]
            ref = self.referenced[cand]
            unref = np.flatnonzero(~ref)
            if len(unref) >= want or k >= len(lru):
                break
            k = min(len(lru), k * 4)
        if not len(unref):                  # all referenced: each has had its chance now
            self.referenced[cand] = False
            victims = cand[:want]
        else:
            cut = int(unref[min(want, len(unref)) - 1]) + 1
            victims = cand[:cut][~ref[:cut]]
            second = cand[:cut][ref[:cut]]
            if len(second):
                self.referenced[second] = False
                self.stamp[second] = self._seq
                self._seq += 1
        victims = np.sort(victims)
        self.under_wb[victims] = True
        return victims, self.gen[victims].copy()

    def _materialize(self, pages: np.ndarray) -> tuple[list[int], list[bytes], list[int]]:
        """Uncompressed bytes of cached pages (caller holds their page locks, not the tree lock).
        Returns (pages, data, failed): pages whose decompression failed are left out."""
        with self.tree_lock:
            st = self.state[pages].copy()
            objs = [self.objs[p] for p in pages.tolist()]
            pids = self.pool_id[pages].copy()
            fills = self.fill[pages].copy()
            pools = self._pools_get(np.unique(pids[st == COMP]))
        try:
            return self._materialize_unlocked(pages, st, objs, pids, fills, pools)
        finally:
            self._pools_put(pools)

    def _materialize_unlocked(self, pages, st, objs, pids, fills, pools):
        out_pages, out_data, failed = [], [], []
        comp = [i for i in range(len(pages)) if st[i] == COMP]
        decomp: dict[int, bytes] = {}
        by_pool: dict[int, list[int]] = {}
        for i in comp:
            by_pool.setdefault(int(pids[i]), []).append(i)
        for pid, items in by_pool.items():
            for i, r in zip(items, pools[pid].contexts.decompress_pages([objs[i] for i in items])):
                if type(r) is bytes:
                    decomp[i] = r
                else:
                    failed.append(int(pages[i]))
        for i, p in enumerate(pages.tolist()):
            s = st[i]
            if s == COMP:
                if i in decomp:
                    out_pages.append(p)
                    out_data.append(decomp[i])
            elif s == RAW:
                out_pages.append(p)
                out_data.append(objs[i])
            elif s == SAME:
                out_pages.append(p)
                out_data.append(_filled_page(fills[i]))
        if failed:
            with self.tree_lock:
                self.c.decompress_fail += len(failed)
        return out_pages, out_data, failed

    def _writeback(self, victims: np.ndarray, gens: np.ndarray) -> bool:
        """Write victims to disk and drop them from the cache. False if the disk failed: the
        victims not written stay cached, dirty, off writeback."""
        try:
            for lo in range(0, len(victims), BATCH):
                if not self._writeback_batch(victims[lo:lo + BATCH], gens[lo:lo + BATCH]):
                    return False
            return True
        finally:
            with self.tree_lock:
                left = victims[self.gen[victims] == gens]
                self.under_wb[left] = False
                self._wb_cond.notify_all()

    def _writeback_batch(self, pages: np.ndarray, pgens: np.ndarray) -> bool:
        with self.page_locks.hold(pages.tolist()):
            with self.tree_lock:
                valid = self.gen[pages] == pgens
                pages, pgens = pages[valid], pgens[valid]
                dirty = self.dirty[pages].copy()
            wpages, wdata, _ = self._materialize(pages[dirty])
            try:
                if wpages:
                    self.backing.write_pages(wpages, wdata)
            except DiskError as e:
                log.warning("writeback failed: %s", e)
                with self.tree_lock:
                    self.c.reject_reclaim_fail += 1
                    self._wb_failed_at = time.monotonic()
                return False
            written = np.isin(pages, wpages)
            with self.tree_lock:
                still = self.gen[pages] == pgens
                # clean pages were already on disk; dirty ones only if their write happened
                drop = pages[still & (~dirty | written)]
                self._free_entries(drop)
                self.state[drop] = DISK
                self.c.written_back_pages += len(wpages)
                self.c.zswpwb += len(wpages)
        return True

    def shrink(self, target: int) -> bool:
        """Write back cold pages until the pool holds at most `target` bytes (shrink_worker).
        Returns False if a disk error stopped it."""
        while True:
            with self.tree_lock:
                excess = self.pool_total_size - target
                if excess <= 0 or self._closing:
                    return True
                avg = max(self.pool_total_size // max(self._lru_count(), 1), 64)
                want = int(min(max(excess // avg + 1, 64), 8192))
                victims, gens = self._select_victims(want)
            if not len(victims):
                return True
            if not self._writeback(victims, gens):
                return False

    def _lru_count(self) -> int:
        return sum(p.stored_pages for p in self.pools if p is not None)

    def _writeback_worker(self) -> None:
        """One worker: limit-driven writeback down to the accept threshold, and the shrinker."""
        try:
            while True:
                with self.tree_lock:
                    if not self._wb_wanted and not self._closing:
                        self._wb_cond.wait(SHRINK_INTERVAL)
                    if self._closing:
                        return
                    wanted, self._wb_wanted = self._wb_wanted, False
                    over = self._over_limit() or (self.reached_full and
                                                  self.pool_total_size > self._accept_level())
                    shrinker = self.config.shrinker_enabled
                if wanted or over:
                    if not self.shrink(self._accept_level()):
                        self._pause_after_failure()
                elif shrinker and self._lru_count() and self.memory_pressure():
                    # shrinker: under memory pressure give back a quarter of the pool per pass
                    with self.tree_lock:
                        target = self.pool_total_size * 3 // 4
                    if not self.shrink(target):
                        self._pause_after_failure()
                c = self.c          # read unlocked: any change is activity
                self.trimmer.trim(activity=c.zswpout + c.zswpin + c.discarded_pages,
                                  pool_size=self.pool_total_size)
        except BaseException as e:  # no worker exception is lost: the store re-raises it
            log.critical("writeback worker died: %s", e, exc_info=True)
            self._worker_error = e
            with self.tree_lock:
                self._wb_cond.notify_all()

    def _pause_after_failure(self) -> None:
        with self.tree_lock:
            if not self._closing:
                self._wb_cond.wait(0.5)

    # =========================================================================================
    # flush (fsync) and close

    def flush(self, keep_going: bool = False) -> int:
        """Write every dirty page to disk and make the backing durable; entries stay, now clean.
        Returns the number of pages flushed. Raises DiskError (pages stay dirty): at the first
        failed write, or with `keep_going` (a close) after trying every page."""
        with self.tree_lock:
            dirty = np.flatnonzero(self.dirty & ~self.under_wb)
            in_writeback = np.flatnonzero(self.dirty & self.under_wb)
        flushed: list[tuple[np.ndarray, np.ndarray]] = []
        lost: list[int] = []
        errors: list[DiskError] = [] if keep_going else None
        self._flush_pages(dirty, flushed, lost, errors)
        if len(in_writeback):
            # The worker is writing these. Wait for it; any it left dirty (its disk write failed,
            # or the entry changed) were written before this fsync, so write them here.
            self._wait_under_wb(in_writeback)
            with self.tree_lock:
                again = in_writeback[self.dirty[in_writeback]]
            self._flush_pages(again, flushed, lost, errors)
        try:
            self.backing.sync()
            synced = flushed
        except DiskError as e:
            if errors is None:
                raise
            errors.append(e)
            synced = []         # written, not durable: they stay dirty
        n = 0
        with self.tree_lock:
            for pages, gens in synced:
                same = pages[self.gen[pages] == gens]
                self.dirty[same] = False
                n += len(same)
            self.c.flushed_pages += n
        if errors:
            raise errors[0]
        if lost:
            raise DataError(f"fsync: {len(lost)} page(s) could not be decompressed (first: "
                            f"page {lost[0]}); they read as EIO")
        return n

    def _flush_pages(self, dirty: np.ndarray, flushed: list, lost: list,
                     errors: list | None) -> None:
        """Write dirty pages (not yet durable); append (pages, gens) written to `flushed` and
        pages whose data could not be decompressed to `lost`. A failed write raises, or with
        `errors` (a list) is appended there and the next batch is tried."""
        for lo in range(0, len(dirty), BATCH):
            pages = dirty[lo:lo + BATCH]
            with self.page_locks.hold(pages.tolist()):
                with self.tree_lock:
                    pages = pages[self.dirty[pages]]
                    gens = self.gen[pages].copy()
                wpages, wdata, failed = self._materialize(pages)
                try:
                    if wpages:
                        self.backing.write_pages(wpages, wdata)
                except DiskError as e:
                    if errors is None:
                        raise
                    errors.append(e)
                    continue
                ok = ~np.isin(pages, failed)
                flushed.append((pages[ok], gens[ok]))
                lost.extend(failed)

    def _wait_under_wb(self, pages: np.ndarray) -> None:
        deadline = time.monotonic() + FLUSH_WAIT
        with self.tree_lock:
            while self.under_wb[pages].any():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DiskError(f"fsync: writeback still running after {FLUSH_WAIT:.0f} s",
                                    errno.EIO)
                self._wb_cond.wait(min(left, 0.05))

    def close(self, write_back: bool = True) -> None:
        """Stop the worker, write everything back (unless `write_back` is False), free pools."""
        if self._closing:
            return
        with self.tree_lock:
            self._closing = True
            self._wb_cond.notify_all()
        self._worker.join(timeout=30)
        if self._worker.is_alive():
            log.warning("writeback worker did not stop within 30 s")
        try:
            if write_back:
                self.flush(keep_going=True)
        finally:
            with self.tree_lock:
                for pool in self.pools:
                    if pool is not None:
                        pool.close()
                for engine in self._engines.values():
                    engine.close()
                self._engines.clear()

    def dirty_pages(self) -> np.ndarray:
        """Pages whose data the backing file does not hold durably (after a failed close: the
        pages to mark lost)."""
        with self.tree_lock:
            return np.flatnonzero(self.dirty)

    def check_worker(self) -> None:
        if self._worker_error is not None:
            raise DataError(f"writeback worker failed: {self._worker_error}")

    # =========================================================================================
    # stats

    def snapshot(self) -> dict:
        with self.tree_lock:
            pools = [p for p in self.pools if p is not None]
            d = {
                "stored_pages": sum(p.stored_pages for p in pools) + self.same_filled_pages,
                "same_filled_pages": self.same_filled_pages,
                "stored_incompressible_pages": self.stored_incompressible_pages,
                "pool_total_size": self.pool_total_size,
                # held over the limit: writeback is catching up, or the disk refuses it
                "pool_over_limit": max(self.pool_total_size - self.config.pool_limit, 0),
                **self.c.as_dict(),
                "mem_used_max": self.mem_used_max,
                "acomp_contexts": sum(p.contexts.live for p in pools),
                "pools": [{"compressor": label, "stored_pages": p.stored_pages, "refs": p.refs}
                          for p, label in zip(pools, labels(pools))],
                "compr_data_size": int(self.length[(self.state == COMP) | (self.state == RAW)]
                                       .astype(np.int64).sum()),
                "engines": [e for e in self._engines.values()],
                "hw_closed": self._hw_closed,
            }
            cached = d["stored_pages"]
            d["orig_data_size"] = cached * PAGE_SIZE
            d["dirty_pages"] = int(np.count_nonzero(self.dirty))
        engines = d.pop("engines")
        d["hw"] = _merge_hw([d.pop("hw_closed")] + [e.stats() for e in engines])
        return d


HW_COUNTERS = ("submitted", "completed", "backlogged", "rejected_full", "errors", "fallbacks")


def _merge_hw(stats: list[dict]) -> dict:
    """The `hw` object of engines' stats, oldest first: counters summed, `inflight_max` and the
    latency `max` the largest, everything else (percentiles, mode, queues) the newest engine's;
    zeros without any engine."""
    if not stats:
        return {**dict.fromkeys(HW_COUNTERS, 0), "inflight_max": 0,
                "latency_us": {"p50": 0, "p90": 0, "p99": 0, "max": 0}}
    merged = dict(stats[-1])
    for key in HW_COUNTERS:
        merged[key] = sum(s.get(key, 0) for s in stats)
    merged["inflight_max"] = max(s.get("inflight_max", 0) for s in stats)
    merged["latency_us"] = {**merged["latency_us"],
                            "max": max(s["latency_us"]["max"] for s in stats)}
    return merged


def _system_memory_pressure() -> bool:
    """The shrinker's trigger: less than 10% of RAM available (kernel shrinkers run on reclaim)."""
    vm = psutil.virtual_memory()
    return vm.available < vm.total // 10
