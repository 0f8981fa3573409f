"""Writeback, shrink and flush: moving cached pages to the backing file.

- The worker (one thread): when a store finds the pool at its limit, it writes back cold pages
  until the pool is below the accept threshold: under the `zswap` policy as zswap's
  shrink_worker does (second chance for every stored page, and it gives up at the
  MAX_RECLAIM_RETRIES-th referenced page it meets, leaving stores rejected until the pool
  drains); under `evict` it writes back the coldest until it gets there. When the system is short
  of memory (the shrinker), a quarter of the pool per pass. And it gives freed heap back to the
  system (the Trimmer), outside every lock.
- flush (fsync and unmount): every dirty page to disk, then the backing made durable; entries
  stay, now clean. Two threads flush batches side by side (the caller and a helper): one's
  decompression runs while the other's disk write does (both release the GIL with lz4 and
  zblock._lz4pages; other algorithms decompress page by page).
Writeback writes the uncompressed page, as zswap does.

Invariants: a page's disk write happens under that page's lock, and its entry stays in the
table, marked under_wb, until the write completes (zram ZRAM_UNDER_WB); the entry is dropped
only if its generation did not change meanwhile. Decompression and disk I/O run without the
tree lock.

Lock order: page locks -> tree lock (the cache's); the worker sleeps on the cache's wb_cond.

Not here: which pages are coldest (zblock.lru), the entries (zblock.entries), store and load
(zblock.cache). `cache` is the owning zblock.cache.Cache, whose locks, table, registry, backing,
config and counters this shares.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Callable

import psutil

from . import vec
from .cpus import unpin
from .entries import FAR
from .errors import DataError, DiskError
from .lru import MAX_RECLAIM_RETRIES, select_victims, walk_like_zswap
from .pool import Trimmer
from .scan import COMP, RAW, SAME, filled_page

log = logging.getLogger(__name__)

BATCH = 256                 # pages per writeback/flush disk batch (1 MiB)
SHRINK_INTERVAL = 1.0       # seconds between shrinker passes when idle
FLUSH_WAIT = 30.0           # fsync waits this long for the worker's writes in flight
FAILURE_PAUSE = 0.5         # the worker waits this long after a failed write before retrying
# After a zswap-policy pass that gave up without writing anything back, the next waits this long
# (the kernel's pass costs microseconds; ours ~1 ms under the tree lock, and rejected stores
# asked for one back to back).
GIVE_UP_PAUSE = 0.02
# Free heap is given back once the cache has been quiet this long (Trimmer.idle): after a
# 256 MiB read-back the server held 2-5 MiB of freed reply buffers until the next write burst.
TRIM_IDLE = 1.0


def system_memory_pressure() -> bool:
    """The shrinker's trigger: less than 10% of RAM available (kernel shrinkers run on reclaim)."""
    vm = psutil.virtual_memory()
    return vm.available < vm.total // 10


