"""zram-style controls: idle marking (injected clock), writeback on demand by type, the writeback
budget, promotion of pages read often from the backing file, compaction; engine level, and the
`zblock writeback` / `zblock compact` commands and params files on a real mount.

Counters are the oracle: which pages left the cache is read from the entry table and the stats.
"""

from __future__ import annotations

import os
import random
import subprocess

import numpy as np
import pytest

from zblock import PAGE_SIZE
from zblock.config import Config
from zblock.entries import COMP, DISK, RAW
from zblock.errors import ConfigError
from zblock.store import Store

import mountutil
from mountutil import Mount, zblock
from test_store import check_consistency

MiB = 1 << 20


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def text_page(i: int) -> bytes:
    """Compressible, never same-filled."""
    return "".join(f"page {i} line {j}\n" for j in range(400)).encode()[:PAGE_SIZE]


def random_page(rng: random.Random) -> bytes:
    return rng.randbytes(PAGE_SIZE)


@pytest.fixture
def store(tmp_path):
    s = Store.open(str(tmp_path / "img"), 16 * MiB, Config(pool_limit=64 * MiB, contexts=1))
    clock = Clock()
    s.cache.table.set_clock(clock)
    s.clock = clock
    try:
        yield s
    finally:
        s.close()


def states(store: Store, pages) -> np.ndarray:
    with store.cache.tree_lock:
        return store.cache.table.state[np.asarray(pages)].copy()


def settled_write(store: Store, page: int, data: bytes) -> None:
    store.write(page * PAGE_SIZE, data)
    store.staging.settle()


def test_idle_by_age_with_an_injected_clock(store):
    for p in range(100):
        settled_write(store, p, text_page(p))
    store.clock.t += 100
    for p in range(0, 100, 2):                      # even pages read at t+100
        assert store.read(p * PAGE_SIZE, PAGE_SIZE) == text_page(p)
    store.clock.t += 30
    store.set_param("idle", "50")                   # not accessed for 50 s: the odd pages
    assert store.stats()["idle_pages"] == 50
    with store.cache.tree_lock:
        idle = store.cache.table.idle(np.arange(100))
    assert idle.tolist() == [p % 2 == 1 for p in range(100)]
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


@pytest.mark.parametrize("kind", ["huge", "incompressible"])
def test_huge_and_incompressible_select_pages_stored_raw(store, kind):
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
        assert not store.cache.table.dirty[0], "a promoted page is clean: the file holds it"
    for _ in range(3):                                           # a run read as one request
        assert store.read(4 * PAGE_SIZE, 4 * PAGE_SIZE) == b"".join(text_page(p) for p in range(4, 8))
    assert (states(store, range(4, 8)) == COMP).all()
    assert store.stats()["promoted_pages"] == 5
    settled_write(store, 0, text_page(99))                       # a write after promotion wins
    assert store.read(0, PAGE_SIZE) == text_page(99)
    check_consistency(store)


def test_compact_reports_what_it_gave_back(store):
    store.set_param("compact", "1")
    assert store.stats()["compact_freed_bytes"] >= 0
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
