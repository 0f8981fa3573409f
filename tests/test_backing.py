"""Backing store tests: open rules, round trips, checksums, fsck, scripted disk faults, crash
consistency under a power-cut model, and page-cache bypass. Engine tier: real files in tmp_path,
fault layers from tests/faultdisk.py (no mocks)."""

import errno
import os
import pathlib
import random
import shutil
import subprocess
import tempfile
import threading

import numpy as np
import pytest
from conftest import require

from zblock import PAGE_SIZE
from zblock.backing import Backing, fsck, meta_path
from faultdisk import Crash, CrashDisk, CrashPlan, Fault, FaultyDisk
from zblock.disk import FileDisk
from zblock.errors import BackingError, BackingLocked, DataError, DiskError, OutOfRange

PS = PAGE_SIZE


def page(tag, n=PS):
    """A recognisable page: tag repeated (bytes differ per tag)."""
    b = (f"{tag}|".encode()) * (n // len(f"{tag}|") + 1)
    return b[:n]


@pytest.fixture
def img(tmp_path):
    return str(tmp_path / "disk.img")


def faulty_factory(where="data", rules=None):
    """A disk_factory wrapping one role in a FaultyDisk; the FaultyDisk is in .disks[role]."""
    made = {}

    def factory(path, role):
        d = FileDisk(path, direct=(role == "data"))
        if role == where:
            d = FaultyDisk(d, rules)
        made[role] = d
        return d

    factory.disks = made
    return factory


# ---------------------------------------------------------------------------------------------
# open rules


def test_create_needs_size_and_missing_is_clear(img):
    with pytest.raises(BackingError, match="does not exist.*--size"):
        Backing.open(img)
    assert not os.path.exists(img)


def test_directory_refused(tmp_path):
    with pytest.raises(BackingError, match="is a directory"):
        Backing.open(str(tmp_path), 1 << 20)


@pytest.mark.parametrize("size", [0, 1000, PS + 1, -PS])
def test_bad_size_refused(img, size):
    with pytest.raises(BackingError, match="multiple of 4096"):
        Backing.open(img, size)
    assert not os.path.exists(img)


def test_existing_size_rules(img):
    with Backing.open(img, 1 << 20) as b:
        assert (b.size, b.npages, b.open_state) == (1 << 20, 256, "new")
    assert os.path.getsize(img) == 1 << 20
    assert os.path.exists(meta_path(img))
    with Backing.open(img) as b:  # size None: the file's size
        assert b.size == 1 << 20 and b.open_state == "clean"
    with Backing.open(img, 1 << 20) as b:  # the same size is fine
        assert b.size == 1 << 20
    with pytest.raises(BackingError, match="no silent resize"):
        Backing.open(img, 2 << 20)
    assert os.path.getsize(img) == 1 << 20


def test_empty_existing_file_needs_size(img):
    open(img, "wb").close()
    with pytest.raises(BackingError, match="empty"):
        Backing.open(img)
    with Backing.open(img, 64 * PS) as b:
        assert b.npages == 64


def test_unaligned_existing_file_refused(img):
    with open(img, "wb") as f:
        f.write(b"x" * 5000)
    with pytest.raises(BackingError, match="not a multiple"):
        Backing.open(img)


def test_second_open_is_locked(img):
    b = Backing.open(img, 1 << 20)
    try:
        with pytest.raises(BackingLocked):
            Backing.open(img)
        with pytest.raises(BackingLocked):
            fsck(img)
        # The lock is a flock, seen from another process too.
        r = subprocess.run(["flock", "-n", "-x", img, "true"], timeout=10)
        assert r.returncode != 0
    finally:
        b.close()
    with Backing.open(img) as b2:
        assert b2.npages == 256


def test_read_only_open_writes_nothing_and_shares_the_lock(img):
    with Backing.open(img, 1 << 20) as b:
        b.write_pages([2], [page("two")])
    files = (img, meta_path(img))
    before = [(pathlib.Path(p).read_bytes(), os.stat(p).st_mtime_ns) for p in files]
    with Backing.open(img, read_only=True) as ro, Backing.open(img, read_only=True) as ro2:
        assert ro.open_state == "clean" and ro.read_pages(2, 1) == page("two") == ro2.read_pages(2, 1)
        with pytest.raises(BackingLocked):
            Backing.open(img)                                # a writer waits for the readers
        ro.sync()
    assert [(pathlib.Path(p).read_bytes(), os.stat(p).st_mtime_ns) for p in files] == before
    assert fsck(img).ok


def test_read_only_open_needs_an_existing_image_and_makes_no_sidecar(img):
    with pytest.raises(BackingError, match="does not exist"):
        Backing.open(img, 1 << 20, read_only=True)
    assert not os.path.exists(img)
    open(img, "wb").close()
    with pytest.raises(BackingError, match="empty"):
        Backing.open(img, read_only=True)
    raw = os.urandom(4 * PS)
    with open(img, "wb") as f:
        f.write(raw)
    with Backing.open(img, read_only=True) as ro:            # a raw image: read unchecked
        assert ro.open_state == "imported" and ro.read_pages(0, 4) == raw
    assert not os.path.exists(meta_path(img))


def test_bad_sidecar_header_refused(img):
    Backing.open(img, 1 << 20).close()
    with open(meta_path(img), "r+b") as f:
        f.write(b"GARBAGE!")
    with pytest.raises(BackingError, match="bad magic"):
        Backing.open(img)
    rep = fsck(img)
    assert not rep.ok and "bad magic" in rep.errors[0]


def test_sidecar_for_other_size_refused(img, tmp_path):
    other = str(tmp_path / "other.img")
    Backing.open(other, 2 << 20).close()
    Backing.open(img, 1 << 20).close()
    shutil.copyfile(meta_path(other), meta_path(img))
    with pytest.raises(BackingError, match="sidecar is for"):
        Backing.open(img)


# ---------------------------------------------------------------------------------------------
# data round trips


def test_write_sync_reopen_reads_back(img):
    pages = {i: page(f"p{i}") for i in (0, 1, 2, 7, 100, 511, 512, 513, 1023)}
    with Backing.open(img, 1024 * PS) as b:
        assert b.read_pages(0, 4) == bytes(4 * PS)  # never written: zeros, no disk read
        assert b.stats.bd_reads == 0
        idxs = list(pages)
        random.Random(1).shuffle(idxs)  # any order; runs are coalesced after sorting
        b.write_pages(idxs, [pages[i] for i in idxs])
        assert b.stats.bd_writes == len(pages)
        assert b.stats.bd_write_ios == 5 and b.stats.bd_write_us > 0        # runs 0-2, 7, 100, 511-513, 1023
        for i, data in pages.items():
            assert b.read_pages(i, 1) == data
        b.sync()
    with Backing.open(img) as b:
        assert b.open_state == "clean"
        got = b.read_pages(0, 3)
        assert got == pages[0] + pages[1] + pages[2]
        assert b.read_pages(510, 4) == bytes(PS) + pages[511] + pages[512] + pages[513]
        assert b.stats.bd_reads == 7
        assert b.stats.bd_read_ios == 2 and b.stats.bd_read_us > 0         # one I/O a request
        assert b.stats.checksum_errors == 0
    # A plain raw image at the same offsets.
    with open(img, "rb") as f:
        f.seek(513 * PS)
        assert f.read(PS) == pages[513]
    rep = fsck(img)
    assert rep.ok and rep.closed_cleanly and rep.checked_pages == 1024, rep.summary()


def test_pages_read_ahead_come_back_as_far_as_they_verify_and_their_errors_are_not_the_callers(img):
    """read_pages(start, count, ahead): a bad page or an I/O error among the pages after the
    caller's leaves them out, without an error or a count; among the caller's, it is the
    caller's error."""
    rng = random.Random(3)
    pages = [rng.randbytes(PS) for _ in range(16)]
    with Backing.open(img, size=16 * PS) as b:
        b.write_pages(list(range(16)), pages)
        b.sync()
    with open(img, "r+b") as f:
        f.seek(10 * PS + 7)
        f.write(b"bad")
    factory = faulty_factory()
    with Backing.open(img, disk_factory=factory) as b:
        assert b.read_pages(0, 4, 12) == b"".join(pages[:10])       # stops before page 10
        assert b.read_pages(0, 4, 4) == b"".join(pages[:8])
        assert b.stats.checksum_errors == 0
        with pytest.raises(DataError, match="page 10"):
            b.read_pages(8, 4, 4)
        assert b.stats.checksum_errors == 1
        factory.disks["data"].add(Fault("read", pages=[6], times=1))
        assert b.read_pages(0, 4, 4) == b"".join(pages[:4])         # the window's I/O failed
        assert b.stats.io_errors == 0
        factory.disks["data"].add(Fault("read", pages=[2], times=2))
        with pytest.raises(DataError, match=r"pages 0\.\.3 failed"):     # the caller's own
            b.read_pages(0, 4, 4)
        assert b.stats.io_errors == 1


def test_one_page_aligned_buffer_is_written_as_it_is_and_any_other_through_a_bounce_buffer(tmp_path):
    """O_DIRECT from the caller's buffer when it is one page-aligned buffer (a lent FUSE
    request): no bounce buffer is taken. Anything else (a bytes page, a list) is copied first."""
    import mmap
    path = tmp_path / "d.img"
    path.write_bytes(bytes(8 * PAGE_SIZE))
    disk = FileDisk(str(path))
    if disk.mode != "direct":
        disk.close()
        pytest.skip(f"no O_DIRECT on {tmp_path}")
    try:
        data = os.urandom(4 * PAGE_SIZE)
        aligned = mmap.mmap(-1, len(data))
        aligned[:] = data
        taken = []
        get = disk._pool.get
        disk._pool.get = lambda: taken.append(1) or get()
        disk.pwritev(0, [memoryview(aligned).toreadonly()])
        assert taken == []
        disk.pwritev(4 * PAGE_SIZE, [data[:PAGE_SIZE], data[PAGE_SIZE:]])
        off_page = mmap.mmap(-1, 2 * PAGE_SIZE)     # one buffer, 512 bytes past a page start
        off_page[512:512 + PAGE_SIZE] = data[:PAGE_SIZE]
        disk.pwritev(5 * PAGE_SIZE, [memoryview(off_page)[512:512 + PAGE_SIZE]])
        assert taken == [1, 1]
        assert disk.pread(0, 4 * PAGE_SIZE) == data
        assert disk.pread(4 * PAGE_SIZE, 2 * PAGE_SIZE) == data[:PAGE_SIZE] * 2
    finally:
        disk.close()


def test_overwrite_and_discard(img):
    with Backing.open(img, 64 * PS) as b:
        b.write_pages(list(range(8)), [page(f"a{i}") for i in range(8)])
        b.sync()
        b.write_pages([3], [page("b3")])
        b.discard(4, 3)
        assert b.read_pages(2, 6) == page("a2") + page("b3") + bytes(3 * PS) + page("a7")
    with Backing.open(img) as b:
        assert b.read_pages(2, 6) == page("a2") + page("b3") + bytes(3 * PS) + page("a7")
    # The discard punched the file: the pages are holes.
    with open(img, "rb") as f:
        f.seek(4 * PS)
        assert f.read(3 * PS) == bytes(3 * PS)
    assert fsck(img).ok


def test_range_and_argument_checks(img):
    with Backing.open(img, 16 * PS) as b:
        with pytest.raises(OutOfRange):
            b.read_pages(15, 2)
        with pytest.raises(OutOfRange):
            b.write_pages([16], [page("x")])
        with pytest.raises(OutOfRange):
            b.discard(-1, 1)
        with pytest.raises(ValueError):
            b.write_pages([1], [b"short"])
        with pytest.raises(ValueError):
            b.write_pages([1, 2], [page("x")])
        b.write_pages([], [])
        assert b.read_pages(16, 0) == b""


def test_long_run_larger_than_bounce_buffer(img):
    n = 600  # > 256 pages: split across 1 MiB bounce buffers
    data = [os.urandom(PS) for _ in range(n)]
    with Backing.open(img, 1024 * PS) as b:
        b.write_pages(list(range(10, 10 + n)), data)
        assert b.read_pages(10, n) == b"".join(data)


def test_concurrent_writers_and_sync(img):
    n_threads, per = 4, 64
    errors = []

    def worker(t):
        try:
            for r in range(4):
                idxs = list(range(t * per, (t + 1) * per))
                b.write_pages(idxs, [page(f"t{t}r{r}i{i}") for i in idxs])
                if r % 2:
                    b.sync()
        except BaseException as e:  # reported below, never lost
            errors.append(e)

    b = Backing.open(img, n_threads * per * PS)
    try:
        ts = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in ts)
        assert not errors, errors
        for t in range(n_threads):
            for i in range(t * per, (t + 1) * per):
                assert b.read_pages(i, 1) == page(f"t{t}r3i{i}")
    finally:
        b.close()
    rep = fsck(img)
    assert rep.ok and rep.inflight_pages == 0, rep.summary()


