"""zram-style controls: idle marking (injected clock), writeback on demand by type, the writeback
budget, promotion of pages read often from the backing file, compaction; engine level, and the
`zblock writeback` / `zblock compact` commands and params files on a real mount.

Counters are the oracle: which pages left the cache is read from the entry table and the stats.
"""

from __future__ import annotations

import os
import random
import subprocess
import time

import numpy as np
import pytest

from zblock import PAGE_SIZE
from zblock.acomp import ContextSet
from zblock.config import Config
from zblock.entries import COMP, DISK, RAW
from zblock.errors import ConfigError
from zblock.pool import Trimmer
from zblock.store import Store

import mountutil
from mountutil import Mount, zblock
from test_store import check_consistency
from tableview import npt

MiB = 1 << 20


class Clock:
    """An injected source for the table's access clock: moving it refreshes the clock's tick
    (the refreshing thread would, within TICK)."""

    def __init__(self):
        self.t = 1000.0
        self.access_clock = None

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.access_clock.refresh()


def text_page(i: int) -> bytes:
    """Compressible, never same-filled."""
    return "".join(f"page {i} line {j}\n" for j in range(400)).encode()[:PAGE_SIZE]


def random_page(rng: random.Random) -> bytes:
    return rng.randbytes(PAGE_SIZE)


@pytest.fixture
def store(tmp_path):
    s = Store.open(str(tmp_path / "img"), 16 * MiB, Config(pool_limit=64 * MiB, contexts=1))
    clock = Clock()
    clock.access_clock = s.cache.table.clock
    clock.access_clock.set_source(clock)
    s.clock = clock
    try:
        yield s
    finally:
        s.close()


def states(store: Store, pages) -> np.ndarray:
    with store.cache.tree_lock:
        return npt(store.cache.table).state[np.asarray(pages)].copy()


def settled_write(store: Store, page: int, data: bytes) -> None:
    store.write(page * PAGE_SIZE, data)
    store.staging.settle()


def test_idle_by_age_with_an_injected_clock(store):
    for p in range(100):
        settled_write(store, p, text_page(p))
    store.clock.advance(100)
    for p in range(0, 100, 2):                      # even pages read at t+100
        assert store.read(p * PAGE_SIZE, PAGE_SIZE) == text_page(p)
    store.clock.advance(30)
    store.set_param("idle", "50")                   # not accessed for 50 s: the odd pages
    assert store.stats()["idle_pages"] == 50
    with store.cache.tree_lock:
        idle = store.cache.table.idle(slice(0, 100))
    assert list(idle) == [p % 2 for p in range(100)]
    assert store.read(PAGE_SIZE, PAGE_SIZE) == text_page(1)     # an access clears the mark
    settled_write(store, 3, text_page(3))                        # so does a write
    assert store.stats()["idle_pages"] == 48
    store.set_param("idle", "all")
    assert store.stats()["idle_pages"] == 100
    for bad in ("-1", "soon", "nan", "inf", ""):
        with pytest.raises(ConfigError):
            store.set_param("idle", bad)


def test_writeback_idle_writes_exactly_the_idle_pages(store):
    for p in range(200):
        settled_write(store, p, text_page(p))
    store.set_param("idle", "all")
    for p in range(0, 200, 4):
        store.read(p * PAGE_SIZE, PAGE_SIZE)
    before = store.stats()
    store.set_param("writeback", "idle")
    after = store.stats()
    st = states(store, range(200))
    read = np.arange(200) % 4 == 0
    assert (st[~read] == DISK).all() and (st[read] == COMP).all()
    assert after["written_back_on_demand"] - before["written_back_on_demand"] == 150
    assert after["bd_count"] - before["bd_count"] == 150
    assert after["bd_writes"] - before["bd_writes"] == 150
    assert after["idle_pages"] == 0
    for p in range(200):
        assert store.read(p * PAGE_SIZE, PAGE_SIZE) == text_page(p)
    check_consistency(store)


def test_huge_selects_pages_stored_raw(store):
    kind = "huge"
    rng = random.Random(1)
    data = {p: (random_page(rng) if p % 3 == 0 else text_page(p)) for p in range(90)}
    for p, d in data.items():
        settled_write(store, p, d)
    raw = np.array([p % 3 == 0 for p in range(90)])
    assert (states(store, range(90))[raw] == RAW).all()
    store.set_param("writeback", kind)
    st = states(store, range(90))
    assert (st[raw] == DISK).all() and (st[~raw] == COMP).all()
    for p, d in data.items():
        assert store.read(p * PAGE_SIZE, PAGE_SIZE) == d


