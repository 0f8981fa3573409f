"""The pool registry: zswap's list of pools and its find-get/put, plus the simulated engines.

One pool per (compressor, level, accelerator, engine settings, contexts). The current pool takes
new stores; a param change makes another one current (a live pool with the same key is reused:
A -> B -> A) and the old one lives on while entries reference it (zswap_pool_find_get,
zswap_pool_put). Engines are shared by the pools with the same engine settings.

Lifetime: a pool's refs are its entries (`stored_pages`), its holds (a store or load at work
with it outside the tree lock) and one for being current; at zero refs it is dead. A hold is
taken under the tree lock and given back without it (one atomic deque pop: a second tree lock
acquisition per 4 KiB read cost a quarter of the read IOPS under two FUSE threads), so a pool
whose last hold goes is found dead by the next free of one of its entries or by collect(), which
the writeback worker runs every pass. Dead pools and unused engines are unlisted under the tree
lock and closed after it is released (`reap()`): closing joins worker and device threads, slow
work that must not block every other request.

Lock protocol: every method but release() and reap() is called with the cache's tree lock held
(it guards the table, every pool's counters and the engine map); those two without it.

Not here: what a pool stores (zblock.entries), the compressors (zblock.acomp).
"""

from __future__ import annotations

from .acomp import ContextSet
from .accel import Engine
from .config import Config
from .errors import DataError
from .pool import Pool, labels

MAX_POOLS = 255             # pool ids are uint8 in the entry table
HW_COUNTERS = ("submitted", "completed", "backlogged", "rejected_full", "errors", "fallbacks")


def pool_key(cfg: Config) -> tuple:
    """What makes pools differ: (compressor, level, accelerator, engine settings, contexts)."""
    level = cfg.zstd_level if cfg.compressor == "zstd" else None
    hw = None
    if cfg.accelerator == "sim":
        hw = (cfg.hw_queues, cfg.hw_depth, cfg.hw_latency_us, cfg.hw_throughput_mbps,
              cfg.hw_mode, cfg.hw_batch, cfg.hw_fault_rate, cfg.hw_seed)
    return (cfg.compressor, level, cfg.accelerator, hw, cfg.contexts)


class PoolRegistry:
    """The live pools (by id) and engines; `current` takes new stores."""

    def __init__(self, config: Config, engine_factory=None):
        self.config = config
        self.pools: list[Pool | None] = [None] * MAX_POOLS
        self._engine_factory = engine_factory
        self._engines: dict[tuple, Engine] = {}
        self._dead: list = []            # pools and engines to close outside the tree lock
        # the `hw` stats of the engines closed so far, so its counters keep growing when the
        # accelerator goes sim -> none -> sim (a new engine starts from zero)
        self._hw_closed = merge_hw([])
        self.current = self._find_get()

    # ---- find-get / switch ----------------------------------------------------------------

    def _find_get(self) -> Pool:
        """The pool for the config as it is now, reusing a live one, made current."""
        pool = self.find_or_make(pool_key(self.config))
        pool.current = True
        return pool

    def secondary(self, name: str, level: int | None) -> Pool:
        """A pool of algorithm `name` (software, the current pool's contexts) for
        recompression; not current: it lives while entries use it. Caller holds the tree lock
        and puts a hold on it (hold()) before unlocking."""
        if name == "zstd" and level is None:
            level = 1                       # zstd's own default, as pool_key says it
        pool = self.find_or_make((name, level, "none", None, self.config.contexts))
        if pool is not self.current:
            pool.current = False            # it dies with its last entry, as an old pool does
        return pool

    def find_or_make(self, key: tuple) -> Pool:
        """The live pool of `key`, or a new one."""
        for pool in self.pools:
            if pool is not None and pool.key == key:
                return pool
        free_id = next((i for i, p in enumerate(self.pools) if p is None), None)
        if free_id is None:
            raise DataError("too many live pools: wait for old pools' pages to be rewritten")
        engine = self._engine_get(key[3]) if key[3] is not None else None
        pool = Pool(free_id, key, ContextSet(key[0], key[1], key[4], engine=engine))
        self.pools[free_id] = pool
        return pool

    def switch(self) -> bool:
        """After a pool param change: make the matching pool current. False if it already was.
        DataError (too many pools) leaves the old one current."""
        if self.current.key == pool_key(self.config):
            return False
        old = self.current
        self.current = self._find_get()
        old.current = False
        self.put_if_dead(old)
        return True

    # ---- holds ----------------------------------------------------------------------------

    def hold(self, pids) -> dict[int, Pool]:
        """The pools of pool ids `pids`, each held so none dies while it is used outside the
        tree lock; give them back with release()."""
        pools = {int(p): self.pools[int(p)] for p in pids}
        for pool in pools.values():
            pool.holds.append(None)
        return pools

    @staticmethod
    def release(pools) -> None:
        """Give holds back; no tree lock needed (deque.pop is atomic)."""
        for pool in pools:
            pool.holds.pop()

    def collect(self) -> None:
        """Unlist every pool that died since its last hold went (see the module docstring)."""
        for pool in self.live():
            self.put_if_dead(pool)

    def put_if_dead(self, pool: Pool) -> None:
        """Unlist a pool nobody references; reap() closes it."""
        if pool.current or pool.refs or self.pools[pool.id] is not pool:
            return
        self.pools[pool.id] = None
        self._dead.append(pool)
        used = {p.key[3] for p in self.pools if p is not None}
        for hw in [hw for hw in self._engines if hw not in used]:
            engine = self._engines.pop(hw)
            self._hw_closed = merge_hw([self._hw_closed, engine.stats()])
            self._dead.append(engine)

    def reap(self) -> None:
        """Close what put_if_dead() unlisted. Called without the tree lock; anyone may."""
        while self._dead:
            try:
                thing = self._dead.pop()
            except IndexError:              # another thread took the last one
                return
            thing.close()

    # ---- engines --------------------------------------------------------------------------

    def _engine_get(self, hw: tuple) -> Engine:
        engine = self._engines.get(hw)
        if engine is None:
            if self._engine_factory is not None:
                engine = self._engine_factory(hw)
            else:
                q, d, lat, thr, mode, batch, rate, seed = hw
                engine = Engine(queues=q, depth=d, latency_us=lat, throughput_mbps=thr, mode=mode,
                                batch=batch, fault_rate=rate, seed=seed)
            self._engines[hw] = engine
        return engine

    # ---- stats and teardown ---------------------------------------------------------------

    def live(self) -> list[Pool]:
        return [p for p in self.pools if p is not None]

    def stats(self) -> dict:
        """`pools`, `acomp_contexts` and `hw` of the stats."""
        pools = self.live()
        return {
            "acomp_contexts": sum(p.contexts.live for p in pools),
            "pools": [{"compressor": name, "stored_pages": p.stored_pages, "refs": p.refs}
                      for p, name in zip(pools, labels(pools))],
            "engines": list(self._engines.values()),
            "hw_closed": self._hw_closed,
        }

    def close(self) -> None:
        """Close every pool and engine. Called without the tree lock, once nothing runs."""
        self._dead += self.live() + list(self._engines.values())
        self.pools = [None] * MAX_POOLS
        self._engines.clear()
        self.reap()


def merge_hw(stats: list[dict]) -> dict:
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
