"""The far tier's memory and latency, engine level (no mount), on a local 6-node Redis Cluster
(tests/rediscluster.py, 3 masters + 3 replicas on loopback) started and stopped by this test.

- Far-tier memory: the `mix` dataset written to a store whose pool holds almost nothing, so its
  pages go to the far tier; the growth of `used_memory` summed over the masters, per byte of
  compressed page the far tier holds (the objects, without zblock's 24-byte header). Target
  (issue "Far tier on Redis Cluster"): <= 1.2x.
- Latency of one-page reads: random 4 KiB Store.read() of far pages, against the same reads of
  written-back pages from the backing file (a store without a far tier, `pool_limit` 0, O_DIRECT
  reads), per read, percentiles over all rounds.

The swap hog on the far tier against the backing file alone is tests/perf/test_swap.py's
`zblock-far` and `zblock` targets with ZBLOCK_BENCH_POOL_LIMIT (docs/performance.md says how).
"""

from __future__ import annotations

import os
import random
import shutil
import time

import numpy as np
import pytest

import harness as h
import rediscluster
from zblock import PAGE_SIZE
from zblock.config import Config
from zblock.entries import FAR
from zblock.store import Store

MiB = 1 << 20
MEMORY_NEED = 1.2
READS = 3000


def _fill(store: Store, data: bytes) -> None:
    for off in range(0, len(data), MiB):
        store.write(off, data[off:off + MiB])


def _read_latencies(store: Store, pages: np.ndarray, data: bytes, seed: int) -> list[float]:
    rng = random.Random(seed)
    out = []
    for p in rng.sample(pages.tolist(), min(READS, len(pages))):
        t0 = time.perf_counter()
        got = store.read(p * PAGE_SIZE, PAGE_SIZE)
        out.append((time.perf_counter() - t0) * 1e6)
        if got != data[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]:
            raise h.BenchBroken(f"page {p} read back wrong")
    return out


def _settle(store: Store, until, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = store.stats()
        if until(s):
            return s
        if time.monotonic() > deadline:
            raise h.BenchBroken(f"the far tier did not settle: {s['far_stored_pages']} pages")
        time.sleep(0.2)


@pytest.mark.timeout(1800)
def test_far_memory_and_latency(tmp_path):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server not installed")
    size = min(h.bench_size(), 128 * MiB)
    rounds = h.bench_rounds()
    data = h.dataset("mix", h.bench_size()).read_bytes()[:size]
    rep = h.Report("far", f"Far tier: cluster memory per compressed byte, one-page read latency "
                          f"(us), {size >> 20} MiB of mix, {rounds} round(s)")
    far_lat, disk_lat = [], []
    cluster = rediscluster.RedisCluster(h.STATE_DIR / f"far-cluster-{os.getpid()}").start()
    try:
        for rnd in range(rounds):
            # the far tier
            used0 = cluster.used_memory()
            cfg = Config(pool_limit=1 * MiB, far=cluster.url, far_limit=4 * size,
                         far_dirty_limit=4 * size)
            store = Store.open(str(tmp_path / f"far-{rnd}.img"), size, cfg)
            try:
                _fill(store, data)
                s = _settle(store, lambda s: s["pool_total_size"] <= 2 * MiB and
                            s["far_stored_pages"] > 0 and s["far_pending_deletes"] == 0)
                with store.cache.tree_lock:
                    t = store.cache.table
                    far = np.flatnonzero(t.state == FAR)
                    payload = int(t.length[far].astype(np.int64).sum())
                growth = cluster.used_memory() - used0
                rep.add("far", "memory_per_compressed_byte", growth / payload)
                rep.add("far", "memory_per_value_byte", growth / s["far_bytes"])
                rep.add("far", "far_pages", len(far))
                far_lat += _read_latencies(store, far, data, rnd)
            finally:
                store.close()
            os.unlink(tmp_path / f"far-{rnd}.img")
            # the backing file alone
            store = Store.open(str(tmp_path / f"disk-{rnd}.img"), size, Config(pool_limit=0))
            try:
                _fill(store, data)
                store.fsync()
                with store.cache.tree_lock:
                    from zblock.entries import DISK
                    on_disk = np.flatnonzero(store.cache.table.state == DISK)
                disk_lat += _read_latencies(store, on_disk, data, rnd)
            finally:
                store.close()
            os.unlink(tmp_path / f"disk-{rnd}.img")
    finally:
        cluster.stop()
        shutil.rmtree(cluster.dir, ignore_errors=True)
    for name, lat in (("far", far_lat), ("backing-file", disk_lat)):
        for q in (50, 90, 99):
            rep.results.setdefault(name, {})[f"read_us_p{q}"] = {
                "samples": [], "median": float(np.percentile(lat, q))}
    rep.checks.append({
        "what": "far-tier memory per compressed byte", "metric": "memory_per_compressed_byte",
        "target": "far", "ref": "-", "need": f"<= {MEMORY_NEED}",
        "target_value": rep.value("far", "memory_per_compressed_byte"), "ref_value": None,
        "ratio": rep.value("far", "memory_per_compressed_byte"),
        "met": rep.value("far", "memory_per_compressed_byte") <= MEMORY_NEED})
    rep.check("one-page read p50, far vs backing file", "far", "read_us_p50", "backing-file",
              at_most=1.0)
    rep.emit()
