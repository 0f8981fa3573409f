"""zram's on-demand controls that move pages: writeback on demand (`params/writeback`) and
recompression (`params/recompress`). Both pick pages from the entry table, then work in
batches with the cache's own parts: writeback through zblock.writeback (within the writeback
budget), recompression through the pools' acomp contexts under the batch's page locks, a
result going in only if its page is still the cached entry it was made from.

`cache` is the owning zblock.cache.Cache, whose locks, table, registry, writeback, config and
counters this shares.
"""

from __future__ import annotations

from array import array

from . import PAGE_SIZE, vec
from .config import parse_algorithm
from .entries import INCOMPRESSIBLE
from .errors import ConfigError
from .scan import COMP, RAW, Scan

ON_DEMAND_BATCH = 1024      # pages a step of writeback on demand (its progress moves by these)
RECOMPRESS_BATCH = 256      # pages recompressed together (one request per algorithm)


class OnDemand:
    """Writeback on demand and recompression for one cache."""

    def __init__(self, cache):
        self.cache = cache
        self.progress: list[int] | None = None      # [done, total] of writeback_now

    def writeback_now(self, kind: str) -> int:
        """zram's `writeback`: write the chosen cached pages to the backing file now (not the
        far tier), in batches, within the writeback budget. `idle`: not accessed since marked
        idle; `huge`: stored raw; `incompressible`: no secondary algorithm could shrink them
        (recompress); `all`: every compressed or raw page.
        Returns the pages that left the cache."""
        cache = self.cache
        table = cache.table
        state, fill, atime, under_wb = table.state, table.fill, table.atime, table.under_wb
        # per kind, the pages of a span as a mask, and the same test of one page
        pick, test = {
            "idle": (lambda s: vec.mask_and(table.cached(s), table.idle(s)),
                     lambda p: state[p] in (COMP, RAW) and not atime[p]),
            "huge": (lambda s: vec.mask_in(state, (RAW,), s.start, s.stop),
                     lambda p: state[p] == RAW),
            "incompressible": (lambda s: vec.mask_and(table.cached(s), _incompressible(fill, s)),
                               lambda p: state[p] in (COMP, RAW) and fill[p] == INCOMPRESSIBLE),
            "all": (table.cached, lambda p: state[p] in (COMP, RAW))}[kind]
        with cache.tree_lock:
            pages = table.find(lambda s: _off_writeback(table, s, pick(s)))
            self.progress = [0, len(pages)]
        done = 0
        try:
            for lo in range(0, len(pages), ON_DEMAND_BATCH):
                batch = pages[lo:lo + ON_DEMAND_BATCH]
                with cache.tree_lock:    # each batch chosen again: pages change meanwhile
                    batch = [p for p in batch if not under_wb[p] and test(p)]
                    vec.scatter(table.under_wb, batch, 1)
                    gens = vec.gather(table.gen, batch)
                ok, moved = cache.writeback.write_back(batch, gens, far=False)
                done += moved
                with cache.tree_lock:
                    self.progress[0] = min(lo + ON_DEMAND_BATCH, len(pages))
                if not ok:              # a disk error, or the budget ran out
                    break
        finally:
            with cache.tree_lock:
                cache.c.written_back_on_demand += done
                self.progress = None
        return done

    def recompress(self, kind: str, threshold: int = 0, algo: str | None = None) -> int:
        """zram's `recompress`: the chosen cached pages (`idle`, `huge`: stored raw, or
        `huge_idle`) whose stored size is at least `threshold` bytes, compressed again with
        `algo`, else with each of recomp_algorithm in priority order, and kept only when
        smaller. Pages no algorithm shrank are marked INCOMPRESSIBLE (not tried again;
        `writeback incompressible` takes them). Returns the pages recompressed."""
        cache = self.cache
        names = [algo] if algo else [a for a in cache.config.recomp_algorithm.split(",") if a]
        if not names:
            raise ConfigError("recompress: no algorithm: set recomp_algorithm or give algo=NAME")
        algos = [parse_algorithm(a) for a in names]
        table = cache.table
        idle = lambda s: vec.mask_and(table.cached(s), table.idle(s))         # noqa: E731
        raw = lambda s: vec.mask_in(table.state, (RAW,), s.start, s.stop)     # noqa: E731
        pick = {"idle": idle, "huge": raw, "huge_idle": lambda s: vec.mask_and(raw(s), idle(s))}
        # stored lengths are at most a page: a larger threshold picks none all the same, and
        # mask_below needs the limit below 2**15
        limit = min(threshold, PAGE_SIZE + 1)

        def chosen(s: slice) -> bytes:
            mask = vec.mask_and(_off_writeback(table, s, pick[kind](s)),
                                vec.mask_not(_incompressible(table.fill, s)))
            if limit:
                mask = vec.mask_and(mask, vec.mask_not(
                    vec.mask_below(table.length, s.start, s.stop, limit)))
            return mask
        with cache.tree_lock:
            pages = table.find(chosen)
        done = 0
        for lo in range(0, len(pages), RECOMPRESS_BATCH):
            done += self._recompress_batch(pages[lo:lo + RECOMPRESS_BATCH], algos)
        return done

    def _recompress_batch(self, pages: list[int], algos: list) -> int:
        """Recompress `pages` under their page locks (writeback and far sends take them too);
        a result goes in only if its page is still the cached entry it was made from: same
        generation, state, pool, and not under writeback."""
        cache = self.cache
        table = cache.table
        state, gen, pool_id, under_wb = table.state, table.gen, table.pool_id, table.under_wb
        with cache.page_locks.hold(pages):
            with cache.tree_lock:
                pages = [p for p in pages if state[p] in (COMP, RAW) and not under_wb[p]]
                was = {p: (gen[p], pool_id[p]) for p in pages}
                lengths = {p: table.length[p] for p in pages}
                pools = [cache.registry.secondary(name, level) for name, level in algos]
                for pool in pools:
                    pool.holds.append(None)
            try:
                got, datas, _ = cache.writeback.materialize(pages)
                have = dict(zip(got, datas))
                pages = [p for p in pages if p in have]
                left = set(pages)           # not made smaller yet
                tried = set()
                found = []                  # (pool, pages, scan of them)
                for pool in pools:
                    todo = [p for p in pages if p in left and was[p][1] != pool.id]
                    if not todo:
                        continue
                    tried.update(todo)
                    scan = pool.contexts.compress(b"".join(have[p] for p in todo),
                                                  detect_same=False, raw_poor=True)
                    better = [i for i, p in enumerate(todo)
                              if scan.states[i] == COMP and scan.lengths[i] < lengths[p]]
                    if better:
                        found.append((pool, [todo[i] for i in better], _scan_subset(scan, better)))
                        left.difference_update(todo[i] for i in better)
                with cache.tree_lock:
                    def unchanged(p):
                        return (gen[p], pool_id[p]) == was[p] and state[p] in (COMP, RAW) and \
                            not under_wb[p]
                    n = saved = 0
                    for pool, chosen, scan in found:
                        ok = [unchanged(p) for p in chosen]
                        if table.dedup is not None:
                            ok = [a and b for a, b in zip(ok, table.dedup.whole_shares(chosen))]
                        if not all(ok):
                            keep = [i for i, k in enumerate(ok) if k]
                            chosen, scan = [chosen[i] for i in keep], _scan_subset(scan, keep)
                        saved += table.recompressed(chosen, scan, pool)
                        n += len(chosen)
                    vec.scatter(table.fill, [p for p in pages if p in left and p in tried
                                             and unchanged(p)], INCOMPRESSIBLE)
                    cache.c.recompressed_pages += n
                    cache.c.recompress_saved_bytes += saved
            finally:
                cache.registry.release(pools)
        return n


def _off_writeback(table, s: slice, mask: bytes) -> bytes:
    """`mask` (0/1 over the pages of span s) without the pages under writeback."""
    return vec.mask_and(mask, vec.mask_not(bytes(table.under_wb[s])))


def _incompressible(fill, s: slice) -> bytes:
    """0/1 over the pages of span s: `fill` is INCOMPRESSIBLE (a mark that means so only for
    cached pages). mask_equal, not mask_below: a SAME page's fill word may be any 64 bits."""
    return vec.mask_equal(fill, s.start, s.stop, INCOMPRESSIBLE)


def _scan_subset(scan: Scan, idx: list[int]) -> Scan:
    """The pages `idx` of a scan, as a scan of their own."""
    return Scan([scan.objs[i] for i in idx], bytes(scan.states[i] for i in idx),
                array("H", [scan.lengths[i] for i in idx]),
                array("Q", [scan.fills[i] for i in idx]), 0)
