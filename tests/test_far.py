"""The far tier on a real Redis Cluster (tests/rediscluster.py: six redis-server processes on
loopback, started and stopped here): the store against a model with pages moving RAM -> far ->
file, failover, a stopped cluster, a full one, an evicting one, corrupt values, two instances.

No mount here (tests/test_far_mount.py has fio and swap on the far tier). Counters are the oracle.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time

import numpy as np
import pytest
import redis

from zblock import PAGE_SIZE
from zblock.config import Config
from zblock.entries import DISK, FAR
from zblock.errors import ConfigError, DataError
from zblock.far import FarTier, instance_id, parse_url, read_auth_file
from zblock.store import Store

import mountutil
import rediscluster
from conftest import require
from test_controls import controls_beside_io
from test_encrypt import MARKER
from test_store import check_consistency, write_key
from tableview import npt

MiB = 1 << 20
pytestmark = pytest.mark.timeout(180)


def _have_redis() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def start_cluster(**kw) -> rediscluster.RedisCluster:
    require(_have_redis(), "redis-server and redis-cli (Debian redis-server, redis-tools)")
    workdir = mountutil.new_workdir("far-")
    return rediscluster.RedisCluster(os.path.join(workdir, "redis-cluster"), **kw).start()


@pytest.fixture(scope="module")
def cluster():
    """One cluster for the tests that leave it as they found it."""
    c = start_cluster()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.dir.parent, ignore_errors=True)


@pytest.fixture
def own_cluster():
    """A cluster of the test's own, for tests that kill or stop nodes."""
    c = start_cluster()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.dir.parent, ignore_errors=True)


def far_config(url: str, **kw) -> Config:
    cfg = Config(pool_limit=256 << 10, far=url, far_limit=1 * MiB, far_dirty_limit=512 << 10,
                 far_timeout=3.0, contexts=2)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def roomy_config(url: str, **kw) -> Config:
    """far_config with room in the far tier: nothing demoted, no dirty far page flushed."""
    return far_config(url, far_limit=64 * MiB, far_dirty_limit=64 * MiB, **kw)


def page_of(rng: random.Random, salt: int) -> bytes:
    """A page that compresses to about 40%: writeback has real objects to move."""
    head = salt.to_bytes(8, "little") + rng.randbytes(1500)
    return (head + bytes(PAGE_SIZE))[:PAGE_SIZE]


