"""The far tier between the pool and the backing file: which pages go far, how they come back,
and how they go down to the file.

    send      writeback's compressed victims go to the cluster as they are, in one batch (raw
              pages go to the file: in Redis they would cost more than their size);
              a page becomes FAR only once the cluster acknowledged it (zblock.far.put), and
              only if its entry did not change meanwhile. Pages not sent go to disk as before.
    read      a FAR page is fetched, its header checked, and decompressed through its pool. A
              page the cluster cannot give back reads from the file if the file holds it
              (clean), else it is EIO and counts far_errors.
    maintain  (the writeback worker, each pass) deletes dropped far copies, demotes the
              coldest far pages to the file past `far_limit`, and writes dirty far pages to the
              file past `far_dirty_limit` (persistent mode).

The entry table keeps a FAR page's version in `fill` and frees its copy through on_far_freed
(overwrite, discard, demotion): the key is queued, then deleted outside every lock.

Lock order as for writeback: send and read run under the pages' locks where the caller holds
them, and take the tree lock only for bookkeeping; cluster I/O runs with no tree lock held.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from itertools import accumulate

from . import handoff, vec
from .entries import FAR, FAR_HEADER, far_value_size
from .errors import DataError, ZblockError
from .far import HEADER, FarCorrupt, FarError, FarTier
from .lru import coldest_where
from .scan import COMP

log = logging.getLogger(__name__)

assert HEADER.size == FAR_HEADER
DEMOTE_BATCH = 4096         # far pages demoted per step
# victims go to disk directly once the far tier is this far over its limit (demotion lags)
OVERSHOOT = 16 << 20


class FarPages:
    """The far tier of one cache. `cache` is the owning zblock.cache.Cache."""

    def __init__(self, cache, far: FarTier):
        self.cache = cache
        self.far = far
        cache.table.on_far_freed = self._freed
        cache.table.far_overhead = far.value_overhead
        # promote_after: reads of far pages so far, by page (a FAR entry's `fill` holds its
        # version); guarded by the tree lock, a page's count goes with its far copy
        self.reads: dict[int, int] = {}
        removed = far.purge()
        if removed:
            log.info("far tier: deleted %d key(s) an earlier mount of this file left", removed)

    def _freed(self, pages: list[int], versions: list[int]) -> None:
        """Far copies the table dropped (tree lock held): queued for deletion."""
        key = self.far.key
        self.far.forget([key(p, v) for p, v in zip(pages, versions)])
        if self.reads:
            for p in pages:
                self.reads.pop(p, None)

    # ---- send ---------------------------------------------------------------------------------

    def send(self, pages: list[int], gens: list[int]) -> list[int]:
        """Put cached pages (caller holds their page locks) in the far tier; returns the pages
        that are FAR now."""
        cache, table, far = self.cache, self.cache.table, self.far
        cfg = cache.config
        if far.down or not len(pages):
            return []
        gen = table.gen
        with cache.tree_lock:
            if table.far_bytes >= cfg.far_limit + OVERSHOOT:
                return []
            # Compressed pages only: a raw page's value (4 KiB + header) takes jemalloc's 5 KiB
            # size class in Redis, 1.25x its bytes, for no saving over the file.
            kept = [(p, g) for p, g in zip(pages, gens) if table.state[p] == COMP and gen[p] == g]
            pages, gens = [p for p, _ in kept], [g for _, g in kept]
            objs = [table.obj(p) for p in pages]
            names = [cache.registry.pools[i].key[0] for i in vec.gather(table.pool_id, pages)]
        if not pages:
            return []
        first = far.next_version(len(pages))
        versions = range(first, first + len(pages))
        keys = [far.key(p, v) for p, v in zip(pages, versions)]
        values = [far.encode(p, v, n, o) for p, v, n, o in zip(pages, versions, names, objs)]
        ok = far.put(keys, values)
        with cache.tree_lock:
            moved = [i for i, (p, g, put) in enumerate(zip(pages, gens, ok)) if put and gen[p] == g]
            if len(moved) < sum(map(bool, ok)):     # replaced while we sent: the copy is stale
                now = set(moved)
                far.forget([k for i, (k, put) in enumerate(zip(keys, ok)) if put and i not in now])
            pages = [pages[i] for i in moved]
            table.to_far(pages, [versions[i] for i in moved])
            cache.c.far_writes += len(pages)
            if table.far_bytes > cfg.far_limit:
                cache.writeback.wake()
        return pages

    # ---- read ---------------------------------------------------------------------------------

    def read(self, pages: list[int], failed: list | None = None, access: bool = True) -> list:
        """The bytes of FAR pages. A page that cannot be had raises DataError, or with `failed`
        (a list) is appended there and its slot is None. `access`: a client's read, which counts
        toward promote_after (not writeback's or fsync's)."""
        cache, table, far = self.cache, self.cache.table, self.far
        with cache.tree_lock:
            # the callers looked under an earlier hold of the lock: a page may have changed
            here = [table.state[p] == FAR for p in pages]
            versions = [table.fill[p] for p in pages]
            gens = [table.gen[p] for p in pages]
            pids = [table.pool_id[p] for p in pages]
            pools = cache.registry.hold({pid for pid, h in zip(pids, here) if h})
        try:
            asked = [i for i, h in enumerate(here) if h]
            if asked:
                handoff.blocking()              # a network round trip
            values: list = [None] * len(pages)
            for i, v in zip(asked, far.get([far.key(pages[i], versions[i]) for i in asked])):
                values[i] = v
            out: list = [None] * len(pages)
            packed: dict[int, list[int]] = {}       # pool id -> indices of compressed payloads
            for i, (p, v) in enumerate(zip(pages, values)):
                if not here[i]:
                    out[i] = cache.load_page(p)
                elif type(v) is bytes:
                    try:
                        alg, out[i] = far.decode(p, versions[i], v)
                    except FarCorrupt as e:
                        with cache.tree_lock:
                            cache.c.far_checksum_errors += 1
                        self._fail(p, e, failed)
                        continue
                    if alg != "raw":
                        packed.setdefault(pids[i], []).append(i)
                else:
                    out[i] = self._missing(p, gens[i], v, failed)
            for pid, idx in packed.items():
                results = pools[pid].contexts.decompress([out[i] for i in idx])
                for i, r in zip(idx, results):
                    if type(r) is bytes:
                        out[i] = r
                    else:
                        with cache.tree_lock:
                            cache.c.decompress_fail += 1
                        out[i] = None
                        self._fail(pages[i], DataError(f"decompression failed ({r})"), failed)
        finally:
            cache.registry.release(pools.values())
        with cache.tree_lock:
            cache.c.far_reads += len(pages)
        if access and cache.config.promote_after:
            self._promote(pages, here, gens, out)
        return out

    def _promote(self, pages: list[int], here: list[bool], gens: list[int], out: list) -> None:
        """Far pages just read (`out`) that have been read more than `promote_after` times come
        back into the pool if it is below its accept threshold, dirty or clean as they were,
        unless they changed since (`gens`); their far copies then go (the table frees them)."""
        cache, table = self.cache, self.cache.table
        hot = []
        with cache.tree_lock:
            for i, p in enumerate(pages):
                if not here[i] or out[i] is None or table.state[p] != FAR \
                        or table.gen[p] != gens[i]:
                    continue
                self.reads[p] = n = self.reads.get(p, 0) + 1
                if n > cache.config.promote_after:
                    hot.append((i, bool(table.dirty[p])))
            if not hot or not cache.promotion.allowed():
                return
        cache.promotion.promote([(pages[i], out[i], gens[i], not dirty) for i, dirty in hot])

    def _missing(self, page: int, gen: int, err, failed: list | None):
        """A far copy that did not come back (`err`: None for a missing key, or the error)."""
        cache, table = self.cache, self.cache.table
        with cache.tree_lock:
            changed = table.gen[page] != gen
            on_file = not table.dirty[page]
        if changed:                         # rewritten or demoted while we asked: read it anew
            return cache.load_page(page)
        if on_file:                         # clean: the file holds the same bytes
            return cache.backing.read_pages(page, 1)
        with cache.tree_lock:
            cache.c.far_errors += 1
        why = "its key is missing" if err is None else str(err)
        self._fail(page, DataError(f"page {page}: far tier: {why}"), failed)
        return None

    @staticmethod
    def _fail(page: int, err: Exception, failed: list | None) -> None:
        if failed is None:
            raise err if isinstance(err, DataError) else DataError(f"page {page}: {err}")
        log.warning("%s", err)
        failed.append(page)

    # ---- maintenance --------------------------------------------------------------------------

    def maintain(self) -> bool:
        """The worker's share: deletes, demotion past far_limit, dirty far pages past
        far_dirty_limit. False if a disk error stopped it."""
        cache, table = self.cache, self.cache.table
        self.far.flush_deletes()
        cfg = cache.config
        while True:
            with cache.tree_lock:
                excess = table.far_bytes - cfg.far_limit
                if excess <= 0 or cache.writeback.closing:
                    break
                avg = max(table.far_bytes // max(table.far_pages, 1), 1)
                victims = coldest_where(table, lambda s: vec.mask_and(
                    vec.mask_in(table.state, (FAR,), s.start, s.stop),
                    vec.mask_not(bytes(table.under_wb[s]))), min(DEMOTE_BATCH, excess // avg + 1))
                vec.scatter(table.under_wb, victims, 1)
                gens = vec.gather(table.gen, victims)
            if not len(victims):
                break
            ok, moved = cache.writeback.write_back(victims, gens)
            if not ok or not moved:     # nothing went down (the cluster cannot give them back)
                return False
        if cfg.swap or cfg.read_only:
            return True
        with cache.tree_lock:
            if table.far_bytes <= cfg.far_dirty_limit:
                return True
            dirty = self._coldest_dirty(cfg.far_dirty_limit)
            if not dirty:
                return True
        try:
            cache.writeback.flush(pages=sorted(dirty))
        except ZblockError as e:
            log.warning("far tier: writing dirty far pages to the file failed: %s", e)
            return False
        return True

    def _coldest_dirty(self, limit: int) -> list[int]:
        """The fewest coldest dirty far pages that must go to the file for the far values of
        the dirty ones left to come to `limit` bytes at most, coldest first. Tree lock held.
        Listing and sorting all of them took 0.4 s a million: their bytes are summed span by
        span, and only as many of the coldest as their average size says are taken (more if
        that falls short)."""
        table = self.cache.table
        pred = lambda s: vec.mask_and(                                      # noqa: E731
            vec.mask_in(table.state, (FAR,), s.start, s.stop), bytes(table.dirty[s]))
        n = length = 0
        for s in table.spans():
            mask = pred(s)
            n += mask.count(1)
            length += vec.sum_where(table.length, s.start, s.stop, mask)
        held = length + n * table.far_overhead          # far_value_size of each
        over = held - limit
        if over <= 0:
            return []
        k = min(over * 5 // (4 * max(held // n, 1)) + 64, n)    # a quarter to spare
        while True:
            dirty = coldest_where(table, pred, k)
            size = list(accumulate(far_value_size(ln, table.far_overhead)
                                   for ln in vec.gather(table.length, dirty)))
            if size[-1] >= over or k >= n:
                return dirty[:bisect_left(size, over) + 1]
            k = min(2 * k, n)

    # ---- stats and close ----------------------------------------------------------------------

    def stats(self) -> dict:
        return {"far_latency_us": self.far.latency_us(), "far_nodes": self.far.nodes(),
                "far_down": self.far.down, "far_pending_deletes": self.far.pending_deletes}

    def close(self) -> None:
        """Delete this mount's keys (the file holds what must survive; swap pages are
        ephemeral) and disconnect. A cluster that cannot be reached keeps them until the next
        mount of this file deletes them: that is no reason to fail the unmount."""
        try:
            self.far.purge()
        except FarError as e:
            log.warning("%s; the next mount of this file deletes them", e)
        finally:
            self.far.close()
