"""Faults: scripted disk errors, engine failures and corruption behind zblock's back.

Disk faults (like nbdkit's error filter): faultdisk.FaultyDisk under a real Backing raises EIO
or ENOSPC on chosen reads, writes, fsyncs and punches of the data file or the sidecar. The rules:
a write that cannot be made durable fails the writer's fsync and the page stays cached and dirty;
a read that cannot be served fails with EIO and never returns wrong bytes; other pages keep being
served; the counters show each fault. Once the fault clears, a retried fsync succeeds and a new
Store reads everything exactly.

Engine faults: the simulated engine failing every request ("error"), accepting and never
completing ("hang", the caller's deadline expires), or disappearing ("dead"), on compress and on
decompress: every page falls back to software, all data reads back, hw counters move.

Integrity: a backing page changed behind zblock's back (bit rot, mtime kept) is EIO plus
`checksum_errors` while open, after reopen, and in `zblock fsck`.

Mount tier: the same disk faults scripted through ZBLOCK_TEST_FAULTS while mounted, and the
integrity check across a remount.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import threading

import pytest

from zblock import PAGE_SIZE
from zblock.backing import fsck
from zblock.config import Config
from faultdisk import Fault, FaultyDisk
from zblock.disk import FileDisk
from zblock.errors import DataError, DiskError, ZblockError
from zblock.store import Store
from mountutil import wait_for

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text_pages(n: int, tag: int = 0) -> bytes:
    """n compressible pages, each naming its index and tag (self-describing)."""
    out = []
    words = [b"alpha", b"beta", b"gamma", b"delta", b"swap", b"page", b"zblock", b"\n"]
    for i in range(n):
        rng = random.Random(i * 7919 + tag)
        page = bytearray(f"page {i} tag {tag} ".encode())
        while len(page) < PAGE_SIZE:               # compresses about 2:1, like text
            page += rng.choice(words) + b" " + str(rng.randrange(1000)).encode() + b" "
        out.append(bytes(page[:PAGE_SIZE]))
    return b"".join(out)


def cfg(**kw) -> Config:
    c = Config()
    c.shrinker_enabled = False
    c.contexts = 2
    for k, v in kw.items():
        setattr(c, k, v)
    return c


class Faults:
    """A disk factory that wraps the data file (and sidecar) in FaultyDisks the test can script."""

    def __init__(self):
        self.disks: dict[str, FaultyDisk] = {}

    def __call__(self, path, role):
        d = FaultyDisk(FileDisk(path, direct=role == "data"))
        self.disks[role] = d
        return d

    @property
    def data(self) -> FaultyDisk:
        return self.disks["data"]

    @property
    def meta(self) -> FaultyDisk:
        return self.disks["meta"]

    def clear(self):
        for d in self.disks.values():
            d.clear()


def assert_eio(fn, *args):
    """fn(*args) fails with an error the FUSE edge answers as EIO (DataError or DiskError)."""
    with pytest.raises(ZblockError) as ei:
        fn(*args)
    assert ei.value.errno == errno.EIO, ei.value


def reopen_and_compare(path: str, expect: bytes) -> None:
    s = Store.open(path, None, cfg())
    try:
        assert s.read(0, len(expect)) == expect
    finally:
        s.close()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "disk.img")


# ---------------------------------------------------------------------------------------------
# disk faults, engine tier


def test_writeback_eio_keeps_pages_cached_and_fails_fsync(path):
    f = Faults()
    s = Store.open(path, 8 * MiB, cfg(pool_limit=64 * 1024), disk_factory=f)
    try:
        f.data.add(Fault("write", errno.EIO, times=None))
        data = text_pages(512)
        s.write(0, data)
        wait_for(lambda: s.stats()["reject_reclaim_fail"] > 0, what="a failed writeback")
        assert s.read(0, len(data)) == data                      # still served, from the cache
        with pytest.raises(DiskError) as ei:
            s.fsync()
        assert ei.value.errno == errno.EIO
        st = s.stats()
        assert st["dirty_pages"] == 512 and st["written_back_pages"] == 0
        assert f.data.faults["write"] > 0
        f.clear()
        s.fsync()                                                # the retry makes it durable
        assert s.stats()["dirty_pages"] == 0
        assert s.read(0, len(data)) == data
    finally:
        f.clear()
        s.close()
    reopen_and_compare(path, data)


@pytest.mark.parametrize("role,op,err", [
    ("data", "write", errno.ENOSPC),
    ("data", "write", errno.EIO),
    ("data", "fsync", errno.EIO),
    ("meta", "write", errno.EIO),
    ("meta", "fsync", errno.EIO),
    ("meta", "write", errno.ENOSPC),
])
def test_fsync_fault_then_retry(path, role, op, err):
    """One failing write or fsync of the data file or the sidecar during fsync (no
    write-through: fsync itself writes the pages)."""
    f = Faults()
    s = Store.open(path, 4 * MiB, cfg(pool_limit=64 * MiB, write_through=False), disk_factory=f)
    try:
        old = text_pages(64, tag=1)
        s.write(0, old)
        s.fsync()
        new = text_pages(64, tag=2)
        s.write(0, new)
        getattr(f, role).add(Fault(op, err, times=1))
        with pytest.raises(DiskError) as ei:
            s.fsync()
        assert ei.value.errno == err
        assert getattr(f, role).faults[op] == 1
        assert s.stats()["io_errors"] == 1
        assert s.stats()["dirty_pages"] > 0, "a failed fsync must leave the pages dirty"
        assert s.read(0, len(new)) == new
        s.fsync()
        assert s.stats()["dirty_pages"] == 0
    finally:
        f.clear()
        s.close()
    reopen_and_compare(path, new)


def test_a_flush_on_two_threads_stops_at_a_failed_write_and_loses_nothing(path):
    """fsync of more than one batch of dirty pages runs on the caller and a helper thread; a
    write that fails (the third of the flush) raises once both have stopped, leaves every page
    dirty (nothing is marked durable that the sync did not cover), and the next fsync writes
    them all. Also with write-through off, so fsync does the writing."""
    f = Faults()
    s = Store.open(path, 8 * MiB, cfg(pool_limit=64 * MiB, write_through=False), disk_factory=f)
    threads = set()
    write_pages = s.backing.write_pages

    def record(idxs, pages):
        threads.add(threading.current_thread().name)
        return write_pages(idxs, pages)

    s.backing.write_pages = record
    try:
        data = text_pages(1536, tag=6)              # 6 batches
        s.write(0, data)
        s.staging.drain()
        f.data.add(Fault("write", errno.EIO, nth=f.data.calls["write"] + 3))
        with pytest.raises(DiskError):
            s.fsync()
        assert "zblock-flush" in threads and len(threads) == 2, threads
        assert s.stats()["dirty_pages"] == 1536
        s.fsync()
        assert s.stats()["dirty_pages"] == 0
        assert s.read(0, len(data)) == data
    finally:
        f.clear()
        s.close()
    reopen_and_compare(path, data)


def test_a_stream_past_the_sequential_cutoff_falls_back_to_the_pool_on_a_failing_disk(path):
    """A bypassed store the disk refuses is cached (raw, over the limit if need be) for fsync to
    write again, and while the disk fails the rest of the stream is stored in the pool: nothing
    is lost, and no stream is held uncompressed in RAM request after request. Stored as they
    come (no write-behind queue), so that no store is under way beside the failing one."""
    f = Faults()
    s = Store.open(path, 4 * MiB, cfg(pool_limit=64 * MiB, sequential_cutoff=64 * 1024,
                                      write_through=False), disk_factory=f, write_behind=0)
    try:
        data = text_pages(256, tag=5)
        f.data.add(Fault("write", errno.EIO, times=1))
        for k in range(8):      # 128 KiB writes, each past the cutoff: the first one fails
            s.write(k * 128 * 1024, data[k * 128 * 1024:(k + 1) * 128 * 1024])
        st = s.stats()
        assert f.data.faults["write"] == 1 and st["io_errors"] == 1, st
        assert st["bypassed_pages"] == 0, st        # the failed one is not counted, nor the rest
        # the failed store's 32 pages held raw, the other 224 compressed in the pool
        assert st["stored_pages"] == 256 and st["stored_incompressible_pages"] == 32, st
        assert st["dirty_pages"] == 256, st
        assert s.read(0, len(data)) == data
        s.fsync()                                   # the disk works again: written now
        assert s.stats()["dirty_pages"] == 0
    finally:
        f.clear()
        s.close()
    reopen_and_compare(path, data)


@pytest.mark.parametrize("role", ["data", "meta"])
def test_failed_write_through_leaves_pages_for_fsync(path, role):
    """A background write-through that fails leaves its pages dirty: the next fsync writes
    them itself and succeeds, and every page reads back exactly after a remount."""
    f = Faults()
    s = Store.open(path, 4 * MiB, cfg(pool_limit=64 * MiB, write_through=True), disk_factory=f)
    try:
        getattr(f, role).add(Fault("write", errno.EIO, times=1))
        data = text_pages(64, tag=3)
        s.write(0, data)
        s.staging.drain()                           # stored, so handed to write-through
        s.cache.write_through.drain()
        st = s.stats()
        assert getattr(f, role).faults["write"] == 1 and st["io_errors"] == 1
        assert st["dirty_pages"] == 64 and st["written_through_pages"] == 0
        s.fsync()
        st = s.stats()
        assert st["dirty_pages"] == 0 and st["flushed_pages"] == 64
        more = text_pages(64, tag=4)                # and write-through works again after
        s.write(len(data), more)
        s.staging.drain()
        s.cache.write_through.drain()
        assert s.stats()["written_through_pages"] == 64
        s.fsync()
        assert s.stats()["flushed_pages"] == 64     # nothing left for fsync to write
    finally:
        f.clear()
        s.close()
    reopen_and_compare(path, data + more)


def test_failed_sync_after_write_through_writes_the_pages_again(path):
    """Pages written through are clean but not durable: when the data file's fsync fails, they
    are dirty again, and the next fsync writes them again before it syncs."""
    f = Faults()
    s = Store.open(path, 4 * MiB, cfg(pool_limit=64 * MiB, write_through=True), disk_factory=f)
    try:
        data = text_pages(64, tag=5)
        s.write(0, data)
        s.staging.drain()
        s.cache.write_through.drain()
        assert s.stats()["written_through_pages"] == 64 and s.stats()["dirty_pages"] == 0
        f.data.add(Fault("fsync", errno.EIO, times=1))
        with pytest.raises(DiskError):
            s.fsync()
        assert s.stats()["dirty_pages"] == 64, "a failed fsync must leave the pages dirty"
        s.fsync()
        st = s.stats()
        assert st["dirty_pages"] == 0 and st["flushed_pages"] == 64    # written again
    finally:
        f.clear()
        s.close()
    reopen_and_compare(path, data)


def test_read_eio_on_one_page(path):
    f = Faults()
    s = Store.open(path, 4 * MiB, cfg(pool_limit=64 * MiB), disk_factory=f)
    try:
        data = text_pages(16)
        s.write(0, data)
        s.fsync()
        assert s.cache.writeback.shrink(0)                   # every page to disk, none cached
        assert s.stats()["stored_pages"] == 0
        f.data.add(Fault("read", errno.EIO, pages={5}, times=None))
        assert_eio(s.read, 5 * PAGE_SIZE, PAGE_SIZE)
        assert_eio(s.read, 3 * PAGE_SIZE, 4 * PAGE_SIZE)     # any read touching it
        with pytest.raises(ZblockError):
            s.write(5 * PAGE_SIZE + 100, b"x" * 10)  # read-modify-write cannot read the page
        # the other pages keep being served
        assert s.read(0, 5 * PAGE_SIZE) == data[:5 * PAGE_SIZE]
        assert s.read(6 * PAGE_SIZE, 10 * PAGE_SIZE) == data[6 * PAGE_SIZE:]
        assert f.data.faults["read"] >= 3
        assert s.stats()["io_errors"] == f.data.faults["read"]
        f.clear()
        assert s.read(0, len(data)) == data         # nothing was lost or half-written
    finally:
        f.clear()
        s.close()
    reopen_and_compare(path, data)


def test_torn_writeback(path):
    """A multi-page disk write of fsync's that lands only partly (pages before page 40
    written)."""
    f = Faults()
    s = Store.open(path, 4 * MiB, cfg(pool_limit=64 * MiB, write_through=False), disk_factory=f)
    try:
        old = text_pages(64, tag=1)
        s.write(0, old)
        s.fsync()
        new = text_pages(64, tag=2)
        s.write(0, new)
        f.data.add(Fault("write", errno.EIO, pages={40}, torn=True))
        with pytest.raises(DiskError):
            s.fsync()
        assert s.read(0, len(new)) == new
        s.fsync()
    finally:
        f.clear()
        s.close()
    reopen_and_compare(path, new)


def test_discard_fault(path):
    f = Faults()
    s = Store.open(path, 4 * MiB, cfg(pool_limit=64 * MiB), disk_factory=f)
    try:
        data = text_pages(32)
        s.write(0, data)
        s.fsync()
        f.data.add(Fault("punch", errno.EIO))
        with pytest.raises(ZblockError):
            s.discard(0, 8 * PAGE_SIZE)
        assert s.read(8 * PAGE_SIZE, 24 * PAGE_SIZE) == data[8 * PAGE_SIZE:]   # still serving
        s.discard(0, 8 * PAGE_SIZE)                                            # fault gone
        assert s.read(0, 8 * PAGE_SIZE) == bytes(8 * PAGE_SIZE)
        s.fsync()
    finally:
        f.clear()
        s.close()
    reopen_and_compare(path, bytes(8 * PAGE_SIZE) + data[8 * PAGE_SIZE:])


@pytest.mark.parametrize("seed", [1, 2])
def test_random_faults_never_wrong_bytes(path, seed):
    """nbdkit error-rate style: ~4% of reads, writes, fsyncs and punches of both files fail.
    Reads either fail or return the model's bytes; at the end, with the faults gone, one fsync
    makes everything durable and a new Store reads it exactly."""
    rng = random.Random(seed)
    f = Faults()
    size = 2 * MiB
    model = bytearray(size)
    s = Store.open(path, size, cfg(pool_limit=96 * 1024, incompressible_policy="reject"),
                   disk_factory=f)
    failed = {"read": 0, "write": 0, "fsync": 0, "discard": 0}
    try:
        for role in ("data", "meta"):
            for op in ("read", "write", "fsync", "punch"):
                for n in rng.sample(range(1, 1500), 60):
                    err = errno.EIO if op == "read" else rng.choice([errno.EIO, errno.ENOSPC])
                    f.disks[role].add(Fault(op, err, nth=n))
        for step in range(300):
            r = rng.random()
            if r < 0.5:
                npages = rng.randrange(1, 24)
                off = rng.randrange(0, size // PAGE_SIZE - npages) * PAGE_SIZE
                if rng.random() < 0.3:
                    off += rng.randrange(1, PAGE_SIZE)
                    npages -= 1 if npages > 1 else 0
                chunks = [rng.randbytes(PAGE_SIZE) if rng.random() < 0.3 else text_pages(1, step)
                          for _ in range(npages)]
                data = b"".join(chunks)[:min(npages * PAGE_SIZE, size - off)]
                try:
                    s.write(off, data)
                    model[off:off + len(data)] = data
                except ZblockError:
                    failed["write"] += 1
                    # a failed write leaves each page old or new: make the model agree by
                    # rewriting the range once the fault has passed (next loop iterations)
                    for _ in range(5):
                        try:
                            s.write(off, data)
                            model[off:off + len(data)] = data
                            break
                        except ZblockError:
                            continue
                    else:
                        pytest.fail("a write kept failing after its fault")
            elif r < 0.8:
                off = rng.randrange(0, size - 1)
                length = rng.randrange(1, 40 * PAGE_SIZE)
                try:
                    got = s.read(off, length)
                except ZblockError as e:
                    assert e.errno == errno.EIO, e
                    failed["read"] += 1
                    continue
                assert got == bytes(model[off:off + length]), f"wrong bytes at step {step}"
            elif r < 0.9:
                try:
                    s.fsync()
                except DiskError:
                    failed["fsync"] += 1
            else:
                n = rng.randrange(1, 8)
                off = rng.randrange(0, size // PAGE_SIZE - n) * PAGE_SIZE
                try:
                    s.discard(off, n * PAGE_SIZE)
                    model[off:off + n * PAGE_SIZE] = bytes(n * PAGE_SIZE)
                except ZblockError:
                    failed["discard"] += 1
                    s.write(off, bytes(model[off:off + n * PAGE_SIZE]))   # back to the model
        f.clear()
        s.fsync()
        assert s.read(0, size) == bytes(model)
        st = s.stats()
    finally:
        f.clear()
        s.close()
    injected = {role: dict(d.faults) for role, d in f.disks.items()}
    print(f"\nseed {seed}: injected {injected}; failed calls {failed}; "
          f"reject_reclaim_fail {st['reject_reclaim_fail']}")
    assert sum(sum(v.values()) for v in injected.values()) > 10
    reopen_and_compare(path, bytes(model))


# ---------------------------------------------------------------------------------------------
# engine faults


def sim_cfg(**kw) -> Config:
    return cfg(accelerator="sim", pool_limit=64 * MiB, hw_latency_us=1.0, **kw)


def mixed(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randbytes(PAGE_SIZE) if i % 4 == 1 else
                    (bytes(PAGE_SIZE) if i % 4 == 2 else text_pages(1, i)) for i in range(n))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["error", pytest.param("hang", marks=pytest.mark.slow), "dead"])
def test_engine_fault_on_compress_and_decompress(path, mode):
    s = Store.open(path, 8 * MiB, sim_cfg(), disk_factory=None)
    try:
        engine = s.cache.registry.current.contexts.engine
        assert engine is not None
        before = mixed(256, 1)
        s.write(0, before)                       # healthy engine
        assert s.read(0, len(before)) == before
        engine.set_fault(mode)
        # compress while faulty: everything falls back to software
        during = mixed(256, 2)
        s.write(len(before), during)
        # decompress while faulty: pages the engine compressed come back through software
        assert s.read(0, len(before)) == before
        assert s.read(len(before), len(during)) == during
        hw = s.stats()["hw"]
        assert hw["errors"] + hw["fallbacks"] > 0, hw
        assert s.stats()["decompress_fail"] == 0
        # writeback and fsync with a broken engine
        s.fsync()
        assert s.cache.writeback.shrink(0)
        assert s.read(0, 2 * len(before)) == before + during
        engine.set_fault(None)
    finally:
        s.close()
    reopen_and_compare(path, before + during)


@pytest.mark.timeout(120)
def test_engine_fault_rate_changed_at_run_time(path):
    s = Store.open(path, 8 * MiB, sim_cfg(), disk_factory=None)
    try:
        a = mixed(512, 3)
        s.write(0, a)
        s.set_param("hw_fault_rate", "0.5")      # a new pool on a new, flaky engine
        b = mixed(512, 4)
        s.write(len(a), b)
        assert s.read(0, len(a) + len(b)) == a + b
        s.set_param("hw_fault_rate", "1")
        assert s.read(0, len(a) + len(b)) == a + b
        s.set_param("accelerator", "none")
        assert s.read(0, len(a) + len(b)) == a + b
        st = s.stats()
    finally:
        s.close()
    reopen_and_compare(path, a + b)
    print(f"\nhw after fault_rate 0.5 and 1: {st['hw']}")


# ---------------------------------------------------------------------------------------------
# integrity


def flip_byte(path: str, offset: int, keep_mtime: bool = True) -> None:
    """Change one byte in the file behind zblock's back; bit rot keeps the mtime."""
    st = os.stat(path)
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ 0x5A]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_corruption_detected_open_reopen_and_fsck(path):
    data = text_pages(64)
    s = Store.open(path, 4 * MiB, cfg(pool_limit=64 * MiB))
    try:
        s.write(0, data)
        s.fsync()
        assert s.cache.writeback.shrink(0)
        flip_byte(path, 7 * PAGE_SIZE + 123)              # while open: the disk changed under it
        with pytest.raises(DataError):
            s.read(7 * PAGE_SIZE, PAGE_SIZE)
        assert s.stats()["checksum_errors"] >= 1
        assert s.read(8 * PAGE_SIZE, 56 * PAGE_SIZE) == data[8 * PAGE_SIZE:]
        s.write(7 * PAGE_SIZE, data[7 * PAGE_SIZE:8 * PAGE_SIZE])   # a rewrite heals it
    finally:
        s.close()
    reopen_and_compare(path, data)

    flip_byte(path, 20 * PAGE_SIZE + 9)                   # after a clean unmount
    rep = fsck(path)
    assert not rep.ok and rep.bad_pages == [20], rep.summary()
    res = subprocess.run([sys.executable, "-m", "zblock", "fsck", path], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert res.returncode != 0 and "20" in res.stdout + res.stderr, res
    assert "Traceback" not in res.stderr
    s = Store.open(path, None, cfg())
    try:
        with pytest.raises(DataError):
            s.read(20 * PAGE_SIZE, PAGE_SIZE)
        assert s.stats()["checksum_errors"] == 1
        assert s.read(0, 20 * PAGE_SIZE) == data[:20 * PAGE_SIZE]
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# mount tier


@pytest.mark.mount
@pytest.mark.timeout(180)
def test_mount_scripted_disk_faults(fault_rules):
    import mountutil

    rules = fault_rules
    data = text_pages(1024)                                # 4 MiB through a 512 KiB pool
    workdir = mountutil.new_workdir("faults")   # outlives both mounts
    try:
        mount_faults_then_bitrot(workdir, rules, data)
    finally:
        mountutil.cleanup_dir(workdir)


def mount_faults_then_bitrot(workdir, rules, data):
    import mountutil
    import faultserver

    m = mountutil.Mount(size="16M", pool_limit="512K", shrinker="N", workdir=workdir, faults=True)
    with m:
        fd = os.open(m.disk, os.O_RDWR)
        try:
            faultserver.write_rules(rules, [{"op": "write", "err": "EIO", "times": None}])
            os.pwrite(fd, data, 0)
            with pytest.raises(OSError) as ei:
                os.fsync(fd)
            assert ei.value.errno == errno.EIO
            assert os.pread(fd, len(data), 0) == data          # served from the cache
            st = m.stats()
            assert st["reject_reclaim_fail"] + st["dirty_pages"] > 0, st
            faultserver.write_rules(rules, [])
            os.fsync(fd)
            faultserver.write_rules(rules, [{"op": "fsync", "err": "ENOSPC", "times": 1}])
            os.pwrite(fd, data[:PAGE_SIZE], 0)
            with pytest.raises(OSError) as ei:
                os.fsync(fd)
            assert ei.value.errno == errno.ENOSPC
            faultserver.write_rules(rules, [])
            os.fsync(fd)
        finally:
            os.close(fd)
    # integrity across a remount: bit rot in one page of the backing file
    flip_byte(m.backing, 100 * PAGE_SIZE + 5)
    res = mountutil.zblock("fsck", m.backing)
    assert res.returncode != 0 and "100" in res.stdout, res
    m2 = mountutil.Mount(size=None, backing=m.backing, workdir=m.workdir, faults=True)
    try:
        with m2:
            fd = os.open(m2.disk, os.O_RDONLY)
            try:
                with pytest.raises(OSError) as ei:
                    os.pread(fd, PAGE_SIZE, 100 * PAGE_SIZE)
                assert ei.value.errno == errno.EIO
                assert os.pread(fd, 100 * PAGE_SIZE, 0) == data[:100 * PAGE_SIZE]
                assert os.pread(fd, 923 * PAGE_SIZE, 101 * PAGE_SIZE) == data[101 * PAGE_SIZE:]
            finally:
                os.close(fd)
            assert m2.stats()["checksum_errors"] >= 1
    finally:
        m2.cleanup(remove=False)


# ---------------------------------------------------------------------------------------------
# fsync racing a failing writeback


class GateDisk:
    """A data disk whose next write (once armed) blocks until released, then fails with EIO:
    a writeback caught in flight by a concurrent fsync (a fake of the engine tier)."""

    def __init__(self, inner):
        self.inner = inner
        self.armed = False
        self.blocked = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def pwrite(self, offset, data):
        self.pwritev(offset, [data])

    def pwritev(self, offset, bufs):
        if self.armed:
            self.armed = False
            self.blocked.set()
            if not self.release.wait(30):
                raise AssertionError("the gate was never released")
            raise OSError(errno.EIO, "injected: writeback failed while fsync waited")
        self.inner.pwritev(offset, bufs)


def test_fsync_while_writeback_fails(path):
    """fsync must not report success for pages whose concurrent writeback failed: they are
    still only in the cache (DESIGN: fsync makes every page written so far durable)."""
    gates = {}

    def factory(p, role):
        d = FileDisk(p, direct=role == "data")
        if role == "data":
            d = gates.setdefault("data", GateDisk(d))
        return d

    # no write-through: the writeback below must be what writes the pages
    s = Store.open(path, 4 * MiB, cfg(pool_limit=64 * MiB, write_through=False),
                   disk_factory=factory)
    gate = gates["data"]
    try:
        data = text_pages(32)
        s.write(0, data)
        assert s.stats()["stored_pages"] == 32       # stored (stats wait for the write-behind)
        gate.armed = True
        wb = threading.Thread(target=s.cache.writeback.shrink, args=(0,), daemon=True)
        wb.start()                                   # writeback of all 32 pages, stuck in the disk
        assert gate.blocked.wait(10)
        result = {}

        def do_fsync():
            try:
                s.fsync()
                result["ok"] = True
            except ZblockError as e:
                result["err"] = e
        fs = threading.Thread(target=do_fsync, daemon=True)
        fs.start()
        fs.join(0.5)                                 # fsync is now waiting for the writeback
        gate.release.set()
        wb.join(30)
        fs.join(60)
        assert not fs.is_alive()
        dirty = s.stats()["dirty_pages"]
        assert "err" in result or dirty == 0, \
            f"fsync returned success with {dirty} dirty pages that never reached the disk"
        s.fsync()                                    # a retry writes them
        assert s.stats()["dirty_pages"] == 0
    finally:
        gate.release.set()
        s.close()
    reopen_and_compare(path, data)