def settle(store: Store, until, timeout: float = 20.0) -> dict:
    """Stats once until(stats) holds (the writeback worker moves pages in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        s = store.stats()
        if until(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def reads_back_without_far(path: str, model: bytearray) -> None:
    """A remount of the file with no far tier reads `model` back."""
    plain = Store.open(path, None, Config())
    try:
        assert plain.read(0, len(model)) == bytes(model)
    finally:
        plain.close()


def states(store: Store) -> np.ndarray:
    with store.cache.tree_lock:
        return npt(store.cache.table).state.copy()


# ---------------------------------------------------------------------------------------------
# no cluster needed


def test_url_and_auth_file_are_checked(tmp_path):
    assert parse_url("redis://127.0.0.1:7000,[::1]:7001").nodes == [("127.0.0.1", 7000), ("::1", 7001)]
    assert parse_url("rediss://h:1").tls
    assert parse_url("redis://h:1+g:2").nodes == [("h", 1), ("g", 2)]     # for mount -o
    for bad in ("http://h:1", "redis://h", "redis://h:0", "redis://h:x", "redis://u:pw@h:1"):
        with pytest.raises(ConfigError):
            parse_url(bad)
    with pytest.raises(ConfigError, match="far"):
        Config.from_strings({"far": "redis://nohost"})
    auth = tmp_path / "auth"
    auth.write_text("zblock s3cret\n")
    auth.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        read_auth_file(str(auth))
    auth.chmod(0o600)
    assert read_auth_file(str(auth)) == ("zblock", "s3cret")
    auth.write_text("only-a-password\n")
    assert read_auth_file(str(auth)) == ("default", "only-a-password")


def test_instance_id_names_the_backing_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    assert instance_id(str(a)) == instance_id(str(a))
    assert instance_id(str(a)) != instance_id(str(b))


def test_an_unreachable_cluster_is_refused_at_mount(tmp_path):
    port = rediscluster.free_port_base(1)
    with pytest.raises(Exception, match="far"):
        Store.open(str(tmp_path / "img"), 4 * MiB, far_config(f"redis://127.0.0.1:{port}"))


# ---------------------------------------------------------------------------------------------
# the model


@pytest.mark.parametrize("seed", [1, 2])
def test_store_matches_model_with_pages_moving_ram_far_file(tmp_path, cluster, seed):
    rng = random.Random(seed)
    size = 8 * MiB
    npages = size // PAGE_SIZE
    path = str(tmp_path / "img")
    model = bytearray(size)
    seen = set()
    moved = dict.fromkeys(("far_writes", "far_reads", "far_demoted_pages"), 0)
    store = Store.open(path, size, far_config(cluster.url))
    try:
        for step in range(1500):
            op = rng.random()
            if op < 0.6:
                first = rng.randrange(npages)
                n = min(rng.choice((1, 1, 2, 8, 32)), npages - first)
                data = b"".join(page_of(rng, first + i) for i in range(n))
                store.write(first * PAGE_SIZE, data)
                model[first * PAGE_SIZE:(first + n) * PAGE_SIZE] = data
            elif op < 0.85:
                off = rng.randrange(size - 1)
                length = min(rng.randrange(1, 5 * PAGE_SIZE), size - off)
                assert store.read(off, length) == bytes(model[off:off + length]), step
            elif op < 0.92:
                first = rng.randrange(npages)
                n = min(rng.randrange(1, 16), npages - first)
                store.discard(first * PAGE_SIZE, n * PAGE_SIZE)
                model[first * PAGE_SIZE:(first + n) * PAGE_SIZE] = bytes(n * PAGE_SIZE)
            elif op < 0.995:            # a reopen empties the pool and the far tier: rarely
                store.fsync()
            else:
                moved = {k: v + store.stats()[k] for k, v in moved.items()}
                store.close()
                store = Store.open(path, None, far_config(cluster.url))
            st = states(store)
            seen |= {s for s in (FAR, DISK) if (st == s).any()}
        store.fsync()
        s = settle(store, lambda s: s["far_stored_pages"] > 0)
        assert store.read(0, size) == bytes(model)
        moved = {k: v + s[k] for k, v in moved.items()}
        assert moved["far_writes"] > 0 and moved["far_reads"] > 0
        assert moved["far_demoted_pages"] > 0, "no page went on from the far tier to the file"
        assert s["far_errors"] == 0 and s["checksum_errors"] == 0
        assert seen == {FAR, DISK}
        check_consistency(store)
    finally:
        store.close()
    assert cluster.dbsize() == 0, "the store's keys outlived its close"
    with open(path, "rb") as f:
        assert f.read() == bytes(model)
    reads_back_without_far(path, model)


def test_far_limit_and_dirty_limit_hold(tmp_path, cluster):
    """Past far_limit the coldest far pages go to the file; past far_dirty_limit the file gets
    the dirty ones (they stay far, clean)."""
    rng = random.Random(3)
    store = Store.open(str(tmp_path / "img"), 16 * MiB, far_config(cluster.url))
    try:
        data = b"".join(page_of(rng, i) for i in range(2048))
        store.write(0, data)
        cfg = store.config
        s = settle(store, lambda s: s["far_bytes"] <= cfg.far_limit and s["far_writes"] > 1000
                   and s["far_demoted_pages"] > 0 and s["far_dirty_pages"] * 1600 <= cfg.far_dirty_limit)
        assert 0 < s["far_bytes"] <= cfg.far_limit
        assert s["far_demoted_pages"] > 0
        with store.cache.tree_lock:
            t = npt(store.cache.table)
            far_dirty = int(t.length[(t.state == FAR) & t.dirty].astype(np.int64).sum())
            far_clean = int(np.count_nonzero((t.state == FAR) & ~t.dirty))
        assert far_dirty <= cfg.far_dirty_limit
        assert far_clean > 0, "the dirty-limit flusher left no clean far copy"
        assert store.read(0, len(data)) == data
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# values that are not what they should be


def test_a_corrupt_far_value_reads_eio_and_counts(tmp_path, cluster):
    rng = random.Random(4)
    store = Store.open(str(tmp_path / "img"), 16 * MiB, roomy_config(cluster.url))
    try:
        data = b"".join(page_of(rng, i) for i in range(1024))
        store.write(0, data)
        settle(store, lambda s: s["far_stored_pages"] > 100)
        with store.cache.tree_lock:
            t = npt(store.cache.table)
            page = int(np.flatnonzero(t.state == FAR)[0])
            key = store.cache.far_pages.far.key(page, int(t.fill[page]))
        node = store.cache.far_pages.far._rc.get_node_from_key(key)
        client = redis.Redis(host=node.host, port=node.port)
        value = bytearray(client.get(key))
        value[-1] ^= 1                      # one bit of the payload
        client.set(key, bytes(value))
        client.close()
        with pytest.raises(DataError, match="header check"):
            store.read(page * PAGE_SIZE, PAGE_SIZE)
        assert store.stats()["checksum_errors"] == 1
        # the other pages are untouched
        assert store.read((page + 1) * PAGE_SIZE, PAGE_SIZE) == data[(page + 1) * PAGE_SIZE:(page + 2) * PAGE_SIZE]
        store.write(page * PAGE_SIZE, data[page * PAGE_SIZE:(page + 1) * PAGE_SIZE])
        assert store.read(0, len(data)) == data
    finally:
        store.close()


def test_an_evicting_cluster_is_refused_and_a_full_one_sends_pages_to_disk(tmp_path, cluster):
    masters = cluster.masters()
    cluster.cli(masters[0], "CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(ConfigError, match="noeviction"):
            Store.open(str(tmp_path / "a"), 4 * MiB, far_config(cluster.url))
    finally:
        cluster.cli(masters[0], "CONFIG", "SET", "maxmemory-policy", "noeviction")
    # full: maxmemory just above what each master uses now
    for port in masters:
        used = int(cluster.cli(port, "INFO", "memory").split("used_memory:")[1].split()[0])
        cluster.cli(port, "CONFIG", "SET", "maxmemory", str(used + 256 * 1024))
    rng = random.Random(5)
    try:
        store = Store.open(str(tmp_path / "b"), 16 * MiB,
                           roomy_config(cluster.url))
        try:
            data = b"".join(page_of(rng, i) for i in range(2048))
            store.write(0, data)
            s = settle(store, lambda s: s["written_back_pages"] > 500)
            assert s["written_back_pages"] > 500, "a full cluster stopped writeback"
            assert s["far_bytes"] < 3 * MiB
            assert store.read(0, len(data)) == data
            store.fsync()
            assert store.read(0, len(data)) == data
        finally:
            store.close()
    finally:
        for port in masters:
            cluster.cli(port, "CONFIG", "SET", "maxmemory", "0")


def test_far_pages_read_often_come_back_into_the_pool(tmp_path, cluster):
    """promote_after=1: a far page's second read brings it back into the pool, clean or dirty as
    it was, and its far copy goes; a page read once stays far."""
    rng = random.Random(12)
    path = str(tmp_path / "img")
    store = Store.open(path, 8 * MiB, roomy_config(cluster.url, promote_after=1))
    data = b"".join(page_of(rng, i) for i in range(1024))
    try:
        store.write(0, data[:len(data) // 2])
        store.fsync()                           # the first half: clean wherever it goes
        store.write(len(data) // 2, data[len(data) // 2:])
        settle(store, lambda s: s["far_stored_pages"] > 600)
        store.set_param("pool_limit", "64M")    # room to promote (below the accept threshold)
        with store.cache.tree_lock:
            t = npt(store.cache.table)
            far = np.flatnonzero(t.state == FAR)
            dirty = t.dirty[far].copy()
        picked = np.concatenate([far[~dirty][:20], far[dirty][:20]])
        assert len(picked) == 40, "want far pages both clean and dirty"
        before = store.stats()
        for p in picked.tolist():
            assert store.read(p * PAGE_SIZE, PAGE_SIZE) == data[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
        assert (states(store)[picked] == FAR).all(), "one read is not more than promote_after"
        for p in picked.tolist():
            assert store.read(p * PAGE_SIZE, PAGE_SIZE) == data[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
        s = store.stats()
        assert s["promoted_pages"] - before["promoted_pages"] == 40
        assert before["far_stored_pages"] - s["far_stored_pages"] == 40
        with store.cache.tree_lock:
            t = npt(store.cache.table)
            assert not np.isin(t.state[picked], (FAR, DISK)).any()
            assert (t.dirty[picked] == np.concatenate([np.zeros(20, bool), np.ones(20, bool)])).all()
        check_consistency(store)
        assert store.read(0, len(data)) == data
    finally:
        store.close()
    assert cluster.dbsize() == 0
    reads_back_without_far(path, bytearray(data))


def test_a_promotion_never_undoes_a_write_going_to_disk(tmp_path, cluster):
    """A dirty far page read often is promoted while a newer write of it is on its way to disk
    (8 KiB, stored at once; incompressible, so rejected by the pool): the write wins."""
    rng = random.Random(13)
    path = str(tmp_path / "img")
    store = Store.open(path, 8 * MiB, roomy_config(cluster.url, promote_after=1,
                                                 incompressible_policy="reject"))
    data = b"".join(page_of(rng, i) for i in range(1024))
    newer = rng.randbytes(2 * PAGE_SIZE)
    backing = store.cache.backing
    writing, release = threading.Event(), threading.Event()
    plain_write_pages = backing.write_pages

    def write_pages(idxs, buf):
        if page in list(idxs) and bytes(buf[:PAGE_SIZE]) == newer[:PAGE_SIZE]:
            writing.set()
            release.wait(30)
        return plain_write_pages(idxs, buf)

    errors = []

    def run(fn):
        def guarded():
            try:
                fn()
            except BaseException as e:          # the test fails on it below
                errors.append(e)
        t = threading.Thread(target=guarded)
        t.start()
        return t

    try:
        store.write(0, data)
        settle(store, lambda s: s["far_stored_pages"] > 600)
        store.set_param("pool_limit", "64M")    # room to promote (below the accept threshold)
        with store.cache.tree_lock:
            t = npt(store.cache.table)
            page = int(np.flatnonzero((t.state == FAR) & t.dirty)[0])     # page+1 exists too
        old = data[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
        assert store.read(page * PAGE_SIZE, PAGE_SIZE) == old      # its first read
        backing.write_pages = write_pages
        writer = run(lambda: store.write(page * PAGE_SIZE, newer))
        assert writing.wait(30), "the newer write never reached the disk"
        reader = run(lambda: store.read(page * PAGE_SIZE, PAGE_SIZE))
        reader.join(2)          # a promotion that ignores the write in flight is done by now
        release.set()
        writer.join(30)
        reader.join(30)
        assert not errors and not writer.is_alive() and not reader.is_alive(), errors
        assert store.read(page * PAGE_SIZE, 2 * PAGE_SIZE) == newer
        check_consistency(store)
    finally:
        release.set()
        backing.write_pages = plain_write_pages
        store.close()
    assert cluster.dbsize() == 0


def test_a_clean_promotion_keeps_a_dirty_bit_set_while_it_was_under_way(tmp_path, cluster):
    """A failed sync makes unsynced pages dirty again without a new generation: one that lands
    between a clean far page's promotion check and its store keeps the page dirty (else the
    next fsync would skip a page the file never made durable)."""
    rng = random.Random(14)
    path = str(tmp_path / "img")
    store = Store.open(path, 8 * MiB, roomy_config(cluster.url, promote_after=1))
    data = b"".join(page_of(rng, i) for i in range(1024))
    promotion = store.cache.promotion
    plain_promote = promotion.promote

    def promote_after_a_failed_sync(pages):
        with store.cache.tree_lock:         # what Writeback._redirty_unsynced does
            npt(store.cache.table).dirty[[p for p, *_ in pages]] = True
        plain_promote(pages)

    try:
        store.write(0, data)
        store.fsync()
        settle(store, lambda s: s["far_stored_pages"] > 600)
        store.set_param("pool_limit", "64M")    # room to promote (below the accept threshold)
        with store.cache.tree_lock:
            t = npt(store.cache.table)
            page = int(np.flatnonzero((t.state == FAR) & ~t.dirty)[0])
        want = data[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
        assert store.read(page * PAGE_SIZE, PAGE_SIZE) == want
        promotion.promote = promote_after_a_failed_sync
        assert store.read(page * PAGE_SIZE, PAGE_SIZE) == want       # promoted
        with store.cache.tree_lock:
            t = npt(store.cache.table)
            assert t.state[page] not in (FAR, DISK) and t.dirty[page]
        assert store.stats()["promoted_pages"] == 1
    finally:
        promotion.promote = plain_promote
        store.close()
    assert cluster.dbsize() == 0


def test_encrypted_far_values_hold_no_plaintext(tmp_path, cluster):
    """--encrypt seals far values too: none of the cluster's values holds a marker the pages
    carry (their compressed form would), and they read back through their tags."""
    rng = random.Random(11)
    data = b"".join((MARKER + page_of(rng, i))[:PAGE_SIZE] for i in range(1024))
    cfg = roomy_config(cluster.url, encrypt=True, key_file=write_key(str(tmp_path)))
    store = Store.open(str(tmp_path / "img"), 8 * MiB, cfg)
    try:
        store.write(0, data)
        s = settle(store, lambda s: s["far_stored_pages"] > 500)
        assert s["far_stored_pages"] > 500
        values = []
        for port in cluster.masters():
            node = redis.Redis(host=rediscluster.HOST, port=port)
            try:
                values += [node.get(k) for k in node.scan_iter(count=1000)]
            finally:
                node.close()
        assert len(values) >= s["far_stored_pages"]
        assert not any(MARKER in v for v in values if v is not None)
        assert store.read(0, len(data)) == data
        s = store.stats()
        assert s["far_reads"] > 0 and s["far_checksum_errors"] == 0
        check_consistency(store)
    finally:
        store.close()
    assert cluster.dbsize() == 0


# ---------------------------------------------------------------------------------------------
# sharing, swap mode, leftovers


def test_two_instances_share_a_cluster_and_swap_mode_leaves_no_keys(tmp_path, cluster):
    rng = random.Random(6)
    a = Store.open(str(tmp_path / "a"), 8 * MiB, far_config(cluster.url, swap=True))
    b = Store.open(str(tmp_path / "b"), 8 * MiB, far_config(cluster.url, swap=True))
    try:
        assert a.cache.far_pages.far.instance != b.cache.far_pages.far.instance
        da = b"".join(page_of(rng, i) for i in range(1024))
        db = b"".join(page_of(rng, i + 5000) for i in range(1024))
        a.write(0, da)
        b.write(0, db)
        settle(a, lambda s: s["far_stored_pages"] > 100)
        settle(b, lambda s: s["far_stored_pages"] > 100)
        assert a.read(0, len(da)) == da and b.read(0, len(db)) == db
        assert cluster.dbsize() > 0
    finally:
        a.close()
        b.close()
    assert cluster.dbsize() == 0


def test_keys_an_earlier_mount_left_are_deleted_at_mount(tmp_path, cluster):
    path = str(tmp_path / "img")
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    stale = FarTier.connect(cluster.url, instance_id(path), timeout=3)
    keys = [stale.key(p, p) for p in range(50)]
    assert all(stale.put(keys, [stale.encode(p, p, "raw", bytes(PAGE_SIZE)) for p in range(50)]))
    stale.close()       # a crashed mount: nothing purged
    assert cluster.dbsize() == 50
    store = Store.open(path, None, far_config(cluster.url))
    try:
        assert cluster.dbsize() == 0
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# faults


def test_a_master_killed_mid_run_fails_over_and_loses_nothing(tmp_path, own_cluster):
    rng = random.Random(7)
    size = 16 * MiB
    model = bytearray(size)
    store = Store.open(str(tmp_path / "img"), size,
                       roomy_config(own_cluster.url, far_timeout=10.0))
    try:
        data = b"".join(page_of(rng, i) for i in range(2048))
        store.write(0, data)
        model[:len(data)] = data
        settle(store, lambda s: s["far_stored_pages"] > 1000)
        own_cluster.kill_node(own_cluster.masters()[0])
        for _ in range(400):
            first = rng.randrange(size // PAGE_SIZE - 8)
            piece = b"".join(page_of(rng, first + i) for i in range(8))
            store.write(first * PAGE_SIZE, piece)
            model[first * PAGE_SIZE:(first + 8) * PAGE_SIZE] = piece
            off = rng.randrange(len(data) // PAGE_SIZE) * PAGE_SIZE
            assert store.read(off, PAGE_SIZE) == bytes(model[off:off + PAGE_SIZE])
        assert store.read(0, size) == bytes(model)
        s = store.stats()
        assert s["far_errors"] == 0 and s["checksum_errors"] == 0
        assert s["far_reads"] > 0
    finally:
        store.close()


def test_a_stopped_cluster_sends_writes_to_disk_and_clean_pages_to_the_file(tmp_path, own_cluster):
    """The whole cluster stops: writes go on to disk, far pages the file holds read from it,
    a far page only the cluster held is EIO (far_errors) once the deadline passes; after fsync
    everything else is on the file, and a remount without the far tier reads it back."""
    rng = random.Random(8)
    size = 16 * MiB
    path = str(tmp_path / "img")
    model = bytearray(size)
    store = Store.open(path, size, roomy_config(own_cluster.url, far_timeout=1.0))
    try:
        data = b"".join(page_of(rng, i) for i in range(2048))
        store.write(0, data)
        model[:len(data)] = data
        store.fsync()
        settle(store, lambda s: s["far_stored_pages"] > 1000)
        own_cluster.stop()
        later = b"".join(page_of(rng, i + 9000) for i in range(1024))
        store.write(len(data), later)
        model[len(data):len(data) + len(later)] = later
        s = settle(store, lambda s: s["written_back_pages"] > 0)
        assert s["written_back_pages"] > 0
        # far copies of pages the file holds: read from the file
        with store.cache.tree_lock:
            t = npt(store.cache.table)
            clean_far = np.flatnonzero((t.state == FAR) & ~t.dirty)
        assert len(clean_far)
        p = int(clean_far[0])
        assert store.read(p * PAGE_SIZE, PAGE_SIZE) == bytes(model[p * PAGE_SIZE:(p + 1) * PAGE_SIZE])
        store.fsync()
        assert store.read(0, size) == bytes(model)
        assert store.stats()["far_errors"] == 0
    finally:
        store.close()           # the keys cannot be deleted: the next mount does it
    reads_back_without_far(path, model)


def dirty_far_pages(store) -> np.ndarray:
    with store.cache.tree_lock:
        t = npt(store.cache.table)
        return np.flatnonzero((t.state == FAR) & t.dirty)


def test_a_dirty_far_page_of_a_stopped_cluster_is_eio_never_wrong_bytes(tmp_path, own_cluster):
    """A page only the cluster held (not yet in the file) cannot be read once the whole cluster
    is gone: EIO after far_timeout, one far_errors each; at close it is marked lost, so after a
    remount it reads EIO too, and every other page reads back."""
    rng = random.Random(9)
    size = 8 * MiB
    path = str(tmp_path / "img")
    store = Store.open(path, size, roomy_config(own_cluster.url, far_timeout=0.5))
    data = b"".join(page_of(rng, i) for i in range(1024))
    try:
        store.write(0, data)
        settle(store, lambda s: s["far_stored_pages"] > 500)
        own_cluster.stop()
        p = int(dirty_far_pages(store)[0])
        with pytest.raises(DataError, match="far tier"):
            store.read(p * PAGE_SIZE, PAGE_SIZE)
        assert store.stats()["far_errors"] == 1
        with pytest.raises(DataError):
            store.fsync()
        # taken only now: a put in flight when the cluster stopped may have made more pages far
        lost = set(dirty_far_pages(store).tolist())
        assert p in lost and len(lost) > 500
    finally:
        with pytest.raises(DataError):
            store.close()
    plain = Store.open(path, None, Config())
    try:
        for q in range(1024):
            if q in lost:
                with pytest.raises(DataError):
                    plain.read(q * PAGE_SIZE, PAGE_SIZE)
            else:
                assert plain.read(q * PAGE_SIZE, PAGE_SIZE) == data[q * PAGE_SIZE:(q + 1) * PAGE_SIZE]
    finally:
        plain.close()


def test_a_cluster_that_comes_back_is_used_again_without_a_remount(tmp_path, own_cluster):
    rng = random.Random(10)
    size = 16 * MiB
    model = bytearray(size)
    store = Store.open(str(tmp_path / "img"), size,
                       roomy_config(own_cluster.url, far_timeout=1.0))
    try:
        first = b"".join(page_of(rng, i) for i in range(1024))
        store.write(0, first)
        model[:len(first)] = first
        store.fsync()                   # what the cluster holds, the file holds too
        settle(store, lambda s: s["far_stored_pages"] > 500)
        ports = list(own_cluster.pids)
        for port in ports:              # the whole cluster goes down, its config kept
            own_cluster.kill_node(port)
        second = b"".join(page_of(rng, i + 5000) for i in range(1024))
        store.write(len(first), second)
        model[len(first):len(first) + len(second)] = second
        s = settle(store, lambda s: s["written_back_pages"] > 0)
        assert s["written_back_pages"] > 0
        writes = s["far_writes"]
        for port in ports:
            own_cluster.start_node(port)
        own_cluster.wait_ok()
        third = b"".join(page_of(rng, i + 9000) for i in range(1024))
        store.write(2 * len(first), third)
        model[2 * len(first):2 * len(first) + len(third)] = third
        s = settle(store, lambda s: s["far_writes"] > writes + 100, timeout=30)
        assert s["far_writes"] > writes + 100, "the far tier was not used again"
        assert store.read(0, size) == bytes(model)
        assert store.stats()["far_errors"] == 0
    finally:
        store.close()
    assert own_cluster.dbsize() == 0


def test_controls_beside_io_on_the_far_tier(tmp_path, cluster):
    """The zram-style controls, writers, readers and fsync at once, with pages going far: every
    byte reads back, the gauges agree (far ones too), no key outlives the close."""
    s = controls_beside_io(str(tmp_path / "img"),
                           far_config(cluster.url, pool_limit=512 << 10, far_limit=2 * MiB,
                                      far_dirty_limit=1 * MiB))
    assert s["far_writes"] > 0 and s["far_errors"] == 0 and s["checksum_errors"] == 0, s
    assert cluster.dbsize() == 0


def test_a_tls_cluster_with_client_certificates(tmp_path):
    """rediss:// to a cluster whose every link is TLS and that asks clients for a certificate
    (tls-auth-clients yes): pages go far and come back; without the CA the mount is refused."""
    require(shutil.which("openssl") is not None, "openssl is not installed")
    require(_have_redis(), "redis-server and redis-cli (Debian redis-server, redis-tools)")
    workdir = mountutil.new_workdir("far-tls-")
    try:
        certs = rediscluster.make_certificates(os.path.join(workdir, "certs"))
        cluster = rediscluster.RedisCluster(os.path.join(workdir, "redis-cluster"), tls=certs)
        cluster.start()
        try:
            assert cluster.url.startswith("rediss://")
            tls = dict(far_tls_ca=certs["ca"], far_tls_cert=certs["client_cert"],
                       far_tls_key=certs["client_key"])
            with pytest.raises(Exception, match="(?i)certificate|ssl"):
                Store.open(str(tmp_path / "a"), 4 * MiB,
                           far_config(cluster.url, far_tls_cert=certs["client_cert"],
                                      far_tls_key=certs["client_key"]))
            rng = random.Random(11)
            store = Store.open(str(tmp_path / "b"), 8 * MiB, far_config(cluster.url, **tls))
            try:
                data = b"".join(page_of(rng, i) for i in range(1024))
                store.write(0, data)
                s = settle(store, lambda s: s["far_stored_pages"] > 100)
                assert s["far_stored_pages"] > 100
                assert store.read(0, len(data)) == data
                assert store.stats()["far_reads"] > 0
            finally:
                store.close()
            assert cluster.dbsize() == 0
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