# ---------------------------------------------------------------------------------------------
# checksums and fsck


def test_corrupted_page_is_eio_and_fsck_finds_it(img):
    with Backing.open(img, 64 * PS) as b:
        b.write_pages(list(range(8)), [page(f"c{i}") for i in range(8)])
    with open(img, "r+b") as f:  # a stray write while unmounted
        f.seek(3 * PS + 100)
        f.write(b"\xff")
    rep = fsck(img)
    assert rep.bad_pages == [3] and not rep.ok
    assert any("modified since" in n for n in rep.notes)
    with Backing.open(img) as b:
        assert b.read_pages(2, 1) == page("c2")
        with pytest.raises(DataError, match="page 3") as ei:
            b.read_pages(3, 1)
        assert ei.value.errno == errno.EIO and ei.value.pages == [3]
        with pytest.raises(DataError, match="page 3"):
            b.read_pages(0, 8)
        assert b.stats.checksum_errors == 2
        b.write_pages([3], [page("fixed")])  # rewriting the page heals it
        assert b.read_pages(3, 1) == page("fixed")
    assert fsck(img).ok


def test_nonzero_data_under_zero_mark_fails_fsck(img):
    Backing.open(img, 16 * PS).close()
    with open(img, "r+b") as f:
        f.seek(5 * PS)
        f.write(b"junk")
    assert fsck(img).bad_pages == [5]


