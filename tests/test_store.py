"""Engine tier: the store against a bytearray model, writeback, LRU, pools, memory, checksums.

No mount. Counters are the oracle (as the kernel's test_zswap.c): a writeback test asserts that
written_back_pages moved, and the bytes still read back right.
"""

import collections
import os
import random
import threading
import time

import numpy as np
import psutil
import pytest

from zblock import PAGE_SIZE
from zblock.entries import (COMP, DISK, FAR, NONE, OBJ_CHUNK, OBJ_SHIFT, RAW, SAME, ObjectSlots,
                            far_value_size)
from zblock.lru import MAX_RECLAIM_RETRIES, select_victims, walk_like_zswap
from zblock.pool import charge
from zblock.pools import HW_COUNTERS
from zblock.config import Config
from zblock.errors import ConfigError, DataError, OutOfRange
from zblock.store import TABLE_BYTES_PER_PAGE, Store
from mountutil import wait_for
from tableview import npt

MiB = 1 << 20


def text_page(rng: random.Random) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"swap", b"page", b"zblock", b"\n"]
    out = bytearray()
    while len(out) < PAGE_SIZE:
        out += rng.choice(words) + b" " + str(rng.randrange(1000)).encode()
    return bytes(out[:PAGE_SIZE])


def mixed_bytes(rng: random.Random, n: int) -> bytes:
    """Whole pages of mixed kinds: zero, same-filled, random (incompressible), text."""
    out = bytearray()
    while len(out) < n:
        kind = rng.randrange(4)
        if kind == 0:
            out += bytes(PAGE_SIZE)
        elif kind == 1:
            out += rng.randrange(1 << 64).to_bytes(8, "little") * (PAGE_SIZE // 8)
        elif kind == 2:
            out += rng.randbytes(PAGE_SIZE)
        else:
            out += text_page(rng)
    return bytes(out[:n])


def dup_bytes(rng: random.Random, n: int, library: list[bytes]) -> bytes:
    """Whole pages, three in four copies of a page of `library`, the rest new mixed pages."""
    pages = [rng.choice(library) if rng.random() < 0.75 else mixed_bytes(rng, PAGE_SIZE)
             for _ in range(-(-n // PAGE_SIZE))]
    return b"".join(pages)[:n]


@pytest.fixture
def backing_path(tmp_path):
    return str(tmp_path / "disk.img")


def write_key(directory: str, name: str = "key") -> str:
    """A fresh 32-byte key file (mode 600) in `directory`; its path."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    return path


def make_config(**kw) -> Config:
    cfg = Config()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def check_consistency(store: Store) -> None:
    """fsck for the cache: gauges agree with the entry table (s3ql ends tests with fsck)."""
    c = store.cache
    t = npt(c.table)
    with c.tree_lock:
        st = t.state
        pools = c.registry.live()
        cached = (st == COMP) | (st == RAW)
        assert sum(p.stored_pages for p in pools) == int(np.count_nonzero(cached))
        assert t.same_filled_pages == int(np.count_nonzero(st == SAME))
        assert t.stored_incompressible_pages == int(np.count_nonzero(st == RAW))
        assert t.pool_total_size == sum(p.total_size for p in pools)
        dedup_pages = dedup_saved = 0
        for p in pools:
            mine = (t.pool_id == p.id) & cached
            assert p.stored_pages == int(np.count_nonzero(mine))
            objs = [t.obj(q) for q in np.flatnonzero(mine).tolist()]
            if not t.dedup:
                assert p.total_size == sum(charge(len(o)) for o in objs)
                assert not p.objects and not p.sharers
                continue
            # one charge per distinct object; the index holds exactly those objects, and
            # counts the sharers of each object more than one entry holds
            distinct = {id(o): o for o in objs}
            holders = collections.Counter(map(id, objs))
            assert p.total_size == sum(charge(len(o)) for o in distinct.values())
            assert sorted(map(id, p.objects)) == sorted(distinct)
            assert all(p.objects[o] is o for o in distinct.values())
            assert {id(o): n for o, n in p.sharers.items()} == \
                {i: n for i, n in holders.items() if n > 1}
            dedup_pages += len(objs) - len(distinct)
            dedup_saved += sum((holders[i] - 1) * charge(len(o)) for i, o in distinct.items())
        assert (t.dedup_pages, t.dedup_saved_bytes) == (dedup_pages, dedup_saved)
        assert t.disk_pages == int(np.count_nonzero(st == DISK))
        far = st == FAR
        assert t.far_pages == int(np.count_nonzero(far))
        assert t.far_bytes == int(far_value_size(t.length[far].astype(np.int64),
                                                 t.far_overhead).sum())
        for p in pools:
            assert p.far_pages == int(np.count_nonzero(far & (t.pool_id == p.id)))
        # every entry that needs its pool names a live one
        assert set(np.unique(t.pool_id[cached | far]).tolist()) <= {p.id for p in pools}
        # a page under writeback is a cached or far one (the worker may be mid-batch)
        assert (cached | far)[t.under_wb].all()
        # a page has an object exactly when it is cached, and every entry is in a live chunk
        for c, chunk in enumerate(t.objs.chunks):
            lo = c * OBJ_CHUNK
            want = cached[lo:lo + OBJ_CHUNK]
            if chunk is None:
                assert not want.any(), c
            else:
                has = np.array([o is not None for o in chunk[:len(want)]])
                assert (has == want).all(), c
        entries = np.flatnonzero((st != NONE) & (st != DISK))
        assert t.live[entries >> OBJ_SHIFT].all()


# ---------------------------------------------------------------------------------------------
# the model test


@pytest.mark.parametrize("policy, seed, encrypt, dedup",
                         [(p, s, False, False) for p in ("evict", "zswap") for s in (1, 2, 3)]
                         + [("evict", 2, True, False), ("zswap", 1, True, False)]
                         + [(p, s, False, True) for p in ("evict", "zswap") for s in (1, 2, 3)])
def test_store_matches_bytearray_model(backing_path, policy, seed, encrypt, dedup):
    """Random writes, reads, discards and fsyncs against a bytearray, through a pool of a few
    dozen pages: most pages live on disk and are read back in runs. Seeds 1 and 3 with
    write-through, seed 2 without (every page then reaches the disk by writeback or fsync);
    seed 3 starts with a sequential cutoff, and every seed turns it on and off now and then.
    `encrypt`: every page that reaches the file is sealed (zblock.seal).
    With dedup, most pages written are copies of a dozen pages (so sharers are overwritten,
    discarded, written back and switched between pools), and writeback on demand and
    recompression run now and then."""
    rng = random.Random(seed)
    size = 2 * MiB
    cfg = make_config(pool_limit=96 * 1024, limit_policy=policy, accept_threshold=70,
                      incompressible_policy=rng.choice(["store_raw", "reject"]),
                      write_through=seed != 2, dedup=dedup, recomp_algorithm="zstd:9,deflate",
                      sequential_cutoff=64 * 1024 if seed == 3 else 0)
    if encrypt:
        cfg.encrypt, cfg.key_file = True, write_key(os.path.dirname(backing_path))
    if dedup:
        library = [mixed_bytes(rng, PAGE_SIZE) for _ in range(12)]
        pages_of = lambda n: dup_bytes(rng, n, library)     # noqa: E731
    else:
        pages_of = lambda n: mixed_bytes(rng, n)            # noqa: E731
    model = bytearray(size)
    shared = 0                      # the most pages sharing another's object at once
    store = Store.open(backing_path, size, cfg)
    try:
        for step in range(250):
            op = rng.random()
            if op < 0.45:
                if rng.random() < 0.5:   # page-aligned run
                    npages = rng.randrange(1, 80)
                    off = rng.randrange(0, size // PAGE_SIZE - npages + 1) * PAGE_SIZE
                    data = pages_of(npages * PAGE_SIZE)
                else:                    # any offset, any length
                    length = rng.randrange(1, 3 * PAGE_SIZE)
                    off = rng.randrange(0, size - length + 1)
                    data = pages_of(length + PAGE_SIZE)[rng.randrange(PAGE_SIZE):][:length]
                assert store.write(off, data) == len(data)
                model[off:off + len(data)] = data
                shared = max(shared, npt(store.cache.table).dedup_pages)
            elif op < 0.75:
                length = rng.randrange(1, 300 * 1024)
                off = rng.randrange(0, size)
                assert store.read(off, length) == bytes(model[off:off + length])
            elif op < 0.82:
                length = rng.randrange(1, 64 * 1024)
                off = rng.randrange(0, size - length + 1)
                store.discard(off, length)
                model[off:off + length] = bytes(length)
            elif dedup and op < 0.85:
                store.set_param("idle", rng.choice(["all", "0"]))
                if rng.random() < 0.5:
                    store.set_param("writeback", rng.choice(["idle", "huge", "incompressible"]))
                else:
                    store.set_param("recompress", rng.choice(["type=idle", "type=huge"]))
            elif op < 0.87:
                store.fsync()
            elif op < 0.93:
                store.set_param("compressor", rng.choice(["lz4", "lzo", "zstd", "deflate"]))
            elif op < 0.96:
                if rng.random() < 0.3:       # runs of more than 16 pages go to disk, uncompressed
                    store.set_param("sequential_cutoff", rng.choice(["0", "64K"]))
                else:
                    store.set_param(rng.choice(["same_filled_pages_enabled", "write_through"]),
                                    rng.choice("YN"))
            else:
                check_consistency(store)
                store.close()
                store = Store.open(backing_path, None, cfg)
                assert store.size == size
        check_consistency(store)
        assert store.read(0, size) == bytes(model)
        assert (shared > 0) == dedup
        st = store.stats()
        assert st["stored_pages"] == sum(p["stored_pages"] for p in st["pools"]) + st["same_filled_pages"]
        store.close()
        store = Store.open(backing_path, None, cfg)
        assert store.read(0, size) == bytes(model)
    finally:
        store.close()
    # after a clean close the backing file is the plain raw image, or its ciphertext
    with open(backing_path, "rb") as f:
        image = f.read()
    if encrypt:
        written = [model[o:o + PAGE_SIZE] for o in range(0, size, PAGE_SIZE)]
        assert not any(p in image for p in written if any(p)), "a page reached the file in clear"
    else:
        assert image == bytes(model)


# ---------------------------------------------------------------------------------------------
# block-device semantics


def test_bounds(backing_path):
    store = Store.open(backing_path, 64 * 1024, make_config())
    try:
        assert store.read(64 * 1024, 10) == b""
        assert store.read(64 * 1024 - 3, 10) == bytes(3)
        with pytest.raises(OutOfRange):
            store.write(64 * 1024 - 2, b"abc")
        assert store.write(64 * 1024 - 3, b"abc") == 3
        assert store.read(0, 0) == b""
        assert store.write(5, b"") == 0
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# writeback, LRU, limits


def test_writeback_without_fsync(backing_path):
    rng = random.Random(7)
    cfg = make_config(pool_limit=256 * 1024, shrinker_enabled=False)
    store = Store.open(backing_path, 8 * MiB, cfg)
    try:
        data = b"".join(text_page(rng) for _ in range(1024))     # 4 MiB of text, > 10x the pool
        store.write(0, data)
        wait_for(lambda: store.stats()["pool_total_size"] <= cfg.pool_limit, what="pool under limit")
        st = store.stats()
        assert st["written_back_pages"] > 0 and st["zswpwb"] == st["written_back_pages"]
        assert st["flushed_pages"] == 0 and st["pool_limit_hit"] > 0
        assert store.read(0, len(data)) == data
        check_consistency(store)
    finally:
        store.close()


def test_lru_second_chance(backing_path):
    rng = random.Random(8)
    # no write-through: the pages written back must be dirty, so that each is a disk write
    cfg = make_config(pool_limit=1 << 30, shrinker_enabled=False, write_through=False)
    store = Store.open(backing_path, 1 * MiB, cfg)
    try:
        for p in range(20):                     # one store per page: stamps increase with p
            store.write(p * PAGE_SIZE, text_page(rng))
        store.stats()                           # every queued write stored (write-behind)
        for p in range(5):                      # pages 0..4 read since stored
            store.read(p * PAGE_SIZE, PAGE_SIZE)
        c = store.cache
        with c.tree_lock:
            victims, gens = select_victims(c.table, 10)
        # the 10 coldest pages not read since stored; 0..4 were read: they get a second chance
        assert victims == list(range(5, 15))
        assert c.writeback.write_back(victims, gens)
        st = store.stats()
        assert st["written_back_pages"] == 10
        assert (npt(c.table).state[0:5] == COMP).all() and (npt(c.table).state[5:15] == DISK).all()
        assert not npt(c.table).referenced[0:5].any()              # ... but only one
        with c.tree_lock:
            victims, gens = select_victims(c.table, 5)
        assert victims == list(range(15, 20))  # rotated pages are now the youngest
        assert c.writeback.write_back(victims, gens)
        with c.tree_lock:
            victims, _ = select_victims(c.table, 5)
            npt(c.table).under_wb[victims] = False
        assert victims == list(range(0, 5))    # unread since: no third chance
        check_consistency(store)
    finally:
        store.close()


def test_zswap_policy_walks_like_shrink_worker(backing_path):
    """Under the zswap policy every stored page is referenced (zswap_store), and the walk is
    shrink_worker's: one entry at a time from the cold end, a referenced one rotated to the
    tail with its bit cleared and counted as a failure, an unreferenced one a victim; it stops
    at the retry budget or once it has enough victims."""
    rng = random.Random(10)
    cfg = make_config(pool_limit=1 << 30, limit_policy="zswap", shrinker_enabled=False,
                      write_through=False)          # the pages written back are disk writes
    store = Store.open(backing_path, 4 * MiB, cfg)
    try:
        pages = [text_page(rng) for _ in range(100)]
        for p, data in enumerate(pages):        # one store per page: stamps increase with p
            store.write(p * PAGE_SIZE, data)
        store.stats()
        c, t = store.cache, npt(store.cache.table)
        assert t.referenced[:100].all()
        with c.tree_lock:
            victims, gens, failures = walk_like_zswap(t._table, 10, retries=MAX_RECLAIM_RETRIES)
        assert len(victims) == 0 and failures == MAX_RECLAIM_RETRIES     # gave up: 0..15 rotated
        assert not t.referenced[:16].any() and t.referenced[16:100].all()
        coldest = np.argsort(t.stamp[:100], kind="stable")
        assert coldest[:84].tolist() == list(range(16, 100)) and coldest[84:].tolist() == list(range(16))
        with c.tree_lock:                       # 84 referenced before the rotated ones
            victims, gens, failures = walk_like_zswap(t._table, 10, retries=100)
        assert failures == 84 and victims == list(range(10))
        assert t.under_wb[victims].all()
        assert c.writeback.write_back(victims, gens)
        assert store.stats()["written_back_pages"] == 10
        assert store.read(0, 100 * PAGE_SIZE) == b"".join(pages)
        store.set_param("limit_policy", "evict")            # evict: loads set the bit, not stores
        store.write(200 * PAGE_SIZE, text_page(rng))
        store.stats()
        assert not t.referenced[200]
        check_consistency(store)
    finally:
        store.close()


def test_zswap_policy_at_the_limit_rejects_stores(backing_path):
    """A stream of new pages through a full pool under the zswap policy: some go to disk as
    rejected stores (uncompressed, once), and fewer are written back than under evict, which
    admits every page and writes the coldest back instead."""
    rng = random.Random(11)
    data = b"".join(text_page(rng) for _ in range(4096))
    counts = {}
    for policy in ("zswap", "evict"):
        path = f"{backing_path}.{policy}"
        # no write-through: the pages written back are disk writes, as the kernel's are
        cfg = make_config(pool_limit=2 * MiB, limit_policy=policy, shrinker_enabled=False,
                          write_through=False)
        store = Store.open(path, 16 * MiB, cfg)
        try:
            for i in range(0, len(data), 8 * PAGE_SIZE):
                store.write(i, data[i:i + 8 * PAGE_SIZE])
            assert store.read(0, len(data)) == data
            counts[policy] = store.stats()
            check_consistency(store)
        finally:
            store.close()
    z, e = counts["zswap"], counts["evict"]
    assert z["reject_pool_limit"] > 0, z
    assert z["pool_limit_hit"] > 0
    assert e["reject_pool_limit"] == 0 and e["written_back_pages"] > z["written_back_pages"], e


def test_write_through_keeps_what_was_written_not_what_the_buffer_became(backing_path):
    """A store from a caller's writable buffer (no write-behind): write-through writes the bytes
    as stored, even if the caller reuses the buffer before the background write."""
    rng = random.Random(12)
    first = b"".join(text_page(rng) for _ in range(4))
    buf = bytearray(first)
    store = Store.open(backing_path, 1 * MiB, make_config(write_through=True), write_behind=0)
    try:
        store.write(0, memoryview(buf))
        buf[:] = bytes(len(buf))                    # the caller reuses its buffer at once
        store.cache.write_through.drain()
        assert store.stats()["written_through_pages"] == 4
        store.fsync()
    finally:
        store.close()
    with open(backing_path, "rb") as f:
        assert f.read(len(first)) == first


def test_a_stream_past_the_sequential_cutoff_goes_to_disk_uncompressed(backing_path):
    """bcache's sequential_cutoff: the first `cutoff` bytes of a run of consecutive writes go
    into the pool, the rest to the backing file as written (and out of the pool, older entries
    included); an interleaved second stream is told apart; a random write still goes into the
    pool; everything reads back, also after a remount."""
    rng = random.Random(21)
    size = 4 * MiB
    a = b"".join(text_page(rng) for _ in range(256))        # 1 MiB, compressible
    b = b"".join(text_page(rng) for _ in range(256))
    store = Store.open(backing_path, size, make_config())
    try:
        store.write(0, a)                   # cached first: the stream then replaces it
        store.fsync()
        store.set_param("sequential_cutoff", "256K")
        before = store.stats()
        assert before["stored_pages"] == 256 and before["bypassed_pages"] == 0, before
        for k in range(8):                  # two streams, 128 KiB writes, interleaved
            store.write(k * 128 * 1024, a[k * 128 * 1024:(k + 1) * 128 * 1024])
            store.write(2 * MiB + k * 128 * 1024, b[k * 128 * 1024:(k + 1) * 128 * 1024])
        store.write(3 * MiB + 5 * PAGE_SIZE, b[:PAGE_SIZE])      # a lone page: into the pool
        st = store.stats()
        assert st["bypassed_pages"] - before["bypassed_pages"] == 2 * (256 - 64), st
        # each stream's first 256 KiB (64 pages) and the lone page are cached, the rest are not
        assert st["stored_pages"] == 2 * 64 + 1, st
        assert st["bd_writes"] - before["bd_writes"] >= 2 * (256 - 64), st
        assert store.read(0, MiB) == a and store.read(2 * MiB, MiB) == b
        assert store.read(3 * MiB + 5 * PAGE_SIZE, PAGE_SIZE) == b[:PAGE_SIZE]
        with open(backing_path, "rb") as f:     # the bypassed pages are in the file already
            f.seek(MiB - PAGE_SIZE)
            assert f.read(PAGE_SIZE) == a[-PAGE_SIZE:]
        store.set_param("sequential_cutoff", "0")       # off: the same stream is cached again
        store.write(0, b)
        assert store.stats()["bypassed_pages"] == st["bypassed_pages"]
        assert store.stats()["stored_pages"] == 256 + 64 + 1
        assert store.read(0, MiB) == b
    finally:
        store.close()
    store = Store.open(backing_path, None, make_config())
    try:
        assert store.read(0, MiB) == b and store.read(2 * MiB, MiB) == b
    finally:
        store.close()


def test_sequential_cutoff_is_refused_in_swap_mode(backing_path):
    with pytest.raises(ConfigError, match="persistent mode only"):
        Config.from_strings({"swap": "Y", "sequential_cutoff": "4M"})
    store = Store.open(backing_path, 1 * MiB, make_config(swap=True))
    try:
        with pytest.raises(ConfigError, match="persistent mode only"):
            store.set_param("sequential_cutoff", "4M")
        assert store.config.sequential_cutoff == 0
        store.set_param("sequential_cutoff", "0")
    finally:
        store.close()


def test_zswap_policy_passes_that_give_up_do_not_spin(backing_path, monkeypatch):
    """Rejected stores each ask for a shrink pass; a pass that gave up without freeing anything
    makes the next one wait GIVE_UP_PAUSE, so a stream of rejects costs a few passes, not one
    per store (each walks the table under the tree lock)."""
    from zblock import writeback
    passes = []
    real = writeback.walk_like_zswap

    def counted(table, *args):
        passes.append(1)
        npt(table).referenced[:] = True              # every pass gives up...
        return real(table, *args)

    monkeypatch.setattr(writeback, "walk_like_zswap", counted)
    rng = random.Random(14)
    cfg = make_config(pool_limit=64 * 1024, limit_policy="zswap", shrinker_enabled=False)
    store = Store.open(backing_path, 4 * MiB, cfg, write_behind=0)
    try:
        page = text_page(rng)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.5:      # ...while stores are rejected, one page each
            for p in range(0, 1024, 4):
                store.write(p * PAGE_SIZE, page)
        st = store.stats()
        assert st["reject_pool_limit"] > 100, st
        assert len(passes) <= 30, len(passes)        # 0.5 s / GIVE_UP_PAUSE, and a few
    finally:
        store.close()


def test_zswap_policy_rejects_until_threshold(backing_path):
    rng = random.Random(9)
    cfg = make_config(pool_limit=128 * 1024, limit_policy="zswap", accept_threshold=50,
                      shrinker_enabled=False, write_through=False)   # counts disk writes
    store = Store.open(backing_path, 4 * MiB, cfg)
    try:
        data = b"".join(text_page(rng) for _ in range(512))
        for i in range(0, len(data), 16 * PAGE_SIZE):
            store.write(i, data[i:i + 16 * PAGE_SIZE])
        st = store.stats()
        assert st["pool_limit_hit"] > 0
        assert st["bd_writes"] > st["written_back_pages"]     # rejected stores went to disk
        wait_for(lambda: store.stats()["written_back_pages"] > 0, what="shrink worker")
        assert store.read(0, len(data)) == data
        check_consistency(store)
        # the hysteresis itself, on the gauge: once full, stores are rejected until the pool is
        # at or below accept_threshold % of the limit
        c = store.cache
        t = npt(c.table)
        with c.tree_lock:
            real = t.pool_total_size
            try:
                c.limits.reached_full = False
                t.pool_total_size = cfg.pool_limit
                hits = c.c.pool_limit_hit
                assert c.limits.check(16)                   # at the limit: reject
                assert c.c.pool_limit_hit == hits + 16       # a hit per page, as per folio
                t.pool_total_size = cfg.pool_limit * 70 // 100
                assert c.limits.check()                     # below the limit, above 50%
                t.pool_total_size = cfg.pool_limit * 50 // 100
                assert not c.limits.check()                 # at the threshold: accept again
                assert not c.limits.check()
            finally:
                t.pool_total_size = real
    finally:
        store.close()


def test_same_filled_and_incompressible(backing_path):
    cfg = make_config(write_through=False)          # bd_writes: the rejected page's write only
    store = Store.open(backing_path, 1 * MiB, cfg)
    try:
        store.write(0, bytes(PAGE_SIZE) + b"\xab" * PAGE_SIZE + os.urandom(PAGE_SIZE))
        st = store.stats()
        assert st["same_filled_pages"] == 2
        assert st["stored_incompressible_pages"] == 1
        assert st["stored_pages"] == 3
        store.set_param("incompressible_policy", "reject")
        store.write(3 * PAGE_SIZE, os.urandom(PAGE_SIZE))
        st = store.stats()
        assert st["reject_compress_poor"] == 1 and st["bd_writes"] == 1
        store.set_param("same_filled_pages_enabled", "N")
        store.write(4 * PAGE_SIZE, bytes(PAGE_SIZE))
        assert store.stats()["same_filled_pages"] == 2
        check_consistency(store)
    finally:
        store.close()


# seeds whose one-page mixed_bytes is zero, same-filled, random and text, in that order
_SEED_OF_KIND = [next(s for s in range(100) if random.Random(s).randrange(4) == k) for k in range(4)]


def _entries_and_gauges(store: Store) -> tuple:
    """What two ways of storing the same pages must agree on: the entry table (fill only where
    it means something, for same-filled pages), the gauges and counters; after the fsck."""
    check_consistency(store)
    t = npt(store.cache.table)
    stats = store.stats()
    return (t.state.tolist(), t.fill[t.state == SAME].tolist(), t.length.tolist(),
            t.referenced.tolist(), t.dirty.tolist(),
            {k: stats[k] for k in ("same_filled_pages", "stored_pages", "stored_incompressible_pages",
                                   "pool_total_size", "reject_compress_poor", "zswpout", "zswpin",
                                   "bd_writes")})


@pytest.mark.parametrize("npages", [1, 6, 40])
@pytest.mark.parametrize("same, policy", [(True, "store_raw"), (True, "reject"),
                                          (False, "store_raw")])
def test_the_c_scan_stores_what_the_python_scan_stores(tmp_path, monkeypatch, npages, same,
                                                       policy):
    """With the C extension, software lz4 checks and compresses a write request in one C call;
    without it, python-lz4 and numpy do (zblock.scan). Both must leave the same entries, gauges
    and counters, including over older entries and with incompressible pages sent to disk."""
    from zblock import compressors
    rng = random.Random(npages)
    old = mixed_bytes(rng, npages * PAGE_SIZE)
    # every kind of page, in an order the first store did not use
    seeds = [_SEED_OF_KIND[i % 4] for i in range(max(npages, 4))][:npages]
    rng.shuffle(seeds)
    new = b"".join(mixed_bytes(random.Random(seed), PAGE_SIZE) for seed in seeds)
    results = []
    for c_ext in (True, False):
        if not c_ext:
            monkeypatch.setattr(compressors, "_lz4pages", None)
        # no write-through: the tables compared (dirty bits included) must not depend on timing
        store = Store.open(str(tmp_path / f"{c_ext}.img"), 1 * MiB, make_config(
            same_filled_pages_enabled=same, incompressible_policy=policy, write_through=False),
            write_behind=0)
        try:
            c = store.cache
            assert (c.registry.current.contexts._contexts[0].tfm.compressor._c is not None) is c_ext
            c.store_pages(3, old)
            c.store_pages(3, new)           # frees the entries the first store made
            assert store.read(3 * PAGE_SIZE, len(new)) == new
            results.append(_entries_and_gauges(store))
        finally:
            store.close()
    # liblz4 and python-lz4's bundled lz4 may differ by a few bytes on a page: compare sizes
    # only where both are exact (raw pages), the rest whole
    for r in results:
        r[2][:] = [n if n == PAGE_SIZE else 0 for n in r[2]]
        del r[5]["pool_total_size"]
    assert results[0] == results[1]
    if npages >= 4:
        assert (SAME in results[0][0]) is same and (DISK in results[0][0]) is (policy == "reject")


def _stored_two_ways(tmp_path, where: list[int], store_news, **config) -> list:
    """Pages of every kind stored at `where` over older ones, by store_news(cache, way, news) for
    way True and False on two fresh stores: what each leaves (_entries_and_gauges), once both
    read back."""
    rng = random.Random(len(where))
    olds = [mixed_bytes(rng, PAGE_SIZE) for _ in where]
    news = [mixed_bytes(random.Random(_SEED_OF_KIND[i % 4]), PAGE_SIZE) for i in range(len(where))]
    results = []
    for way in (True, False):
        # no write-through: the tables compared (dirty bits included) must not depend on timing
        store = Store.open(str(tmp_path / f"{way}.img"), 1 * MiB,
                           make_config(write_through=False, **config), write_behind=0)
        try:
            c = store.cache
            for page, data in zip(where, olds):
                assert c.store_pages(page, data)
            store_news(c, way, news)
            assert [c.load_page(p) for p in where] == news
            results.append(_entries_and_gauges(store))
        finally:
            store.close()
    return results


@pytest.mark.parametrize("compressor, policy", [("lz4", "store_raw"), ("lz4", "reject"),
                                                ("zstd", "store_raw")])
def test_a_batch_at_scattered_pages_stores_what_page_by_page_stores(tmp_path, compressor, policy):
    """The write-behind queue stores a batch of 4 KiB writes at scattered pages in one call
    (Cache.store_pages with page numbers: one scan and one C install). It must
    leave what storing each page on its own leaves, over older entries, with incompressible
    pages sent to disk under `reject`."""
    import numpy as np
    where = random.Random(11).sample(range(64), 20)

    def store_news(c, batched, news):
        if batched:
            c.store_pages(np.array(where, np.int64), b"".join(news))
        else:
            for page, data in zip(where, news):
                c.store_pages(page, data)

    results = _stored_two_ways(tmp_path, where, store_news, compressor=compressor,
                               incompressible_policy=policy)
    assert results[0] == results[1]
    assert (DISK in results[0][0]) is (policy == "reject")


def test_a_store_holds_its_pool_while_it_compresses(backing_path):
    """A store compresses with the pool unlocked: a param change meanwhile makes another pool
    current, but the store's pool lives until its pages are in (and then serves them)."""
    store = Store.open(backing_path, 1 * MiB, Config(), write_behind=0)
    try:
        c = store.cache
        old = c.registry.current
        compress = old.contexts.compress

        def compress_then_switch(*args, **kw):
            result = compress(*args, **kw)
            store.set_param("compressor", "zstd")       # the old pool has no entries yet
            return result

        old.contexts.compress = compress_then_switch
        page = text_page(random.Random(1))
        assert c.store_pages(5, page)
        assert c.registry.pools[old.id] is old and npt(c.table).pool_id[5] == old.id
        assert c.registry.current.label == "zstd-1"
        assert store.read(5 * PAGE_SIZE, PAGE_SIZE) == page
        store.write(5 * PAGE_SIZE, page)                 # its last page rewritten: it dies
        store.stats()
        assert c.registry.pools[old.id] is None
        check_consistency(store)
    finally:
        store.close()


def test_swap_trimmer_waits_for_a_quiet_cache():
    """Swap mode's release (unlock, trim, relock) runs only once the cache has been quiet for
    `quiet` seconds, or `max_wait` after the last one; never on each free."""
    from zblock.pool import Trimmer
    now = [100.0]
    released = []
    t = Trimmer(threshold=1 << 30, min_interval=5.0, release=lambda: released.append(now[0]),
                quiet=2.0, max_wait=30.0, clock=lambda: now[0])
    t.trim(activity=0)
    assert released == []                       # nothing asked for
    t.request()                                 # as the write-behind queue does when idle
    for step in range(10):                      # a storm: activity moves on every pass
        now[0] += 1.0
        t.trim(activity=step + 1)
    assert released == []                       # 10 s: past min_interval, never quiet
    now[0] += 1.0
    t.trim(activity=10)                         # unchanged for 1 s: not yet
    now[0] += 1.0
    t.trim(activity=10)                         # quiet for 2 s
    assert released == [112.0]
    t.request()
    for step in range(40):                      # a storm that never stops: max_wait
        now[0] += 1.0
        t.trim(activity=100 + step)
    assert released == [112.0, 142.0]
    t.trim(force=True, activity=0)              # forced: at once
    assert len(released) == 3


def test_trimmer_trims_when_the_pool_shrank_not_on_every_free():
    """Overwrites free as much as they allocate: no trim. A pool that shrank by the threshold
    (discards), or a request (an idle write-behind queue), gets one, rate-limited."""
    from zblock.pool import Trimmer
    now = [0.0]
    trims = []
    t = Trimmer(threshold=8 << 20, min_interval=0.2, release=lambda: trims.append(now[0]),
                clock=lambda: now[0])
    size = 100 << 20
    for _ in range(50):                         # steady overwrites: frees, same pool size
        now[0] += 0.1
        t.freed(4 << 20)
        t.trim(pool_size=size)
    assert trims == []
    size -= 16 << 20                            # a discard
    now[0] += 0.1
    t.trim(pool_size=size)
    assert trims == [pytest.approx(5.1)]
    size -= 16 << 20
    now[0] += 0.1
    t.trim(pool_size=size)                      # within min_interval of the last
    assert len(trims) == 1
    now[0] += 0.2
    t.trim(pool_size=size)
    assert len(trims) == 2
    size += 64 << 20                            # grows again: a new peak, nothing to give back
    now[0] += 1.0
    t.trim(pool_size=size)
    t.request()
    t.trim(pool_size=size)
    assert len(trims) == 3


def test_contexts_param_takes_effect(backing_path):
    """A contexts write makes a new current pool with that many contexts; the old pool keeps
    serving its pages until they are rewritten."""
    rng = random.Random(11)
    store = Store.open(backing_path, 1 * MiB, make_config(contexts=2, compressor="zstd"))
    try:
        a = b"".join(text_page(rng) for _ in range(8))
        store.write(0, a)
        store.set_param("contexts", "1")
        assert store.cache.registry.current.contexts.n == 1
        store.write(8 * PAGE_SIZE, a)
        assert len(store.stats()["pools"]) == 2
        store.write(0, a)                              # the 2-context pool's pages rewritten
        st = store.stats()
        assert len(st["pools"]) == 1 and st["acomp_contexts"] == 1
        assert store.read(0, 16 * PAGE_SIZE) == a + a
        check_consistency(store)
    finally:
        store.close()


def test_compressor_switch_pools(backing_path):
    rng = random.Random(10)
    store = Store.open(backing_path, 1 * MiB, make_config())
    try:
        a = b"".join(text_page(rng) for _ in range(8))
        store.write(0, a)
        store.set_param("compressor", "zstd")
        store.write(8 * PAGE_SIZE, a)
        st = store.stats()
        assert [p["compressor"] for p in st["pools"]] == ["lz4", "zstd-1"]
        assert st["pools"][0]["refs"] == 8 and st["pools"][1]["refs"] == 9
        assert store.read(0, 16 * PAGE_SIZE) == a + a        # the old pool still serves its pages
        store.set_param("compressor", "lz4")                 # A -> B -> A reuses A
        st = store.stats()
        assert len(st["pools"]) == 2 and st["pools"][0]["refs"] == 9
        store.set_param("compressor", "deflate")
        store.write(0, a)                                    # rewrite lz4's pages: lz4 pool dies
        store.write(8 * PAGE_SIZE, a)                        # ... and zstd's
        st = store.stats()
        assert [p["compressor"] for p in st["pools"]] == ["deflate"]
        assert st["acomp_contexts"] == store.config.contexts
        assert store.read(0, 16 * PAGE_SIZE) == a + a
        check_consistency(store)
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# memory


def _in_fresh_process(probe: str, backing_path: str, timeout: float) -> dict:
    """test_store.<probe>(backing_path) run in a new interpreter, its JSON result: memory
    measured there sees no heap that earlier tests freed and left behind."""
    import json
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import test_store; "
            f"print(json.dumps(test_store.{probe}({backing_path!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=timeout, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _large_disk_memory(backing_path: str) -> dict:
    """Open an empty 1 TiB store, read where nothing was written, write a little at both ends
    and its middle, close, reopen and discard what was written; table_bytes and the process's
    RSS growth at each step, and its peak. Runs in a fresh process (test below)."""
    import resource
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    out = {}
    data = b"".join(text_page(random.Random(13)) for _ in range(300))
    offsets = [0, 1 << 39, (1 << 40) - len(data)]
    chunk = OBJ_CHUNK * PAGE_SIZE
    cfg = make_config(sparse=True)                 # sparse: never reserve 1 TiB
    try:
        store = Store.open(backing_path, 1 << 40, cfg)
        try:
            out["open"] = (store.stats()["table_bytes"], proc.memory_info().rss - rss0)
            out["read_empty"] = store.read(1 << 38, 8 * MiB) == bytes(8 * MiB)
            out["after_read"] = store.stats()["table_bytes"]
            for off in offsets:
                store.write(off, data)
            store.fsync()
            out["written"] = (store.stats()["table_bytes"], proc.memory_info().rss - rss0)
        finally:
            store.close()
        store = Store.open(backing_path, None, cfg)
        try:
            out["reopened_same"] = all(store.read(off, len(data)) == data for off in offsets)
            out["reopened"] = (store.stats()["table_bytes"], proc.memory_info().rss - rss0)
            for off in offsets:
                store.write(off, data)                 # cached again, so that chunks exist
            for off in offsets:                        # whole chunks: given back
                store.discard(off // chunk * chunk, chunk)
            out["chunks_left"] = sum(c is not None for c in npt(store.cache.table).objs.chunks)
            out["live_left"] = int(npt(store.cache.table).live.sum())
            out["discarded_reads_zero"] = store.read(offsets[1], len(data)) == bytes(len(data))
        finally:
            store.close()
    finally:
        for p in (backing_path, backing_path + ".zbmeta"):     # 2 GiB of sidecar reserved
            if os.path.exists(p):
                os.unlink(p)
    out["peak"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - peak0
    return out


def test_large_disk_table_memory_follows_pages_in_use(backing_path):
    """A 1 TiB disk (sparse file) costs table memory for the parts in use, far below the 8
    bytes a page one object slot alone would take: table_bytes and the RSS growth of a fresh
    process agree, and no step (open, stats, fsync, close, reopen) builds a temporary the
    table's size (the peak RSS). The reopen reads a 2 GiB sidecar, which one read cannot."""
    r = _in_fresh_process("_large_disk_memory", backing_path, timeout=300)
    npages = (1 << 40) // PAGE_SIZE
    table, rss = r["open"]
    assert table < 2 * MiB and rss < 64 * MiB, r          # 8 bytes a page would be 2 GiB
    assert r["read_empty"] and r["after_read"] == table, r  # reading unused pages takes none
    table, rss = r["written"]
    assert r["open"][0] < table < 4 * MiB, r               # 12.25 GiB, every page used
    assert rss < table + 64 * MiB, r
    assert r["reopened_same"] and r["reopened"][0] < 4 * MiB, r
    assert r["chunks_left"] == r["live_left"] == 0 and r["discarded_reads_zero"], r
    assert r["peak"] < 64 * MiB, r                         # one bool a page is 256 MiB
    assert npages * TABLE_BYTES_PER_PAGE > 12 << 30


def test_writes_spread_over_a_disk_commit_table_memory_near_them(backing_path):
    """One page every 128 MiB of a 64 GiB disk (where ext4 puts its metadata) commits table
    memory by small pages around those pages: with huge pages it was nearly the whole table."""
    size = 64 << 30
    page = text_page(random.Random(15))
    store = Store.open(backing_path, size, make_config(sparse=True))
    try:
        for off in range(0, size, 128 * MiB):
            store.write(off, page)
        store.fsync()
        full = size // PAGE_SIZE * TABLE_BYTES_PER_PAGE
        assert store.stats()["table_bytes"] < full // 8, (store.stats()["table_bytes"], full)
        assert store.read(size - 128 * MiB, PAGE_SIZE) == page
    finally:
        store.close()


def test_disk_too_large_for_memory_refused(backing_path):
    """A size whose tables, every page used, would not fit in memory is refused before any file
    is made; the per-page cost named in the message is what the tables really take."""
    with pytest.raises(ConfigError, match=r"1\.0 TiB needs up to 13\.2 GiB .*53 bytes a page"
                                          r".*this machine's 8\.0 GiB"):
        Store.open(backing_path, 1 << 40, make_config(sparse=True), memory_total=8 << 30)
    assert not os.path.exists(backing_path)
    with open(backing_path, "wb") as f:                # an existing file: its size is checked
        f.truncate(1 << 40)
    with pytest.raises(ConfigError, match="53 bytes a page"):
        Store.open(backing_path, None, make_config(sparse=True), memory_total=8 << 30)
    assert not os.path.exists(backing_path + ".zbmeta")
    os.unlink(backing_path)
    store = Store.open(backing_path, 64 * MiB, make_config(), memory_total=64 * MiB * TABLE_BYTES_PER_PAGE // 4096)
    try:
        t = npt(store.cache.table)
        arrays = [*t.arrays, *store.backing.arrays, *store.staging.arrays]
        slots = len(t.objs.chunks) * OBJ_CHUNK * 8                      # every chunk made
        assert (sum(a.nbytes for a in arrays) + slots) // store.npages == TABLE_BYTES_PER_PAGE
    finally:
        store.close()


def test_discard_of_unused_pages_leaves_their_entries_alone(backing_path):
    """A discard of a whole 64 GiB disk (as mkfs does) changes the entries of the pages that
    held something and gives no table memory to the others."""
    from zblock.pagemem import resident_bytes
    size = 64 << 30
    data = b"".join(text_page(random.Random(14)) for _ in range(8))
    store = Store.open(backing_path, size, make_config(sparse=True))
    try:
        store.write(0, data)
        store.write(size - len(data), data)
        store.fsync()
        store.discard(0, size)
        zeros = bytes(len(data))
        assert store.read(0, len(data)) == store.read(size - len(data), len(data)) == zeros
        assert store.stats()["discarded_pages"] == size // PAGE_SIZE
        check_consistency(store)
        # 27 bytes a page (432 MiB) if every entry had been written: a few pages at each end
        assert resident_bytes(store.cache.table.arrays) < 2 * MiB
    finally:
        store.close()


def test_object_slots_runs_across_chunks():
    """set_run writes a run over a chunk boundary as get() and range() read it back, clears it
    with None, and makes no chunk for a run of Nones only (same-filled pages hold no object)."""
    slots = ObjectSlots(3 * OBJ_CHUNK)
    first = OBJ_CHUNK - 2
    run = [b"a", None, b"b", b"c"]
    slots.set_run(first, run, len(run))
    assert [slots.get(first + i) for i in range(len(run))] == run
    assert slots.range(first - 1, first + len(run) + 1) == [None] + run + [None]
    slots.set_run(2 * OBJ_CHUNK, [None, None], 2)
    assert [c is not None for c in slots.chunks] == [True, True, False]
    slots.set_run(first, None, len(run))
    assert slots.range(first, first + len(run)) == [None] * len(run)
    slots.drop(0)
    assert slots.chunks[0] is None and slots.get(first) is None
    with pytest.raises(ValueError):
        slots.set_run(first, run[:2], len(run))


def test_discard_gives_back_the_chunks_it_empties(backing_path):
    """objs chunks and live marks go when a discard leaves their chunk without entries: whole
    chunks at once, a chunk discarded in part once nothing in it is left."""
    chunk = OBJ_CHUNK * PAGE_SIZE
    page = text_page(random.Random(16))
    store = Store.open(backing_path, 4 * chunk, make_config())
    t = npt(store.cache.table)
    try:
        for off in (0, 2 * PAGE_SIZE, chunk + 5 * PAGE_SIZE, 3 * chunk):
            store.write(off, page)
        store.write(2 * chunk, bytes(PAGE_SIZE))            # same-filled: live, no objs chunk
        store.fsync()
        assert t.live.tolist() == [True] * 4
        assert [c is not None for c in t.objs.chunks] == [True, True, False, True]
        store.discard(0, 2 * chunk)                         # two whole chunks
        store.discard(2 * chunk, PAGE_SIZE)                 # the only entry of chunk 2
        store.discard(3 * chunk + PAGE_SIZE, PAGE_SIZE)     # next to chunk 3's entry: it stays
        assert t.live.tolist() == [False, False, False, True]
        assert [c is not None for c in t.objs.chunks] == [False, False, False, True]
        assert store.read(3 * chunk, PAGE_SIZE) == page
        check_consistency(store)
        store.write(0, page)                                # a chunk comes back when used again
        assert store.read(0, 2 * PAGE_SIZE) == page + bytes(PAGE_SIZE) and t.live[0]
        check_consistency(store)
    finally:
        store.close()


def test_trimmer_trims_once_when_the_cache_goes_idle():
    """Default mode (`idle`): a pause after activity gets one trim (the freed reply buffers of a
    read burst go back), at once or after min_interval; no trim while activity goes on, none
    again while it stays quiet, none with `idle` off."""
    from zblock.pool import Trimmer
    now = [0.0]
    trims = []
    t = Trimmer(min_interval=0.2, idle=1.0, release=lambda: trims.append(now[0]),
                clock=lambda: now[0])
    off = Trimmer(min_interval=0.2, release=lambda: trims.append(-1.0), clock=lambda: now[0])
    for step in range(10):                      # reads: activity moves on every pass
        now[0] += 0.5
        t.trim(activity=step)
        off.trim(activity=step)
    assert trims == []
    now[0] += 0.5
    t.trim(activity=9)                          # unchanged, noticed 0.5 s ago
    assert trims == []
    now[0] += 0.5
    t.trim(activity=9)                          # quiet for 1 s
    off.trim(activity=9)
    assert trims == [6.0]
    for _ in range(5):                          # still quiet: nothing more to give back
        now[0] += 1.0
        t.trim(activity=9)
    assert trims == [6.0]
    now[0] += 1.0
    t.trim(activity=10)                         # one more read, then a pause
    now[0] += 1.0
    t.trim(activity=10)
    assert trims == [6.0, 13.0]


def _pool_and_rss(backing_path: str) -> dict:
    """Write 64 MiB, then overwrite and discard it all; the pool's and the process's view of
    the memory at each step. Runs in a fresh process (test below)."""
    rng = random.Random(11)
    cfg = make_config(pool_limit=1 << 30, same_filled_pages_enabled=False)
    npages = 16384                                     # 64 MiB of data
    store = Store.open(backing_path, npages * PAGE_SIZE, cfg)
    proc = psutil.Process()
    try:
        chunk = b"".join(text_page(rng) for _ in range(256))
        store.write(0, chunk)                          # warm up contexts, arenas, arrays
        store.discard(0, len(chunk))
        store.cache.trimmer.trim(force=True)
        rss0 = proc.memory_info().rss
        base = store.stats()["pool_total_size"]
        for i in range(0, npages, 256):
            store.write(i * PAGE_SIZE, chunk if i % 512 else os.urandom(len(chunk)))
        grown = proc.memory_info().rss - rss0
        pool = store.stats()["pool_total_size"] - base
        # overwrite with much more compressible data, then discard everything: memory comes back
        small = b"".join((b"x%d" % rng.randrange(10)) * 2000 for _ in range(256))
        for i in range(0, npages, 256):
            store.write(i * PAGE_SIZE, small[:256 * PAGE_SIZE])
        store.discard(0, npages * PAGE_SIZE)
        store.cache.trimmer.trim(force=True)
        left = store.stats()["pool_total_size"]
        returned = rss0 + grown - proc.memory_info().rss
        return {"grown": grown, "pool": pool, "left": left, "returned": returned}
    finally:
        store.close()


def test_pool_size_matches_process_memory(backing_path):
    """pool_total_size is what the process really holds: RSS growth within 10% of it, and 80%
    of it given back after a discard of everything. Measured in a fresh process: in the test
    process, heap that earlier tests freed and left fragmented is reused without RSS growth
    (a full run once saw RSS grow 10.2% less than the pool)."""
    r = _in_fresh_process("_pool_and_rss", backing_path, timeout=120)
    assert r["pool"] > 16 * MiB
    assert abs(r["grown"] - r["pool"]) <= 0.10 * r["pool"], r
    assert r["left"] == 0
    assert r["returned"] >= 0.8 * r["grown"], r


def _thread_buffers_and_trim(backing_path: str) -> dict:
    """After tune_malloc, a thread other than the main one allocates and frees 32 MiB of 1 MiB
    buffers (as libfuse's workers and the write-behind worker do); the RSS held then and after
    a forced trim. (backing_path is unused: the probe runner passes one.)"""
    import threading

    import psutil

    from zblock.pool import Trimmer, tune_malloc
    tune_malloc()
    proc = psutil.Process()
    base = proc.memory_info().rss

    def work():
        bufs = [os.urandom(MiB) for _ in range(32)]
        del bufs

    t = threading.Thread(target=work)
    t.start()
    t.join()
    held = proc.memory_info().rss - base
    Trimmer().trim(force=True)
    return {"held": held, "after_trim": proc.memory_info().rss - base}


def test_a_threads_freed_buffers_are_trimmed():
    """The trim gives back what other threads freed: with an arena per CPU the buffers went to
    a second arena, whose free top malloc_trim does not give back (all 32 MiB stayed)."""
    r = _in_fresh_process("_thread_buffers_and_trim", "", timeout=60)
    assert r["held"] > 16 * MiB, r                  # freed, and still resident before the trim
    assert r["after_trim"] < 4 * MiB, r


# ---------------------------------------------------------------------------------------------
# checksums


def test_corruption_detected_after_reopen(backing_path):
    rng = random.Random(12)
    store = Store.open(backing_path, 1 * MiB, make_config())
    data = b"".join(text_page(rng) for _ in range(4))
    store.write(0, data)
    store.close()
    with open(backing_path, "r+b") as f:
        f.seek(PAGE_SIZE + 100)
        f.write(b"corrupt!")
    store = Store.open(backing_path, None, make_config())
    try:
        assert store.read(0, PAGE_SIZE) == data[:PAGE_SIZE]
        with pytest.raises(DataError):
            store.read(PAGE_SIZE, PAGE_SIZE)
        assert store.stats()["checksum_errors"] == 1
        assert store.read(2 * PAGE_SIZE, 2 * PAGE_SIZE) == data[2 * PAGE_SIZE:]
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# concurrency


@pytest.mark.timeout(60)
@pytest.mark.parametrize("npages", [8, 64])     # the few-pages path and the general one
def test_corrupt_object_in_a_read_names_its_page(backing_path, npages):
    """A read that decompresses many pages in one call still names the page that failed,
    counts it, and gives back its hold on the pool."""
    rng = random.Random(5)
    store = Store.open(backing_path, 1 * MiB, make_config())
    try:
        data = b"".join(text_page(rng) for _ in range(npages))
        store.write(0, data)
        if store.staging:
            store.staging.drain()
        c = store.cache
        bad = npages - 3
        assert npt(c.table).state[bad] == COMP
        good = npt(c.table).obj(bad)
        npt(c.table).objs.set(bad, b"\xff" * 40)
        with pytest.raises(DataError, match=f"page {bad}:"):
            store.read(0, npages * PAGE_SIZE)
        assert store.stats()["decompress_fail"] == 1
        assert c.registry.current.users == 0
        assert store.read(0, bad * PAGE_SIZE) == data[:bad * PAGE_SIZE]
        npt(c.table).objs.set(bad, good)                  # so that close() can write it back
        assert store.read(0, npages * PAGE_SIZE) == data
    finally:
        store.close()


@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup"])
def test_many_threads_overlapping_pages(backing_path, dedup):
    """Whole-page writers on a shared range, partial writers on disjoint bytes of shared pages,
    readers, fsync and writeback all at once: no torn page, no lost partial write, no deadlock.
    The partial writers' pages end up equal: with dedup they share objects meanwhile."""
    npages = 64
    cfg = make_config(pool_limit=PAGE_SIZE, shrinker_enabled=False, dedup=dedup)
    store = Store.open(backing_path, 2 * npages * PAGE_SIZE, cfg)
    errors: list = []
    stop = time.monotonic() + 4

    def page_of(writer, seq):
        head = f"{writer}:{seq}:".encode()
        return (head * (PAGE_SIZE // len(head) + 1))[:PAGE_SIZE]

    def whole_writer(w):
        rng = random.Random(w)
        seq = 0
        while time.monotonic() < stop:
            p = rng.randrange(npages)
            store.write(p * PAGE_SIZE, page_of(w, seq))
            seq += 1

    def partial_writer(w):
        # writer w owns bytes [w*512, w*512+512) of every page in the upper half
        seq = 0
        while time.monotonic() < stop:
            for p in range(npages, 2 * npages, 7):
                store.write(p * PAGE_SIZE + w * 512, bytes([w + 1]) * 512)
            seq += 1

    def reader():
        rng = random.Random(99)
        while time.monotonic() < stop:
            p = rng.randrange(npages)
            page = store.read(p * PAGE_SIZE, PAGE_SIZE)
            if page != bytes(PAGE_SIZE):
                head = page.split(b":")
                w, seq = int(head[0]), int(head[1])
                if page != page_of(w, seq):
                    errors.append(f"torn page {p}")
            if rng.random() < 0.05:
                store.fsync()

    threads = [threading.Thread(target=whole_writer, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=partial_writer, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]

    def run(t):
        try:
            t._target(*t._args)
        except BaseException as e:
            errors.append(e)
    runners = [threading.Thread(target=run, args=(t,), daemon=True) for t in threads]
    try:
        for t in runners:
            t.start()
        for t in runners:
            t.join(timeout=30)
            assert not t.is_alive(), "deadlock"
        assert not errors, errors[:3]
        for p in range(npages, 2 * npages, 7):
            page = store.read(p * PAGE_SIZE, PAGE_SIZE)
            assert page[:2048] == b"".join(bytes([w + 1]) * 512 for w in range(4))
        assert store.stats()["written_back_pages"] > 0
        check_consistency(store)
    finally:
        store.close()


class BarrierBacking:
    """Wraps a Backing: every write_pages waits at a 2-party barrier, so two writes must be in
    flight at once or the barrier times out."""

    def __init__(self, inner):
        self.inner = inner
        self.barrier = threading.Barrier(2, timeout=10)
        self.armed = True

    def write_pages(self, idxs, pages):
        if self.armed:
            self.barrier.wait()
        return self.inner.write_pages(idxs, pages)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.timeout(30)
def test_backing_writes_overlap(backing_path):
    """Two stores that go to disk (incompressible, policy reject) write the disk at the same
    time: the cache holds no lock across disk I/O except the pages' own (their lock stripes:
    the two pages are in different ones). (Without the write-behind queue, whose single worker
    would order them.)"""
    from zblock.backing import Backing
    from zblock.cache import STRIPE_PAGES
    pages = (1, 1 + STRIPE_PAGES)
    backing = BarrierBacking(Backing.open(backing_path, 1 * MiB))
    store = Store(backing, make_config(incompressible_policy="reject"), write_behind=0)
    try:
        results = []

        def writer(p):
            try:
                store.write(p * PAGE_SIZE, os.urandom(PAGE_SIZE))
                results.append(p)
            except BaseException as e:
                results.append(e)
        ts = [threading.Thread(target=writer, args=(p,)) for p in pages]
        for t in ts:
            t.start()
        for t in ts:
            t.join(15)
        assert sorted(results) == list(pages)
        backing.armed = False
    finally:
        backing.armed = False
        store.close()


def test_shrinker_writes_back_under_memory_pressure(backing_path):
    rng = random.Random(13)
    pressure = threading.Event()
    # no write-through: written_back_pages counts the shrinker's disk writes of dirty pages
    cfg = make_config(pool_limit=1 << 30, shrinker_enabled=True, write_through=False)
    store = Store.open(backing_path, 1 * MiB, cfg, memory_pressure=pressure.is_set)
    try:
        data = b"".join(text_page(rng) for _ in range(64))
        store.write(0, data)
        time.sleep(1.5)                       # two idle shrinker intervals: nothing happens
        assert store.stats()["written_back_pages"] == 0
        pressure.set()
        wait_for(lambda: store.stats()["written_back_pages"] > 0, what="shrinker writeback")
        store.set_param("shrinker_enabled", "N")
        assert store.stats()["pool_limit_hit"] == 0
        assert store.read(0, len(data)) == data
    finally:
        store.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_simulated_engine_with_faults(backing_path, mode):
    """Pages compressed by the simulated engine (with injected faults) read back right; every
    fault fell back to software."""
    rng = random.Random(14)
    cfg = make_config(accelerator="sim", hw_mode=mode, hw_fault_rate=0.2, hw_seed=5,
                      compressor="deflate")
    store = Store.open(backing_path, 4 * MiB, cfg)
    try:
        data = mixed_bytes(rng, 2 * MiB)
        store.write(0, data)
        assert store.read(0, len(data)) == data
        hw = store.stats()["hw"]
        assert hw["submitted"] > 0 and hw["errors"] > 0
        assert hw["fallbacks"] == hw["errors"]
        assert store.stats()["pools"][0]["compressor"] == "deflate@sim"
        store.set_param("accelerator", "none")           # old pool keeps serving its pages
        assert store.read(0, len(data)) == data
        check_consistency(store)
    finally:
        store.close()


def test_pools_differing_only_in_engine_settings_have_distinct_names(backing_path):
    rng = random.Random(15)
    store = Store.open(backing_path, 1 * MiB, make_config(accelerator="sim", compressor="lzo"))
    try:
        a = b"".join(text_page(rng) for _ in range(8))
        store.write(0, a)
        store.set_param("hw_queues", "2")                    # a second lzo@sim pool
        store.write(8 * PAGE_SIZE, a)
        assert [p["compressor"] for p in store.stats()["pools"]] == ["lzo@sim#0", "lzo@sim#1"]
        store.write(0, a)                                    # the first pool's pages: it goes
        assert [p["compressor"] for p in store.stats()["pools"]] == ["lzo@sim"]
        assert store.read(0, 16 * PAGE_SIZE) == a + a
        check_consistency(store)
    finally:
        store.close()


def _hw_counts(hw: dict) -> dict:
    return {k: hw[k] for k in HW_COUNTERS}


def test_hw_counters_keep_growing_across_accelerator_toggles(backing_path):
    """sim -> none -> sim: the first engine is closed with its pool, its counts stay in `hw`."""
    rng = random.Random(16)
    store = Store.open(backing_path, 4 * MiB, make_config(accelerator="sim", compressor="lzo"))
    try:
        data = mixed_bytes(rng, 1 * MiB)
        store.write(0, data)
        first = store.stats()["hw"]
        assert first["submitted"] > 0 and first["completed"] > 0
        store.set_param("accelerator", "none")
        store.write(0, data)                 # rewrites every engine-pool page: pool and engine go
        st = store.stats()
        assert [p["compressor"] for p in st["pools"]] == ["lzo"] and not store.cache.registry._engines
        assert _hw_counts(st["hw"]) == _hw_counts(first)
        store.set_param("accelerator", "sim")
        store.write(MiB, data)
        hw = store.stats()["hw"]
        assert hw["submitted"] > first["submitted"] and hw["completed"] > first["completed"]
        assert all(hw[k] >= first[k] for k in HW_COUNTERS)
        assert hw["latency_us"]["max"] >= first["latency_us"]["max"]
        assert store.read(0, 2 * MiB) == data + data
        check_consistency(store)
    finally:
        store.close()
