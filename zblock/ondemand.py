"""zram's on-demand controls that move pages: writeback on demand (`params/writeback`) and
recompression (`params/recompress`). Both pick pages from the entry table, then work in
batches with the cache's own parts: writeback through zblock.writeback (within the writeback
budget), recompression through the pools' acomp contexts under the batch's page locks, a
result going in only if its page is still the cached entry it was made from.

`cache` is the owning zblock.cache.Cache, whose locks, table, registry, writeback, config and
counters this shares.
"""

from __future__ import annotations

import numpy as np

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
        pick = {"idle": lambda s: table.cached(s) & table.idle(s),
                "huge": lambda s: table.state[s] == RAW,
                "incompressible": lambda s: table.cached(s) & (table.fill[s] == INCOMPRESSIBLE),
                "all": table.cached}[kind]
        with cache.tree_lock:
            pages = table.find(lambda s: pick(s) & ~table.under_wb[s])
            self.progress = [0, len(pages)]
        done = 0
        try:
            for lo in range(0, len(pages), ON_DEMAND_BATCH):
                batch = pages[lo:lo + ON_DEMAND_BATCH]
                with cache.tree_lock:    # each batch chosen again: pages change meanwhile
                    batch = batch[pick(batch) & ~table.under_wb[batch]]
                    table.under_wb[batch] = True
                    gens = table.gen[batch].copy()
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
        idle = lambda s: table.cached(s) & table.idle(s)
        raw = lambda s: table.state[s] == RAW
        pick = {"idle": idle, "huge": raw, "huge_idle": lambda s: raw(s) & idle(s)}[kind]
        with cache.tree_lock:
            pages = table.find(lambda s: pick(s) & ~table.under_wb[s] &
                               (table.length[s] >= threshold) & (table.fill[s] != INCOMPRESSIBLE))
        done = 0
        for lo in range(0, len(pages), RECOMPRESS_BATCH):
            done += self._recompress_batch(pages[lo:lo + RECOMPRESS_BATCH], algos)
        return done

    def _recompress_batch(self, pages: np.ndarray, algos: list) -> int:
        """Recompress `pages` under their page locks (writeback and far sends take them too);
        a result goes in only if its page is still the cached entry it was made from: same
        generation, state, pool, and not under writeback."""
        cache = self.cache
        table = cache.table
        with cache.page_locks.hold(pages.tolist()):
            with cache.tree_lock:
                st = table.state[pages]
                ok = ((st == COMP) | (st == RAW)) & ~table.under_wb[pages]
                pages = pages[ok]
                gens = table.gen[pages].copy()
                lengths = table.length[pages].astype(np.int64)
                pids = table.pool_id[pages].copy()
                pools = [cache.registry.secondary(name, level) for name, level in algos]
                for pool in pools:
                    pool.holds.append(None)
            try:
                got, datas, _ = cache.writeback.materialize(pages)
                have = dict(zip(got, datas))
                ok = np.array([p in have for p in pages.tolist()], bool)
                pages, gens, lengths, pids = pages[ok], gens[ok], lengths[ok], pids[ok]
                tried = np.zeros(len(pages), bool)
                left = np.ones(len(pages), bool)
                found = []                  # (pool, indices, scan of them)
                for pool in pools:
                    todo = np.flatnonzero(left & (pids != pool.id))
                    if not len(todo):
                        continue
                    tried[todo] = True
                    scan = pool.contexts.compress(
                        b"".join(have[p] for p in pages[todo].tolist()),
                        detect_same=False, raw_poor=True)
                    better = np.flatnonzero((scan.states == COMP) & (scan.lengths < lengths[todo]))
                    if len(better):
                        found.append((pool, todo[better], _scan_subset(scan, better)))
                        left[todo[better]] = False
                with cache.tree_lock:
                    def unchanged(idx):
                        p = pages[idx]
                        st = table.state[p]
                        return ((table.gen[p] == gens[idx]) & ((st == COMP) | (st == RAW)) &
                                (table.pool_id[p] == pids[idx]) & ~table.under_wb[p])
                    n = saved = 0
                    for pool, idx, scan in found:
                        ok = unchanged(idx)
                        if table.dedup is not None:
                            ok &= table.dedup.whole_shares(pages[idx])
                        keep = np.flatnonzero(ok)
                        if len(keep) < len(idx):
                            idx, scan = idx[keep], _scan_subset(scan, keep)
                        saved += table.recompressed(pages[idx], scan, pool)
                        n += len(idx)
                    rest = np.flatnonzero(left & tried)
                    table.fill[pages[rest[unchanged(rest)]]] = INCOMPRESSIBLE
                    cache.c.recompressed_pages += n
                    cache.c.recompress_saved_bytes += saved
            finally:
                cache.registry.release(pools)
        return n


def _scan_subset(scan: Scan, idx: np.ndarray) -> Scan:
    """The pages `idx` of a scan, as a scan of their own."""
    return Scan([scan.objs[i] for i in idx.tolist()], scan.states[idx], scan.lengths[idx],
                scan.fills[idx], 0)