def test_raw_image_without_sidecar_is_imported(img):
    raw = [os.urandom(PS) for _ in range(16)]
    with open(img, "wb") as f:
        f.write(b"".join(raw))
    with Backing.open(img) as b:
        assert b.open_state == "imported"
        assert b.read_pages(0, 16) == b"".join(raw)
        b.write_pages([4], [page("new")])
    rep = fsck(img)
    assert rep.ok and rep.unchecked_pages == 15, rep.summary()
    with Backing.open(img) as b:
        assert b.read_pages(4, 1) == page("new") and b.read_pages(5, 1) == raw[5]


def test_fsck_missing_and_no_sidecar(img, tmp_path):
    with pytest.raises(BackingError, match="does not exist"):
        fsck(img)
    with pytest.raises(BackingError, match="directory"):
        fsck(str(tmp_path))
    with open(img, "wb") as f:
        f.write(bytes(PS))
    rep = fsck(img)
    assert not rep.ok and "no sidecar" in rep.errors[0]


# ---------------------------------------------------------------------------------------------
# scripted disk faults


def test_write_eio_keeps_old_data(img):
    fac = faulty_factory("data")
    with Backing.open(img, 64 * PS, disk_factory=fac) as b:
        fd = fac.disks["data"]
        b.write_pages([5, 6], [page("old5"), page("old6")])
        b.sync()
        fd.add(Fault("write", err=errno.EIO, pages=[5]))
        with pytest.raises(DiskError) as ei:
            b.write_pages([5, 6], [page("new5"), page("new6")])
        assert ei.value.errno == errno.EIO
        assert fd.faults["write"] == 1
        assert b.read_pages(5, 2) == page("old5") + page("old6")
        assert b.stats.bd_writes == 2
        b.sync()  # the failed pages keep both values across a sync
        assert b.read_pages(5, 1) == page("old5")
        b.write_pages([5], [page("new5")])  # a retry succeeds
        b.sync()
    with Backing.open(img) as b:
        assert b.read_pages(5, 2) == page("new5") + page("old6")
    assert fsck(img).ok