def test_the_budget_stops_writeback_at_the_byte_and_a_refill_resumes_it(store):
    for p in range(64):
        settled_write(store, p, text_page(p))
    store.set_param("writeback_limit", str(10 * PAGE_SIZE + 100))
    assert store.get_param("writeback_limit") == str(10 * PAGE_SIZE + 100)
    store.set_param("writeback", "all")
    assert int(np.count_nonzero(states(store, range(64)) == DISK)) == 10
    assert store.get_param("writeback_limit") == "100"      # what is left: less than a page
    store.set_param("writeback", "all")
    assert int(np.count_nonzero(states(store, range(64)) == DISK)) == 10
    store.set_param("writeback_limit", str(20 * PAGE_SIZE))  # refilled
    store.set_param("writeback", "all")
    assert int(np.count_nonzero(states(store, range(64)) == DISK)) == 30
    assert store.get_param("writeback_limit") == "0"
    store.set_param("writeback_limit", "none")
    store.set_param("writeback", "all")
    assert (states(store, range(64)) == DISK).all()
    for p in range(64):
        assert store.read(p * PAGE_SIZE, PAGE_SIZE) == text_page(p)
    with pytest.raises(ConfigError):
        store.set_param("writeback", "cold")


def test_a_zero_budget_stops_background_writeback_and_loses_nothing(tmp_path):
    """Under `evict` with no budget the pool grows past its limit (nothing may be written
    back) and writes do not wait for space; the data stays whole."""
    store = Store.open(str(tmp_path / "img"), 16 * MiB,
                       Config(pool_limit=256 << 10, writeback_limit=0, contexts=1))
    try:
        data = b"".join(text_page(p) for p in range(1024))
        store.write(0, data)
        store.fsync()
        s = store.stats()
        assert s["written_back_pages"] == 0 and s["pool_over_limit"] > 0
        assert store.read(0, len(data)) == data
    finally:
        store.close()


def test_pages_read_often_from_the_file_come_back_into_the_pool(store):
    for p in range(8):
        settled_write(store, p, text_page(p))
    store.set_param("writeback", "all")
    assert (states(store, range(8)) == DISK).all()
    store.set_param("promote_after", "2")
    for _ in range(2):
        assert store.read(0, PAGE_SIZE) == text_page(0)
    assert states(store, [0])[0] == DISK and store.stats()["promoted_pages"] == 0
    assert store.read(0, PAGE_SIZE) == text_page(0)              # the third read
    assert states(store, [0])[0] == COMP and store.stats()["promoted_pages"] == 1
    with store.cache.tree_lock:
        assert not npt(store.cache.table).dirty[0], "a promoted page is clean: the file holds it"
    for _ in range(3):                                           # a run read as one request
        assert store.read(4 * PAGE_SIZE, 4 * PAGE_SIZE) == b"".join(text_page(p) for p in range(4, 8))
    assert (states(store, range(4, 8)) == COMP).all()
    assert store.stats()["promoted_pages"] == 5
    settled_write(store, 0, text_page(99))                       # a write after promotion wins
    assert store.read(0, PAGE_SIZE) == text_page(99)
    check_consistency(store)


def test_a_write_during_a_disk_read_is_neither_counted_nor_undone_by_promotion(store):
    """A whole-page write takes no page lock: it can land while a read of the same page's old
    bytes from the file is in flight. The read must not count against the new entry, nor
    promote its old bytes over the new ones."""
    settled_write(store, 0, text_page(0))
    store.set_param("writeback", "all")
    store.set_param("promote_after", "1")
    assert store.read(0, PAGE_SIZE) == text_page(0)              # the first read from the file
    read_pages = store.backing.read_pages

    def racing_read(first, count, ahead=0):
        old = read_pages(first, count, ahead)
        settled_write(store, 0, text_page(7))                    # lands during the read
        return old
    store.backing.read_pages = racing_read
    try:
        store.read(0, PAGE_SIZE)                                 # the second: would promote
    finally:
        store.backing.read_pages = read_pages
    assert store.read(0, PAGE_SIZE) == text_page(7)
    with store.cache.tree_lock:
        t = npt(store.cache.table)
        assert t.state[0] == COMP and t.dirty[0] and t.fill[0] == 0
    assert store.stats()["promoted_pages"] == 0


def test_compact_gives_freed_pool_memory_back_and_says_how_much(store):
    # only the forced trim may run: the worker's own would give the memory back first
    store.cache.trimmer = Trimmer(threshold=1 << 62, min_interval=1e9)
    rng = random.Random(3)
    store.write(0, b"".join(random_page(rng) for _ in range(3072)))     # 12 MiB, stored raw
    store.staging.settle()
    store.discard(0, 3072 * PAGE_SIZE)
    store.set_param("compact", "1")
    assert store.stats()["compact_freed_bytes"] > 1 * MiB
    assert "compact" in store.param_names() and "write 1" in store.get_param("compact")


