"""Engine tier: loads of pages on the backing file, and readahead along sequential runs
(zblock.diskread). No mount; the counters and a bytearray model are the oracle."""

import collections
import os
import random
import threading
import time

import pytest

from zblock import PAGE_SIZE
from zblock.diskread import STREAMS, WINDOW
from zblock.cache import NSTRIPES, STRIPE_PAGES
from zblock.errors import DataError
from zblock.store import Store
from test_store import make_config, mixed_bytes, text_page, write_key

MiB = 1 << 20
CLUSTER = 8 * PAGE_SIZE         # what swap-in asks for


def swap_like_bytes(rng: random.Random, n: int) -> bytes:
    """Whole pages, text and random, one in sixteen zeros (a window stops at a page that is not
    on disk: mostly same-filled pages would leave nothing to read ahead)."""
    pages = [bytes(PAGE_SIZE) if rng.random() < 1 / 16 else
             text_page(rng) if rng.random() < 0.7 else rng.randbytes(PAGE_SIZE)
             for _ in range(-(-n // PAGE_SIZE))]
    return b"".join(pages)[:n]


@pytest.fixture
def backing_path(tmp_path):
    return str(tmp_path / "disk.img")


def to_disk(store: Store) -> None:
    """Every cached page written back (zram's idle writeback, on demand)."""
    store.set_param("idle", "all")
    store.set_param("writeback", "idle")
    st = store.stats()
    assert st["stored_pages"] == st["same_filled_pages"] and st["bd_count"] > 0, st


@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "sealed"])
def test_a_sequential_reader_of_disk_pages_reads_ahead_and_a_random_one_does_not(backing_path,
                                                                                 encrypt):
    rng = random.Random(1)
    data = b"".join(text_page(rng) for _ in range(MiB // PAGE_SIZE))     # none same-filled
    cfg = make_config()
    if encrypt:
        cfg.encrypt, cfg.key_file = True, write_key(os.path.dirname(backing_path))
    store = Store.open(backing_path, 2 * MiB, cfg)
    try:
        store.write(0, data)
        to_disk(store)
        assert store.stats()["bd_count"] == MiB // PAGE_SIZE
        before = store.stats()
        for off in range(0, MiB, CLUSTER):
            assert store.read(off, CLUSTER) == data[off:off + CLUSTER]
        st = store.stats()
        ios = st["bd_read_ios"] - before["bd_read_ios"]
        # the first two clusters read alone, then one read a window
        assert ios <= 2 + MiB // (WINDOW * PAGE_SIZE) + 1, ios
        assert st["bd_reads"] - before["bd_reads"] == MiB // PAGE_SIZE      # nothing read twice
        assert st["bd_readahead_hits"] == st["bd_readahead_pages"] > 0

        before = st
        # never where a load ended: the walk's ended at multiples of 8
        ends = collections.deque(maxlen=STREAMS)
        for _ in range(40):
            page = rng.choice([p for p in range(MiB // PAGE_SIZE - 8) if p % 8 and p not in ends])
            ends.append(page + 8)
            off = page * PAGE_SIZE
            assert store.read(off, CLUSTER) == data[off:off + CLUSTER]
        st = store.stats()
        assert st["bd_readahead_pages"] == before["bd_readahead_pages"]
        assert st["bd_read_ios"] - before["bd_read_ios"] == 40
    finally:
        store.close()


def test_pages_changed_after_they_were_read_ahead_read_as_they_are_now(backing_path):
    rng = random.Random(2)
    model = bytearray(b"".join(text_page(rng) for _ in range(MiB // PAGE_SIZE)))
    store = Store.open(backing_path, MiB, make_config())
    try:
        store.write(0, bytes(model))
        to_disk(store)
        assert store.read(0, CLUSTER) == model[:CLUSTER]
        assert store.read(CLUSTER, CLUSTER) == model[CLUSTER:2 * CLUSTER]  # reads ahead
        assert store.stats()["bd_readahead_pages"] == WINDOW - 8     # pages 16 .. 71
        # within the window kept: a page rewritten (and written back), one discarded, one
        # partly written, and one cached in the pool
        new = mixed_bytes(rng, PAGE_SIZE)
        store.write(20 * PAGE_SIZE, new)
        model[20 * PAGE_SIZE:21 * PAGE_SIZE] = new
        store.discard(30 * PAGE_SIZE, PAGE_SIZE)
        model[30 * PAGE_SIZE:31 * PAGE_SIZE] = bytes(PAGE_SIZE)
        store.write(37 * PAGE_SIZE + 100, b"partly")
        model[37 * PAGE_SIZE + 100:37 * PAGE_SIZE + 106] = b"partly"
        to_disk(store)
        cached = mixed_bytes(rng, PAGE_SIZE)
        store.write(45 * PAGE_SIZE, cached)
        model[45 * PAGE_SIZE:46 * PAGE_SIZE] = cached
        for off in range(2 * CLUSTER, MiB, CLUSTER):
            assert store.read(off, CLUSTER) == model[off:off + CLUSTER], off // PAGE_SIZE
    finally:
        store.close()


def test_a_discard_drops_the_pages_read_ahead_it_touches(backing_path):
    """Kept windows hold plaintext: a discard (blkdiscard, swapoff's discard) lets go of them."""
    rng = random.Random(4)
    data = b"".join(text_page(rng) for _ in range(MiB // PAGE_SIZE))
    store = Store.open(backing_path, MiB, make_config())
    try:
        store.write(0, data)
        to_disk(store)
        for off in (0, CLUSTER, 2 * WINDOW * PAGE_SIZE, 2 * WINDOW * PAGE_SIZE + CLUSTER):
            assert store.read(off, CLUSTER) == data[off:off + CLUSTER]
        kept = store.cache.disk_reader._kept
        assert sorted(kept) == [16, 2 * WINDOW + 16]
        store.discard((WINDOW + 7) * PAGE_SIZE, PAGE_SIZE)       # the first window's last page
        assert sorted(kept) == [2 * WINDOW + 16]
        store.discard(0, MiB)
        assert not kept
        assert store.read(0, MiB) == bytes(MiB)
    finally:
        store.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sequential_readers_among_writes_match_a_model(backing_path, seed):
    """Readers walk runs in swap-in clusters (so windows are read ahead and kept) while pages
    are written whole and in part, discarded, cached and written back between their steps."""
    rng = random.Random(seed)
    size = 2 * MiB
    npages = size // PAGE_SIZE
    model = bytearray(swap_like_bytes(rng, size))
    store = Store.open(backing_path, size, make_config(pool_limit=64 * 1024,
                                                       limit_policy=rng.choice(["zswap", "evict"]),
                                                       accept_threshold=50))
    try:
        store.write(0, bytes(model))
        walkers = [rng.randrange(npages) for _ in range(3)]
        for step in range(600):
            op = rng.random()
            if op < 0.6:
                w = rng.randrange(len(walkers))
                page = walkers[w]
                n = min(rng.choice([8, 8, 8, 4, 1, 16]), npages - page)
                off = page * PAGE_SIZE
                assert store.read(off, n * PAGE_SIZE) == model[off:off + n * PAGE_SIZE], step
                walkers[w] = page + n if page + n < npages else rng.randrange(npages)
            elif op < 0.8:
                # near a walker, so that kept windows go stale
                page = min(rng.choice(walkers) + rng.randrange(WINDOW), npages - 1)
                if rng.random() < 0.5:
                    data = swap_like_bytes(rng, PAGE_SIZE * rng.randrange(1, 4))
                    off = page * PAGE_SIZE
                else:
                    data = mixed_bytes(rng, rng.randrange(1, 200))
                    off = page * PAGE_SIZE + rng.randrange(PAGE_SIZE - len(data))
                data = data[:size - off]
                store.write(off, data)
                model[off:off + len(data)] = data
            elif op < 0.9:
                page = min(rng.choice(walkers) + rng.randrange(WINDOW), npages - 1)
                n = min(rng.randrange(1, 9), npages - page)
                store.discard(page * PAGE_SIZE, n * PAGE_SIZE)
                model[page * PAGE_SIZE:(page + n) * PAGE_SIZE] = bytes(n * PAGE_SIZE)
            elif op < 0.95:
                store.set_param("pool_limit", rng.choice(["0", "64K", "256K"]))
            else:
                store.fsync()
        st = store.stats()
        assert st["bd_readahead_hits"] > 0
        assert store.read(0, size) == bytes(model)
    finally:
        store.close()


def test_readers_walking_while_writers_write_never_see_an_older_page(backing_path):
    """Two readers walk the disk in clusters (windows read ahead and kept) while two writers
    rewrite pages under them and a tiny pool sends everything to disk: a read never returns a
    page older than a write that completed before the read began, and never a torn one."""
    npages = 512
    store = Store.open(backing_path, npages * PAGE_SIZE,
                       make_config(pool_limit=16 * 1024, limit_policy="evict"))
    latest = [0] * npages           # version of the last completed write of each page
    position = [0, 0]               # where each reader is
    errors: list = []
    stop = threading.Event()

    def page_of(page: int, version: int) -> bytes:
        # numbered lines: compressible, never same-filled
        return "".join(f"{page}:{version}:{i};" for i in range(PAGE_SIZE // 6)).encode()[:PAGE_SIZE]

    def writer(seed: int):
        rng = random.Random(seed)
        while not stop.is_set():
            # just ahead of a reader: in the window it has kept, most likely
            p = (rng.choice(position) + rng.randrange(8, 64)) % npages
            if p % 2 != seed % 2:
                continue                # each page has one writer
            version = latest[p] + 1
            store.write(p * PAGE_SIZE, page_of(p, version))
            latest[p] = version
            time.sleep(0.002)           # most pages ahead of a reader stay on disk

    def reader(seed: int):
        rng = random.Random(seed)
        page = rng.randrange(npages)
        while not stop.is_set():
            position[seed % 2] = page
            n = min(8, npages - page)
            floor = latest[page:page + n]
            data = store.read(page * PAGE_SIZE, n * PAGE_SIZE)
            for k in range(n):
                got = data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
                if got == bytes(PAGE_SIZE):
                    version = 0
                else:
                    p, version = map(int, got.split(b":")[:2])
                    if p != page + k or got != page_of(p, version):
                        errors.append(f"page {page + k}: torn")
                if version < floor[k]:
                    errors.append(f"page {page + k}: version {version} after {floor[k]}")
            page = page + n if page + n < npages else 0

    try:
        for p in range(npages):
            store.write(p * PAGE_SIZE, page_of(p, 0))
        def run(f, seed):
            try:
                f(seed)
            except BaseException as e:      # an EIO or a garbled page must fail the test
                errors.append(repr(e))
                stop.set()

        threads = [threading.Thread(target=run, args=(f, s), daemon=True)
                   for f, s in ((writer, 0), (writer, 1), (reader, 2), (reader, 3))]
        for t in threads:
            t.start()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(timeout=30)
            assert not t.is_alive(), "deadlock"
        assert not errors, errors[:3]
        st = store.stats()
        assert st["written_back_pages"] > 0
        assert st["bd_readahead_hits"] > 0
    finally:
        stop.set()
        store.close()


def test_a_window_stops_where_the_page_locks_wrap(backing_path):
    """A read-modify-write holds its page's lock stripe when it loads the page: a window that
    wrapped past the last stripe would then take lower ones after it, a deadlock with any hold
    that takes a low stripe and that page's in order. A window therefore ends at the wrap."""
    rng = random.Random(4)
    wrap = NSTRIPES * STRIPE_PAGES              # pages after which the stripes repeat
    npages = 2 * wrap
    data = bytearray(b"".join(text_page(rng) for _ in range(npages)))
    store = Store.open(backing_path, npages * PAGE_SIZE, make_config())
    try:
        store.write(0, bytes(data))
        to_disk(store)
        first = wrap - 16
        store.read(first * PAGE_SIZE, CLUSTER)
        store.read((first + 8) * PAGE_SIZE, CLUSTER)        # continues: widened to the wrap
        assert store.stats()["bd_readahead_pages"] == 0     # its 8 pages reach the wrap
        page = wrap - 40
        locks = store.cache.page_locks
        stop = threading.Event()

        def ascending_holder():
            # stripe 5, then a while later `page`'s: in order, as any hold of several takes them
            while not stop.is_set():
                with locks.hold([5]):
                    time.sleep(0.001)
                    with locks.hold([page]):
                        pass

        holder = threading.Thread(target=ascending_holder, daemon=True)
        holder.start()
        done = threading.Event()

        def partial_writes():
            for _ in range(20):
                for p in (page - 1, page):      # the second continues the first: it widens
                    store.write(p * PAGE_SIZE + 10, b"x")
                    data[p * PAGE_SIZE + 10] = ord("x")
                to_disk(store)
            done.set()

        writer = threading.Thread(target=partial_writes, daemon=True)
        writer.start()
        finished = done.wait(20)
        stop.set()
        holder.join(5)
        assert finished, "deadlock"
        assert store.stats()["bd_readahead_pages"] > 0
        assert store.read(0, npages * PAGE_SIZE) == bytes(data)
    finally:
        store.close()


def test_a_bad_page_read_ahead_fails_only_the_load_that_asks_for_it(backing_path):
    rng = random.Random(5)
    data = b"".join(text_page(rng) for _ in range(256))
    store = Store.open(backing_path, MiB, make_config())
    try:
        store.write(0, data)
        to_disk(store)
    finally:
        store.close()
    bad = 40
    with open(backing_path, "r+b") as f:
        f.seek(bad * PAGE_SIZE + 100)
        f.write(b"corrupt!")
    store = Store.open(backing_path, None, make_config())
    try:
        for page in range(0, bad - bad % 8, 8):     # the windows meet page 40 from page 8 on
            assert store.read(page * PAGE_SIZE, CLUSTER) == data[page * PAGE_SIZE:][:CLUSTER]
        st = store.stats()
        assert st["checksum_errors"] == 0
        assert st["bd_readahead_hits"] > 0
        with pytest.raises(DataError):
            store.read(bad * PAGE_SIZE, CLUSTER)
        assert store.stats()["checksum_errors"] == 1
        after = (bad + 8) * PAGE_SIZE
        assert store.read(after, MiB - after) == data[after:]
    finally:
        store.close()