def test_write_enospc_on_nth_and_torn_write(img):
    fac = faulty_factory("data", [Fault("write", err=errno.ENOSPC, nth=2)])
    with Backing.open(img, 64 * PS, disk_factory=fac) as b:
        fd = fac.disks["data"]
        b.write_pages(list(range(8)), [page(f"o{i}") for i in range(8)])
        with pytest.raises(DiskError) as ei:
            b.write_pages([0], [page("lost")])
        assert ei.value.errno == errno.ENOSPC
        assert b.read_pages(0, 1) == page("o0")
        b.sync()
        # A run that fails at page 4 after pages 0..3 landed: every page reads old or new.
        fd.add(Fault("write", pages=[4], torn=True))
        with pytest.raises(DiskError):
            b.write_pages(list(range(8)), [page(f"n{i}") for i in range(8)])
        got = [b.read_pages(i, 1) for i in range(8)]
        assert got[:4] == [page(f"n{i}") for i in range(4)]
        assert got[4:] == [page(f"o{i}") for i in range(4, 8)]
        b.sync()
    with Backing.open(img) as b:  # across a clean close too
        assert [b.read_pages(i, 1) for i in range(8)] == got
    assert fsck(img).ok


def test_read_and_fsync_and_punch_faults(img):
    fac = faulty_factory("data")
    with Backing.open(img, 64 * PS, disk_factory=fac) as b:
        fd = fac.disks["data"]
        b.write_pages([1], [page("x")])
        fd.add(Fault("read", pages=[1], err=errno.ENOSPC))
        with pytest.raises(DataError) as ei:      # a failed read is EIO, whatever the disk said
            b.read_pages(1, 1)
        assert ei.value.errno == errno.EIO and b.stats.io_errors == 1
        assert b.read_pages(1, 1) == page("x")  # times=1: the next read works
        fd.add(Fault("fsync"))
        with pytest.raises(DiskError):
            b.sync()
        b.sync()
        fd.add(Fault("punch", err=errno.EIO))
        with pytest.raises(DiskError):
            b.discard(1, 1)
        assert b.read_pages(1, 1) in (page("x"), bytes(PS))
        b.discard(1, 1)
        assert b.read_pages(1, 1) == bytes(PS)
        assert fd.calls["fsync"] >= 2 and fd.faults == {"read": 1, "write": 0, "fsync": 1, "punch": 1, "prealloc": 0}
    assert fsck(img).ok


def test_sidecar_write_failure_writes_no_data(img):
    fac = faulty_factory("meta")
    with Backing.open(img, 64 * PS, disk_factory=fac) as b:
        b.write_pages([2], [page("old")])
        b.sync()
        fac.disks["meta"].add(Fault("write", err=errno.ENOSPC))
        with pytest.raises(DiskError) as ei:
            b.write_pages([2], [page("new")])
        assert ei.value.errno == errno.ENOSPC
        assert b.read_pages(2, 1) == page("old")
    with Backing.open(img) as b:
        assert b.read_pages(2, 1) == page("old")


# ---------------------------------------------------------------------------------------------
# crash consistency

# Pages around sidecar block boundaries (512 entries per block), so runs span two blocks.
CRASH_PAGES = [0, 1, 2, 3, 510, 511, 512, 513, 1027, 1028, 1029]
CRASH_NPAGES = 1030


def crash_script(seed):
    """A fixed sequence of writes (runs and scattered), discards and syncs."""
    rng = random.Random(seed)
    ops = []
    for step in range(10):
        r = rng.random()
        if r < 0.6:
            k = rng.randint(1, 5)
            idxs = sorted(rng.sample(CRASH_PAGES, k))
            ops.append(("w", idxs, [page(f"s{seed}o{step}p{i}") for i in idxs]))
        elif r < 0.75:
            start = rng.choice([0, 510, 1027])
            ops.append(("d", start, rng.randint(1, 3)))
        else:
            ops.append(("s",))
    ops.append(("w", [511, 512], [page("last511"), page("last512")]))
    ops.append(("s",))
    return ops


class Model:
    """Per page: bytes at the last completed sync, and every version written since."""

    def __init__(self, initial):
        self.synced = dict(initial)
        self.since = {p: [] for p in initial}

    def apply(self, b, op):
        if op[0] == "w":
            _, idxs, pages = op
            for i, d in zip(idxs, pages):
                self.since[i].append(d)  # before the call: a crash inside may land it
            b.write_pages(idxs, pages)
        elif op[0] == "d":
            _, start, count = op
            for i in range(start, start + count):
                if i in self.since:
                    self.since[i].append(bytes(PS))
            b.discard(start, count)
        else:
            b.sync()
            for p, vs in self.since.items():
                if vs:
                    self.synced[p] = vs[-1]
                    vs.clear()

    def check(self, path, label):
        with Backing.open(path) as b:
            # "changed": a crash before the open marked it dirty; the copy has a new mtime
            assert b.open_state in ("recovered", "clean", "changed")
            for p in CRASH_PAGES:
                try:
                    got = b.read_pages(p, 1)
                except DataError:
                    got = None
                if not self.since[p]:
                    assert got == self.synced[p], f"{label}: synced page {p} not exact"
                else:
                    allowed = [self.synced[p]] + self.since[p]
                    assert got is None or got in allowed, f"{label}: page {p} reads other bytes"
        rep = fsck(path)
        assert not rep.errors, rep.summary()
        assert set(rep.bad_pages) <= {p for p in CRASH_PAGES if self.since[p]}, label


