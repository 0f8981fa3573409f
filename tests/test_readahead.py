"""Readahead (zblock/readahead.py): sequential reads get the next window decompressed ahead, and
never a byte that changed after the worker read it."""

import random

import pytest

from zblock import PAGE_SIZE
from zblock.store import Store
from mountutil import wait_for
from test_store import make_config, mixed_bytes

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def store(tmp_path):
    s = Store.open(str(tmp_path / "disk.img"), SIZE, make_config())
    try:
        yield s
    finally:
        s.close()


def _filled(store, seed=1) -> bytes:
    data = mixed_bytes(random.Random(seed), SIZE)
    store.write(0, data)
    store.staging.drain()
    return data


def _window_ready(store, start_page: int) -> bool:
    return any(k[0] == start_page for k in store.readahead._ready)


def test_sequential_reads_are_served_ahead(store):
    data = _filled(store)
    for off in range(0, SIZE, MiB):
        assert store.read(off, MiB) == data[off:off + MiB]
        if off + 2 * MiB <= SIZE and off > 0:
            # the worker was asked for the next window: let it finish, so the next read hits
            wait_for(lambda: _window_ready(store, (off + MiB) // PAGE_SIZE), 10, "readahead")
    # the first two reads start the stream; every later one is served ahead
    assert store.readahead.hits == SIZE // MiB - 2


@pytest.mark.parametrize("change", ["write", "discard", "partial write"])
def test_a_change_after_the_worker_read_is_never_served_stale(store, change):
    data = bytearray(_filled(store))
    store.read(0, MiB)
    store.read(MiB, MiB)                # sequential: the worker decompresses 2 MiB .. 3 MiB
    wait_for(lambda: _window_ready(store, 2 * MiB // PAGE_SIZE), 10, "readahead")
    off = 2 * MiB + 5 * PAGE_SIZE
    if change == "write":
        new = bytes([7]) * PAGE_SIZE
        store.write(off, new)
    elif change == "discard":
        new = bytes(PAGE_SIZE)
        store.discard(off, PAGE_SIZE)
    else:
        new = b"xyz"
        store.write(off + 100, new)
        off += 100
    data[off:off + len(new)] = new
    hits = store.readahead.hits
    assert store.read(2 * MiB, MiB) == bytes(data[2 * MiB:3 * MiB])
    assert store.readahead.hits == hits         # the window was dropped, not served


def test_random_reads_do_not_start_the_worker(store):
    data = _filled(store)
    rng = random.Random(3)
    for _ in range(20):
        off = rng.randrange(0, SIZE // MiB - 1) * MiB + MiB // 2 * rng.randrange(2)
        assert store.read(off, 256 * 1024) == data[off:off + 256 * 1024]
    assert store.readahead._thread is None and store.readahead.hits == 0


def test_small_reads_bypass_it(store):
    data = _filled(store)
    for off in range(0, MiB, 32 * 1024):          # swap-in sized, sequential
        assert store.read(off, 32 * 1024) == data[off:off + 32 * 1024]
    assert store.readahead._thread is None


def test_close_stops_the_worker(tmp_path):
    s = Store.open(str(tmp_path / "disk.img"), SIZE, make_config())
    _filled(s)
    s.read(0, MiB)
    s.read(MiB, MiB)
    t = s.readahead._thread
    assert t is not None and t.is_alive()
    s.close()
    assert not t.is_alive()