class Writeback:
    """The writeback worker, writeback of victims, flush and close for one cache."""

    def __init__(self, cache, memory_pressure: Callable[[], bool] | None = None):
        self.cache = cache
        self.trimmer = Trimmer(idle=TRIM_IDLE)
        self.memory_pressure = memory_pressure or system_memory_pressure
        self.closing = False
        self.failed_at = -1e9               # when a write to the file last failed (monotonic)
        self.evicted = 0                    # pages dropped from the cache by writeback
        self._wanted = False
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="zblock-writeback", daemon=True)
        self._worker.start()

    # ---- the worker -----------------------------------------------------------------------

    def wake(self) -> None:
        """Have the worker look now. Caller holds the tree lock."""
        self._wanted = True
        self.cache.wb_cond.notify_all()

    @property
    def pending(self) -> bool:
        """A wake() the worker has not taken up yet (it clears this as it starts a pass).
        Caller holds the tree lock."""
        return self._wanted

    def _run(self) -> None:
        cache = self.cache
        try:
            while True:
                with cache.tree_lock:
                    if not self._wanted and not self.closing:
                        cache.wb_cond.wait(SHRINK_INTERVAL)
                    if self.closing:
                        return
                    wanted, self._wanted = self._wanted, False
                    over = cache.limits.over() or cache.limits.above_accept()
                    shrinker = cache.config.shrinker_enabled
                    lru = sum(p.stored_pages for p in cache.registry.live())
                if wanted or over:
                    before = self.evicted
                    like_zswap = cache.config.limit_policy == "zswap"
                    if not self.shrink(cache.limits.accept_level, like_zswap=like_zswap):
                        self._pause_after_failure()
                    elif like_zswap and self.evicted == before and \
                            cache.table.pool_total_size > cache.limits.accept_level():   # gave up
                        self._pause(GIVE_UP_PAUSE)
                elif shrinker and lru and self.memory_pressure():
                    # the shrinker: under memory pressure give back a quarter of the pool a pass
                    with cache.tree_lock:
                        target = cache.table.pool_total_size * 3 // 4
                    if not self.shrink(target):
                        self._pause_after_failure()
                if cache.far_pages is not None and not cache.far_pages.maintain():
                    self._pause_after_failure()
                c = cache.c             # read unlocked: any change is activity
                self.trimmer.trim(activity=c.zswpout + c.zswpin + c.discarded_pages,
                                  pool_size=cache.table.pool_total_size)
                with cache.tree_lock:
                    cache.registry.collect()
                cache.registry.reap()
        except BaseException as e:  # no worker exception is lost: check() re-raises it
            log.critical("writeback worker died: %s", e, exc_info=True)
            self._error = e
            with cache.tree_lock:
                cache.wb_cond.notify_all()

    def _pause_after_failure(self) -> None:
        with self.cache.tree_lock:
            if not self.closing:
                self.cache.wb_cond.wait(FAILURE_PAUSE)

    def _pause(self, seconds: float) -> None:
        """Sleep `seconds` whatever wakes the worker meanwhile (closing ends it)."""
        deadline = time.monotonic() + seconds
        with self.cache.tree_lock:
            while not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.cache.wb_cond.wait(left)

    def check(self) -> None:
        if self._error is not None:
            raise DataError(f"writeback worker failed: {self._error}")

    # ---- writeback of victims -------------------------------------------------------------

    def shrink(self, target: int | Callable[[], int], like_zswap: bool = False) -> bool:
        """Write back cold pages until the pool holds at most `target` bytes (a callable is asked
        again each batch: a pool_limit raised meanwhile ends the pass); `like_zswap`: walk as
        shrink_worker does and stop where it gives up. Returns False if a disk error stopped
        it."""
        cache = self.cache
        failures = 0
        while True:
            with cache.tree_lock:
                table = cache.table
                excess = table.pool_total_size - (target() if callable(target) else target)
                if excess <= 0 or self.closing or failures >= MAX_RECLAIM_RETRIES:
                    return True
                lru = max(sum(p.stored_pages for p in cache.registry.live()), 1)
                avg = max(table.pool_total_size // lru, 64)
                want = int(min(max(excess // avg + 1, 64), 8192))
                if like_zswap:
                    victims, gens, failed = walk_like_zswap(table, want,
                                                            MAX_RECLAIM_RETRIES - failures)
                    failures += failed
                else:
                    victims, gens = select_victims(table, want)
            if not len(victims):
                return True         # nothing cached, or shrink_worker would give up here
            ok, _ = self.write_back(victims, gens)
            if not ok:
                return False

    def write_back(self, victims: list[int], gens: list[int],
                   far: bool = True) -> tuple[bool, int]:
        """Move victims (marked under_wb) down a tier and drop them from the cache: cached
        pages to the far tier where it takes them (unless `far` is False), else to disk; far pages
        to disk. Returns (False if the disk failed or the writeback budget ran out, pages moved);
        the victims not moved stay as they were, off writeback."""
        cache = self.cache
        moved = 0
        try:
            for lo in range(0, len(victims), BATCH):
                ok, n = self._write_back_batch(victims[lo:lo + BATCH], gens[lo:lo + BATCH], far)
                moved += n
                if not ok:
                    return False, moved
            return True, moved
        finally:
            with cache.tree_lock:
                vec.scatter(cache.table.under_wb, cache.table.unchanged(victims, gens), 0)
                cache.wb_cond.notify_all()

    def _write_back_batch(self, pages: list[int], pgens: list[int],
                          far: bool) -> tuple[bool, int]:
        cache = self.cache
        table = cache.table
        sent: list[int] = []
        with cache.page_locks.hold(pages):
            with cache.tree_lock:
                valid = [(p, g) for p, g in zip(pages, pgens) if table.gen[p] == g]
            if far and cache.far_pages is not None and valid:
                sent = cache.far_pages.send([p for p, _ in valid], [g for _, g in valid])
                if len(sent):
                    with cache.tree_lock:
                        self.evicted += len(sent)
                    gone = set(sent)
                    valid = [(p, g) for p, g in valid if p not in gone]
            with cache.tree_lock:
                dirty = [p for p, _ in valid if table.dirty[p]]
                # the budget is asked before any decompression: an empty one costs nothing
                allowed = cache.limits.take_budget(len(dirty))
            out_of_budget = allowed < len(dirty)
            if out_of_budget:           # the dirty pages past the budget stay as they are
                over = set(dirty[allowed:])
                valid = [(p, g) for p, g in valid if p not in over]
                dirty = dirty[:allowed]
            wpages, wdata, _ = self.materialize(dirty)
            if len(wpages) < allowed:   # pages that could not be read back: nothing written
                with cache.tree_lock:
                    cache.limits.refund_budget(allowed - len(wpages))
            try:
                if wpages:
                    cache.backing.write_pages(wpages, wdata)
            except DiskError as e:
                log.warning("writeback failed: %s", e)
                with cache.tree_lock:
                    cache.c.reject_reclaim_fail += 1
                    self.failed_at = time.monotonic()
                    cache.limits.refund_budget(len(wpages))
                return False, len(sent)
            unwritten = set(dirty).difference(wpages)
            with cache.tree_lock:
                # clean pages were already on disk; dirty ones only if their write happened
                drop = [p for p, g in valid if table.gen[p] == g and p not in unwritten]
                self.evicted += len(drop)
                cache.c.far_demoted_pages += sum(table.state[p] == FAR for p in drop)
                table.free(drop)
                table.set_disk(drop)
                cache.c.written_back_pages += len(wpages)
                cache.c.zswpwb += len(wpages)
        return not out_of_budget, len(sent) + len(drop)

    def materialize(self, pages: list[int]) -> tuple[list[int], list[bytes], list[int]]:
        """Uncompressed bytes of cached pages (caller holds their page locks, not the tree
        lock). Returns (pages, data, failed): pages whose decompression failed are left out."""
        cache = self.cache
        table = cache.table
        with cache.tree_lock:
            st = vec.gather(table.state, pages)
            objs = [table.obj(p) for p in pages]
            pids = vec.gather(table.pool_id, pages)
            fills = vec.gather(table.fill, pages)
            pools = cache.registry.hold({i for i, s in zip(pids, st) if s == COMP})
        try:
            data: dict[int, bytes] = {}
            failed = []
            for pid, pool in pools.items():
                items = [i for i, (s, q) in enumerate(zip(st, pids)) if s == COMP and q == pid]
                for i, r in zip(items, pool.contexts.decompress([objs[i] for i in items])):
                    if type(r) is bytes:
                        data[i] = r
                    else:
                        failed.append(pages[i])
        finally:
            cache.registry.release(pools.values())
        if failed:
            with cache.tree_lock:
                cache.c.decompress_fail += len(failed)
        far = [i for i, s in enumerate(st) if s == FAR]
        if far:
            for i, r in zip(far, cache.far_pages.read([pages[i] for i in far], failed,
                                                      access=False)):
                if r is not None:
                    data[i] = r
        out_pages, out_data = [], []
        for i, p in enumerate(pages):
            s = st[i]
            if s == RAW:
                data[i] = objs[i]
            elif s == SAME:
                data[i] = filled_page(fills[i])
            if i in data:
                out_pages.append(p)
                out_data.append(data[i])
        return out_pages, out_data, failed

    # ---- flush and close ------------------------------------------------------------------

    def flush(self, keep_going: bool = False, pages: list[int] | None = None) -> int:
        """Write every dirty page (of `pages`, if given) to disk and make the backing durable;
        entries stay, now clean. Returns the number of pages flushed. Raises DiskError (pages
        stay dirty): at the first failed write, or with `keep_going` (a close) after trying
        every page."""
        cache = self.cache
        table = cache.table
        with cache.tree_lock:
            if pages is None:
                dirty = table.find(lambda s: table.dirty[s])
            else:
                dirty = [p for p in pages if table.dirty[p]]
            in_writeback = [p for p in dirty if table.under_wb[p]]
            if in_writeback:
                dirty = [p for p in dirty if not table.under_wb[p]]
        flushed: list[tuple[list[int], list[int]]] = []
        lost: list[int] = []
        errors: list[DiskError] | None = [] if keep_going else None
        self._flush_pages(dirty, flushed, lost, errors)
        if len(in_writeback):
            # The worker is writing these. Wait for it; any it left dirty (its disk write failed,
            # or the entry changed) were written before this fsync, so write them here.
            self._wait_under_wb(in_writeback)
            with cache.tree_lock:
                again = [p for p in in_writeback if table.dirty[p]]
            self._flush_pages(again, flushed, lost, errors)
        try:
            cache.backing.sync()
            synced = flushed
        except DiskError as e:
            self._redirty_unsynced()
            if errors is None:
                raise
            errors.append(e)
            synced = []         # written, not durable: they stay dirty
        n = 0
        with cache.tree_lock:
            for pages, gens in synced:
                same = table.unchanged(pages, gens)
                vec.scatter(table.dirty, same, 0)
                n += len(same)
            cache.c.flushed_pages += n
        if errors:
            raise errors[0]
        if lost:
            raise DataError(f"fsync: {len(lost)} page(s) could not be read back to be written "
                            f"(first: page {lost[0]}); they read as EIO")
        return n

    def _redirty_unsynced(self) -> None:
        """After a failed sync: cached pages the file holds but has not made durable (written
        through, or clean since an earlier write) are dirty again, so the next fsync writes
        them again and a failed close marks them lost."""
        cache = self.cache
        pages = cache.backing.unsynced_pages()
        with cache.tree_lock:
            state = cache.table.state
            vec.scatter(cache.table.dirty,
                        [p for p in pages if state[p] in (COMP, RAW, SAME, FAR)], 1)

    def _flush_pages(self, dirty: list[int], flushed: list, lost: list,
                     errors: list | None) -> None:
        """Write dirty pages (not yet durable); append (pages, gens) written to `flushed` and
        pages whose data could not be decompressed to `lost`. A failed write raises (once both
        threads have stopped), or with `errors` (a list) is appended there and the next batch
        is tried. Batches are taken in order by the caller and one helper thread."""
        batches = iter([dirty[lo:lo + BATCH] for lo in range(0, len(dirty), BATCH)])
        take = threading.Lock()
        failure: list[BaseException] = []

        def work() -> None:
            while not failure:
                with take:
                    pages = next(batches, None)
                if pages is None:
                    return
                try:
                    self._flush_batch(pages, flushed, lost, errors)
                except BaseException as e:      # a test's Crash too: raised by the caller
                    failure.append(e)

        helper = None
        if len(dirty) > BATCH:
            helper = threading.Thread(target=lambda: (unpin(), work()), name="zblock-flush",
                                      daemon=True)
            try:
                helper.start()
            except RuntimeError:            # no thread to be had: flush on this one alone
                helper = None
        work()
        if helper is not None:
            helper.join()
        if failure:
            raise failure[0]

    def _flush_batch(self, pages: list[int], flushed: list, lost: list,
                     errors: list | None) -> None:
        """_flush_pages for one batch, under its pages' locks."""
        cache = self.cache
        with cache.page_locks.hold(pages):
            with cache.tree_lock:
                pages = [p for p in pages if cache.table.dirty[p]]
                gens = vec.gather(cache.table.gen, pages)
            wpages, wdata, failed = self.materialize(pages)
            try:
                if wpages:
                    cache.backing.write_pages(wpages, wdata)
            except DiskError as e:
                if errors is None:
                    raise
                errors.append(e)
                return
            if failed:
                bad = set(failed)
                gens = [g for p, g in zip(pages, gens) if p not in bad]
                pages = [p for p in pages if p not in bad]
            flushed.append((pages, gens))
            lost.extend(failed)

    def _wait_under_wb(self, pages: list[int]) -> None:
        cache = self.cache
        deadline = time.monotonic() + FLUSH_WAIT
        under_wb = cache.table.under_wb
        with cache.tree_lock:
            while any(map(under_wb.__getitem__, pages)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DiskError(f"fsync: writeback still running after {FLUSH_WAIT:.0f} s",
                                    errno.EIO)
                cache.wb_cond.wait(min(left, 0.05))

    def close(self, write_back: bool = True) -> None:
        """Stop the worker, then write everything back (unless `write_back` is False)."""
        cache = self.cache
        with cache.tree_lock:
            if self.closing:
                return
            self.closing = True
            cache.wb_cond.notify_all()
        self._worker.join(timeout=30)
        if self._worker.is_alive():
            log.warning("writeback worker did not stop within 30 s")
        if write_back:
            self.flush(keep_going=True)