@pytest.fixture
def fast_dir(tmp_path):
    """tmpfs when there is one: the power cuts are modelled by CrashDisk, so real fsyncs only
    cost time (on ext4 here the crash tests took 25 s, on tmpfs a few)."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    d = tempfile.mkdtemp(prefix="zblock-test-backing-", dir="/dev/shm")
    try:
        yield pathlib.Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def crash_base(tmp_path):
    """A backing file with synced initial contents, closed cleanly; returns (path, initial)."""
    base = str(tmp_path / "base.img")
    initial = {p: bytes(PS) for p in CRASH_PAGES}
    with Backing.open(base, CRASH_NPAGES * PS) as b:
        idxs = CRASH_PAGES[::2]
        b.write_pages(idxs, [page(f"init{i}") for i in idxs])
        for i in idxs:
            initial[i] = page(f"init{i}")
    return base, initial


def run_with_crash(base, work, initial, ops, stop_at, cut):
    shutil.copyfile(base, work)
    shutil.copyfile(meta_path(base), meta_path(work))
    plan = CrashPlan(stop_at=stop_at)
    model = Model(initial)

    def factory(path, role):
        return CrashDisk(FileDisk(path, direct=(role == "data")), plan)

    b = None
    try:
        b = Backing.open(work, disk_factory=factory)
        for op in ops:
            model.apply(b, op)
        b.close()
    except Crash:
        if b is not None:
            b.close(clean=False)  # the process is gone: nothing more is written
    if cut == "all":
        plan.cut_power()
    elif cut == "random":
        plan.cut_power(random.Random(stop_at))
    return plan, model


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_crash_at_every_write_and_fsync(fast_dir, seed):
    base, initial = crash_base(fast_dir)
    work = str(fast_dir / "work.img")
    ops = crash_script(seed)
    plan, model = run_with_crash(base, work, initial, ops, None, None)  # dry run: count ops
    total = plan.count
    assert total > 10
    model.check(work, "no crash")
    for stop_at in range(1, total + 1):
        for cut in ("none", "all", "random"):
            plan, model = run_with_crash(base, work, initial, ops, stop_at, cut)
            assert plan.crashed
            model.check(work, f"seed {seed} stop_at {stop_at}/{total} cut {cut}")


def test_crash_model_really_drops_unsynced_writes(tmp_path):
    """The oracle can fail: without a sync, a power cut takes the write away."""
    base, initial = crash_base(tmp_path)
    work = str(tmp_path / "work.img")
    ops = [("w", [1], [page("unsynced")])]
    plan, model = run_with_crash(base, work, initial, ops + [("w", [2], [page("z")])], 4, "all")
    with Backing.open(work) as b:
        assert b.read_pages(1, 1) == initial[1]
    plan, model = run_with_crash(base, work, initial, ops, None, None)  # close syncs
    with Backing.open(work) as b:
        assert b.read_pages(1, 1) == page("unsynced")


def test_write_before_sidecar_would_be_caught(tmp_path):
    """Tamper with the order on purpose (data lands, sidecar pair does not): the synced-page
    rule must flag it, proving the crash test has teeth."""
    base, initial = crash_base(tmp_path)
    work = str(tmp_path / "work.img")
    shutil.copyfile(base, work)
    shutil.copyfile(meta_path(base), meta_path(work))
    with open(work, "r+b") as f:  # data changed with no checksum covering it
        f.seek(0)
        f.write(page("sneaky"))
    model = Model(initial)
    with pytest.raises(AssertionError, match="synced page 0 not exact"):
        model.check(work, "tampered")


# ---------------------------------------------------------------------------------------------
# ephemeral (swap) mode


def test_ephemeral_discards_and_preallocates(img):
    with Backing.open(img, 64 * PS) as b:
        b.write_pages([0, 1], [page("old0"), page("old1")])
    with Backing.open(img, 64 * PS, ephemeral=True) as b:
        assert b.open_state == "ephemeral"
        assert not os.path.exists(meta_path(img))
        assert os.stat(img).st_blocks * 512 >= 64 * PS  # preallocated
        assert b.read_pages(0, 2) == bytes(2 * PS)
        b.write_pages([0, 1, 2], [page("e0"), page("e1"), page("e2")])
        assert b.read_pages(0, 3) == page("e0") + page("e1") + page("e2")
        b.discard(1, 1)  # marks only: the space stays allocated
        assert b.read_pages(0, 3) == page("e0") + bytes(PS) + page("e2")
        assert os.stat(img).st_blocks * 512 >= 64 * PS
        b.sync()
    assert not os.path.exists(meta_path(img))


# ---------------------------------------------------------------------------------------------
# page-cache bypass


def resident_bytes(path):
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return int(out.strip())


@pytest.mark.parametrize("mode", ["direct", "dropbehind", "buffered"])
def test_backing_stays_out_of_page_cache(img, mode):
    require(shutil.which("fincore") is not None, "fincore (util-linux) not installed")
    size = 64 << 20

    def factory(path, role):
        if role == "meta":
            return FileDisk(path, direct=False)
        return FileDisk(path, direct=(mode == "direct"), drop_cache=(mode == "dropbehind"))

    chunk = [os.urandom(PS)] * 256
    with Backing.open(img, size, disk_factory=factory) as b:
        assert b.io_mode == mode
        for r in range(size // (256 * PS)):
            b.write_pages(list(range(r * 256, (r + 1) * 256)), chunk)
        for r in range(size // (256 * PS)):  # reads too (readahead once kept 34 MiB cached)
            assert b.read_pages(r * 256, 256) == b"".join(chunk)
        res = resident_bytes(img)
    if mode == "buffered":  # the control: proves the measurement sees cached pages
        assert res > size // 2, res
    else:
        assert res <= 1 << 20, f"{mode}: {res} bytes of the backing file stayed cached"


@pytest.mark.timeout(180)
def test_crash_during_concurrent_writes_and_syncs(fast_dir):
    """Writers on disjoint pages sharing sidecar blocks, a thread syncing meanwhile, a crash at
    the N-th write/fsync, then a power cut. A page must read exactly when a sync that started
    after its last write had returned completed before the crash (times taken conservatively:
    write end after the call returns, sync start before the call)."""
    import time

    npages = 1024
    owned = [list(range(t * 20, t * 20 + 20)) + list(range(500 + t * 10, 510 + t * 10))
             for t in range(3)]
    base = str(fast_dir / "cbase.img")
    Backing.open(base, npages * PS).close()
    work = str(fast_dir / "cwork.img")
    for trial, stop_at in enumerate([40, 90, 150, 230, 320, 450, 600, 10 ** 9]):
        shutil.copyfile(base, work)
        shutil.copyfile(meta_path(base), meta_path(work))
        plan = CrashPlan(stop_at=stop_at)
        b = Backing.open(work, disk_factory=lambda p, r: CrashDisk(
            FileDisk(p, direct=(r == "data")), plan))
        writes = {p: [] for pages in owned for p in pages}  # p -> [(t_start, t_end|None, data)]
        syncs = []  # (t_start, t_end) of completed syncs
        errors = []
        stop = threading.Event()

        def writer(t):
            rng = random.Random(trial * 10 + t)
            try:
                for k in range(40):
                    a = rng.randrange(len(owned[t]) - 4)
                    idxs = owned[t][a:a + rng.randint(1, 4)]
                    data = [page(f"w{t}k{k}p{i}") for i in idxs]
                    t0 = time.monotonic_ns()
                    recs = [[t0, None, d] for d in data]
                    for i, rec in zip(idxs, recs):
                        writes[i].append(rec)
                    b.write_pages(idxs, data)
                    t1 = time.monotonic_ns()
                    for rec in recs:
                        rec[1] = t1
            except Crash:
                pass
            except BaseException as e:
                errors.append(e)

        def syncer():
            try:
                while not stop.is_set():
                    t0 = time.monotonic_ns()
                    b.sync()
                    syncs.append((t0, time.monotonic_ns()))
            except Crash:
                pass
            except BaseException as e:
                errors.append(e)

        ts = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
        st = threading.Thread(target=syncer)
        for t in ts + [st]:
            t.start()
        for t in ts:
            t.join(timeout=60)
        stop.set()
        st.join(timeout=60)
        assert not any(t.is_alive() for t in ts + [st])
        assert not errors, errors
        b.close(clean=False)
        if trial % 3 == 1:
            plan.cut_power()
        elif trial % 3 == 2:
            plan.cut_power(random.Random(trial))  # else: the process died, the OS lives on
        with Backing.open(work) as b2:
            for p, recs in writes.items():
                try:
                    got = b2.read_pages(p, 1)
                except DataError:
                    got = None
                if not recs:
                    assert got == bytes(PS), f"trial {trial}: page {p} never written"
                    continue
                last = recs[-1]
                covered = last[1] is not None and any(s0 > last[1] for s0, _ in syncs)
                if covered:
                    assert got == last[2], f"trial {trial} stop {stop_at}: synced page {p}"
                else:
                    assert got is None or got == bytes(PS) or got in [r[2] for r in recs], \
                        f"trial {trial}: page {p} reads other bytes"


class GateDisk:
    """A fake layer: the first pwrite made by thread `name` waits for `release` (bounded), so a
    test can hold one sidecar write while other threads run."""

    def __init__(self, inner, name):
        self.inner, self.name = inner, name
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def pwrite(self, offset, data):
        if threading.current_thread().name == self.name and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(timeout=30)
        self.inner.pwrite(offset, data)


def test_stale_sidecar_block_cannot_land_after_sync(img):
    """Thread A snapshots sidecar block 0 and is held before writing it; thread B writes another
    page of block 0 and syncs. B's sidecar write must wait for A's (stripe lock), or A's stale
    block would land after B's sync and a synced page would fail its checksum."""
    with Backing.open(img, 64 * PS) as b:
        b.write_pages([1, 2], [page("old1"), page("old2")])
    gates = {}

    def factory(path, role):
        d = FileDisk(path, direct=(role == "data"))
        if role == "meta":
            d = gates["meta"] = GateDisk(d, "A")
        return d

    b = Backing.open(img, disk_factory=factory)
    try:
        gate = gates["meta"]
        a = threading.Thread(target=b.write_pages, args=([2], [page("new2")]), name="A")
        a.start()
        assert gate.entered.wait(timeout=30)

        def b_work():
            b.write_pages([1], [page("new1")])
            b.sync()

        tb = threading.Thread(target=b_work, name="B")
        tb.start()
        tb.join(timeout=0.5)
        b_done_first = not tb.is_alive()
        gate.release.set()
        a.join(timeout=30)
        tb.join(timeout=30)
        assert not a.is_alive() and not tb.is_alive()
    finally:
        gates["meta"].release.set()
        b.close(clean=False)  # the process dies here: nothing more written
    with Backing.open(img) as b2:
        assert b2.read_pages(1, 1) == page("new1")  # synced: must read exactly
    assert not b_done_first, "B's sidecar write did not wait for A's"