# ---------------------------------------------------------------------------------------------
# the commands, on a real mount


@pytest.mark.mount
@pytest.mark.timeout(120)
def test_writeback_and_compact_commands_and_params_files():
    mountutil.require_mounts()
    with Mount(size="32M", pool_limit="64M", writeback_limit="1M") as m:
        with open(m.disk, "r+b") as f:
            for p in range(1024):
                f.write(text_page(p))       # no fsync: the pages stay dirty, writeback writes
        with open(os.path.join(m.mountpoint, "params", "idle"), "w") as f:
            f.write("all\n")
        assert m.stats()["idle_pages"] == 1024
        res = zblock("recompress", m.mountpoint, "--type", "idle", "--algo", "zstd:9", timeout=60)
        assert res.returncode == 0, res.stderr
        assert "1024 page(s) recompressed" in res.stdout, res.stdout
        assert m.stats()["recompress_saved_bytes"] > 0
        res = zblock("writeback", m.mountpoint, "--type", "idle", timeout=60)
        assert res.returncode == 0, res.stderr
        assert "256 page(s) left the cache" in res.stdout and "0 bytes left" in res.stdout
        s = m.stats()
        assert s["bd_count"] == 256 and s["written_back_on_demand"] == 256
        res = zblock("set", m.mountpoint, "writeback_limit=none", timeout=60)
        assert res.returncode == 0, res.stderr
        res = zblock("writeback", m.mountpoint, "--type", "all", timeout=60)
        assert res.returncode == 0 and "768 page(s)" in res.stdout, res.stdout + res.stderr
        res = zblock("writeback", m.mountpoint, "--type", "cold", timeout=60)
        assert res.returncode == 2
        res = zblock("compact", m.mountpoint, timeout=60)
        assert res.returncode == 0 and "gave back" in res.stdout, res.stderr
        with open(m.disk, "rb") as f:
            for p in range(1024):
                assert f.read(PAGE_SIZE) == text_page(p)
        with open(os.path.join(m.mountpoint, "params", "writeback")) as f:
            assert "idle" in f.read()
        bad = subprocess.run(["bash", "-c", f"echo cold > {m.mountpoint}/params/writeback"],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode != 0 and "Invalid argument" in bad.stderr


# ---------------------------------------------------------------------------------------------
# recompression


def pool_names(store: Store, pages) -> list[str]:
    with store.cache.tree_lock:
        t, reg = npt(store.cache.table), store.cache.registry
        return [reg.pools[i].label for i in t.pool_id[np.asarray(pages)].tolist()]


def test_recompressed_pages_read_back_and_keep_their_algorithm(tmp_path):
    path = str(tmp_path / "img")
    store = Store.open(path, 16 * MiB, Config(pool_limit=64 * MiB, contexts=1,
                                              recomp_algorithm="zstd:9"))
    try:
        data = {p: text_page(p) for p in range(300)}
        for p, d in data.items():
            settled_write(store, p, d)
        store.set_param("idle", "all")
        for p in range(0, 300, 3):                  # a third read since: not idle
            store.read(p * PAGE_SIZE, PAGE_SIZE)
        size0 = store.stats()["pool_total_size"]
        store.set_param("recompress", "type=idle")
        s = store.stats()
        assert s["recompressed_pages"] == 200
        assert s["recompress_saved_bytes"] == size0 - s["pool_total_size"] > 0
        names = pool_names(store, range(300))
        assert [n == "zstd-9" for n in names] == [p % 3 != 0 for p in range(300)]
        assert store.stats()["idle_pages"] == 200, "recompression is not an access"
        store.set_param("compressor", "deflate")    # a switch: the zstd-9 pool serves on
        settled_write(store, 1, text_page(1001))
        data[1] = text_page(1001)
        names = pool_names(store, range(300))
        assert names[1] == "deflate" and names[2] == "zstd-9" and names[0] == "lz4"
        for p, d in data.items():
            assert store.read(p * PAGE_SIZE, PAGE_SIZE) == d
        check_consistency(store)
    finally:
        store.close()
    again = Store.open(path, None, Config(contexts=1))
    try:
        for p, d in data.items():
            assert again.read(p * PAGE_SIZE, PAGE_SIZE) == d
    finally:
        again.close()


def test_recompress_threshold_and_incompressible_marking(store, monkeypatch):
    rng = random.Random(2)
    data = {p: (random_page(rng) if p % 2 else text_page(p)) for p in range(64)}
    for p, d in data.items():
        settled_write(store, p, d)
    store.set_param("recompress", "type=huge algo=zstd:19")
    s = store.stats()
    assert s["recompressed_pages"] == 0             # random pages: nothing shrinks them
    calls = []
    compress = ContextSet.compress
    monkeypatch.setattr(ContextSet, "compress",
                        lambda cs, buf, **kw: calls.append(len(buf)) or compress(cs, buf, **kw))
    store.set_param("recompress", "type=huge algo=deflate")
    assert calls == [], "pages marked incompressible were tried again"
    monkeypatch.undo()
    store.set_param("idle", "all")
    store.set_param("recompress", f"type=idle threshold={PAGE_SIZE} algo=zstd:9")
    assert store.stats()["recompressed_pages"] == 0  # text pages are stored in < 4096 bytes
    store.set_param("writeback", "incompressible")
    st = states(store, range(64))
    raw = np.arange(64) % 2 == 1
    assert (st[raw] == DISK).all() and (st[~raw] == COMP).all()
    for p, d in data.items():
        assert store.read(p * PAGE_SIZE, PAGE_SIZE) == d
    for bad in ("type=cold", "type=idle threshold=x", "type=idle algo=nope", "type=idle x=1"):
        with pytest.raises(ConfigError):
            store.set_param("recompress", bad)
    with pytest.raises(ConfigError, match="no algorithm"):
        store.set_param("recompress", "type=idle")


def test_recomp_algorithm_takes_up_to_three_known_algorithms():
    cfg = Config()
    cfg.set("recomp_algorithm", "zstd:9, deflate")
    assert cfg.get("recomp_algorithm") == "zstd:9,deflate"
    for bad in ("zstd,deflate,lzo,lz4", "nope", "lz4:3", "zstd:20"):
        with pytest.raises(ConfigError):
            cfg.set("recomp_algorithm", bad)


@pytest.mark.timeout(120)
def test_controls_running_beside_writers_readers_and_fsync_lose_nothing(tmp_path):
    controls_beside_io(str(tmp_path / "img"), Config(pool_limit=2 * MiB, contexts=2))


def controls_beside_io(path: str, cfg: Config, seconds: float = 6.0) -> dict:
    """Writers (each in its own region, with its own model), readers, fsync and every control
    at once: idle marking, recompression, writeback on demand within a budget that is refilled,
    compaction, promotion. Every byte must read back, the gauges agree, and a remount reads the
    file back whole. Returns the last stats (tests/test_far.py runs it on the far tier)."""
    import threading
    npages, writers = 2048, 3
    region = npages // writers
    cfg.recomp_algorithm, cfg.promote_after, cfg.writeback_limit = "zstd:5,deflate", 1, 4 * MiB
    store = Store.open(path, npages * PAGE_SIZE, cfg)
    models = [dict() for _ in range(writers)]
    stop = threading.Event()
    errors = []

    def writer(w):
        rng = random.Random(w)
        base = w * region
        try:
            while not stop.is_set():
                p = base + rng.randrange(region - 4)
                n = rng.choice((1, 1, 4))
                data = [text_page(rng.randrange(10 ** 6)) if rng.random() < 0.8
                        else random_page(rng) for _ in range(n)]
                store.write(p * PAGE_SIZE, b"".join(data))
                for i, d in enumerate(data):
                    models[w][p + i] = d
                q = base + rng.randrange(region)
                want = models[w].get(q, bytes(PAGE_SIZE))
                if store.read(q * PAGE_SIZE, PAGE_SIZE) != want:
                    errors.append(f"page {q} read back wrong")
                if rng.random() < 0.02:
                    store.fsync()
        except Exception as e:          # reaches the assertion below
            errors.append(repr(e))

    def controls():
        rng = random.Random(99)
        try:
            while not stop.is_set():
                op = rng.randrange(5)
                if op == 0:
                    store.set_param("idle", rng.choice(("all", "0")))
                elif op == 1:
                    store.set_param("recompress", rng.choice(("type=idle", "type=huge",
                                                              "type=idle threshold=1000")))
                elif op == 2:
                    store.set_param("writeback", rng.choice(("idle", "huge", "incompressible", "all")))
                elif op == 3:
                    store.set_param("writeback_limit", str(rng.randrange(8) * 64 * 1024))
                else:
                    store.set_param("compact", "1")
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    threads.append(threading.Thread(target=controls))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors[:5]
        s = store.stats()
        assert s["recompressed_pages"] > 0 and s["written_back_on_demand"] > 0, s
        for model in models:
            for p, d in model.items():
                assert store.read(p * PAGE_SIZE, PAGE_SIZE) == d, p
        check_consistency(store)
        store.set_param("writeback_limit", "none")
    finally:
        store.close()
    again = Store.open(path, None, Config())
    try:
        for model in models:
            for p, d in model.items():
                assert again.read(p * PAGE_SIZE, PAGE_SIZE) == d, p
    finally:
        again.close()
    return s