# ---------------------------------------------------------------------------------------------
# reservation, lost pages, format versions


def test_without_fallocate_the_holes_are_written_with_zeros(img):
    """A filesystem without fallocate: the reservation writes zeros into the holes only (the
    data already there is kept), and reports progress."""
    with Backing.open(img, 64 * PS) as b:
        b.write_pages([3], [page("keep")])
    os.truncate(img, 64 * PS)               # still sparse beyond page 3
    fac = faulty_factory("data", [Fault("prealloc", err=errno.EOPNOTSUPP)])
    said = []
    with Backing.open(img, disk_factory=fac, progress=said.append) as b:
        assert fac.disks["data"].faults["prealloc"] == 1
        assert b.read_pages(3, 1) == page("keep")
    assert os.stat(img).st_blocks * 512 >= 64 * PS, "the holes were not filled"
    assert fsck(img).ok


def test_lost_pages_read_eio_until_rewritten(img):
    with Backing.open(img, 16 * PS) as b:
        b.write_pages([1, 2], [page("a"), page("b")])
        b.mark_lost([2, 5])
    rep = fsck(img)
    assert rep.lost_pages == [2, 5] and rep.exit_code == 4 and not rep.bad_pages, rep.summary()
    with Backing.open(img) as b:
        assert b.read_pages(1, 1) == page("a")
        for p in (2, 5):
            with pytest.raises(DataError):
                b.read_pages(p, 1)
        b.write_pages([5], [page("new")])
        assert b.read_pages(5, 1) == page("new")
    assert fsck(img).lost_pages == [2]


def test_version_1_sidecar_is_converted(img):
    """Version 1 folded crcs 0 and 1 to 2 and 3; version 2 keeps 2 for LOST and folds 0..2 to 3."""
    import struct
    from zblock import sidecar as sc
    with Backing.open(img, 16 * PS) as b:
        b.write_pages([0, 1], [page("x"), page("y")])
    with open(meta_path(img), "r+b") as f:
        head = bytearray(f.read(sc.HEADER_SIZE))
        head[8:12] = struct.pack("<I", 1)
        n = sc.HEADER.size
        head[n:n + 4] = struct.pack("<I", sc.crc(bytes(head[:n])))
        f.seek(0)
        f.write(head)
        f.seek(sc.HEADER_SIZE + 8)              # page 1's pair: as a v1 page whose crc was 0
        f.write(struct.pack("<II", 2, 2))
    with Backing.open(img) as b:
        assert b.read_pages(0, 1) == page("x")
        with pytest.raises(DataError):          # its data's crc is not 0..3: a mismatch, not LOST
            b.read_pages(1, 1)
        assert b._crc[2 * 1] == sc.FOLD               # page 1's durable
    assert fsck(img).version == 2


# ---------------------------------------------------------------------------------------------
# memory of large disks


def _table_resident(b) -> int:
    from zblock.pagemem import resident_bytes as table_resident
    return table_resident([b._crc, b._unsynced, b._inflight, b._failed])


def test_large_sidecar_reopens_and_loads_only_what_holds_entries(img):
    """A 1 TiB disk's sidecar (2 GiB of table) reopens: one read returns at most 2 GiB less a
    page, and a whole read of it came back short ("sidecar is truncated"). Only the blocks
    that hold entries are loaded, so the table takes memory near the pages in use."""
    size = 1 << 40
    npages = size // PS
    with Backing.open(img, size, sparse=True) as b:
        assert np.count_nonzero(b.written_mask()) == 0
        b.write_pages([0, npages // 2, npages - 1], [page("a"), page("m"), page("z")])
    try:
        with Backing.open(img, sparse=True) as b:       # sparse: do not reserve 1 TiB
            assert b.open_state == "clean"
            assert [b.read_pages(p, 1) for p in (0, npages // 2, npages - 1)] == \
                [page("a"), page("m"), page("z")]
            assert b._loaded == [(0, 512), (npages // 2, npages // 2 + 512),
                                 (npages - 512, npages)]
            assert np.flatnonzero(b.written_mask()).tolist() == [0, npages // 2, npages - 1]
            assert _table_resident(b) < 1 << 20, _table_resident(b)  # 2.75 GiB if all
    finally:
        for p in (img, meta_path(img)):                # 2 GiB of sidecar reserved
            os.unlink(p)


def test_sidecar_without_holes_loads_only_blocks_with_entries(img):
    """A sidecar whose zeros are written out (copied without its holes; or read through the
    page cache, which SEEK_DATA then reports as data) still loads only its non-zero blocks."""
    size = 64 << 20
    with Backing.open(img, size) as b:
        b.write_pages([3, 10000], [page("a"), page("b")])
    with open(meta_path(img), "r+b") as f:       # every block of the sidecar becomes data
        raw = f.read()
        f.seek(0)
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    with Backing.open(img) as b:
        assert b._loaded == [(0, 512), (9728, 10240)]
        assert b.read_pages(3, 1) == page("a") and b.read_pages(10000, 1) == page("b")
        assert np.flatnonzero(b.written_mask()).tolist() == [3, 10000]


def test_discard_of_never_written_pages_leaves_table_and_sidecar_alone(img):
    """A discard of a whole 64 GiB disk (mkfs does it) changes the pairs of the pages that hold
    something: two sidecar blocks written, not 32768, and the table's other rows not touched."""
    writes = []

    class Counting(FileDisk):
        def pwrite(self, offset, data):
            writes.append(offset)
            super().pwrite(offset, data)

    def factory(path, role):
        return Counting(path, direct=False) if role == "meta" else FileDisk(path, direct=True)

    size = 64 << 30
    npages = size // PS
    with Backing.open(img, size, sparse=True, disk_factory=factory) as b:
        b.write_pages([1, npages - 2], [page("a"), page("z")])
        b.sync()
        del writes[:]
        before = _table_resident(b)
        b.discard(0, npages)
        assert sorted(set(writes)) == [4096, 4096 + (npages // 512 - 1) * PS], writes
        assert b.read_pages(1, 1) == b.read_pages(npages - 2, 1) == bytes(PS)
        grew = _table_resident(b) - before
        assert grew < 1 << 20, grew                     # 704 MiB if every row were written
        b.sync()
    with Backing.open(img, sparse=True) as b:           # sparse: do not reserve 64 GiB
        assert b.read_pages(1, 1) == b.read_pages(npages - 2, 1) == bytes(PS)
        assert b._loaded == []          # discarded pairs are (ZERO, ZERO): nothing to load


def test_table_scans_match_a_row_by_row_reading():
    """sidecar.used_rows and split_rows (0/1 per row, in C) against the rows read one by one,
    over empty blocks, full ones and steps that do not start on a block."""
    from zblock import pagemem
    from zblock.sidecar import split_rows, used_rows
    rows = 3 * 512 + 100
    table = pagemem.array(2 * rows, "I")
    rng = np.random.default_rng(7)
    for r in rng.choice(rows - 100, 300, replace=False).tolist() + [rows - 1]:
        d, l = rng.choice([0, 1, 2, 0xFFFFFFFF, 1 << 24, 1 << 8], 2).tolist()
        table[2 * r], table[2 * r + 1] = d, l
    for lo, hi in ((0, rows), (0, 512), (700, rows), (1100, 1101), (512, 1024)):
        pairs = [(table[2 * r], table[2 * r + 1]) for r in range(lo, hi)]
        assert used_rows(table, lo, hi) == bytes(d != 0 or l != 0 for d, l in pairs)
        assert split_rows(table, lo, hi) == bytes(d != l for d, l in pairs)


def test_sync_collapses_only_pages_not_rewritten_during_its_fsync(img):
    """Pages written while sync's data fsync runs (after its snapshot, before its collapse) keep
    both values and stay unsynced; the others, in the same sidecar block and in others, in runs
    and alone, collapse in the table and in the sidecar. Pages over more than one scan step."""
    from zblock.sidecar import SCAN_ROWS
    npages = SCAN_ROWS + 2048
    during = {}

    class Rewriting(FileDisk):
        def fsync(self):
            super().fsync()
            for p, data in during.items():
                b.write_pages([p], [data])

    def factory(path, role):
        return Rewriting(path, direct=True) if role == "data" else FileDisk(path, direct=False)

    written = [0, 1, 2, 3, 40, 41, 700, 5000, 5001, SCAN_ROWS - 1, SCAN_ROWS, SCAN_ROWS + 3,
               npages - 1]
    rewritten = [2, 41, 5000, SCAN_ROWS, npages - 1]
    with Backing.open(img, npages * PS, sparse=True, disk_factory=factory) as b:
        b.write_pages(written, [page(f"a{p}") for p in written])
        b.write_pages([9], [page("failed")])
        b._failed[9] = 1                          # as after a failed write: keeps both values
        during = {p: page(f"b{p}") for p in rewritten}
        b.sync()
        during = {}
        crc = b._crc
        split = [p for p in range(npages) if crc[2 * p] != crc[2 * p + 1]]
        assert split == sorted(rewritten + [9])
        assert b.unsynced_pages() == sorted(rewritten + [9])
        with open(meta_path(img), "rb") as f:
            f.seek(4096)
            side = memoryview(f.read(8 * npages)).cast("I")
        assert side.tolist() == crc[:2 * npages].tolist()
        for p in rewritten:
            assert b.read_pages(p, 1) == page(f"b{p}")
        b.sync()
        assert b.unsynced_pages() == [9]
    with Backing.open(img, sparse=True) as b:
        assert [b.read_pages(p, 1) for p in written] == \
            [page(f"b{p}" if p in rewritten else f"a{p}") for p in written]
