"""Crash consistency by kill points, not timing (DESIGN "Data semantics", "On-disk format").

Engine tier: a Store over CrashDisks (tests/faultdisk.py) runs a seeded workload of writes
(whole pages, partial pages, incompressible pages), discards, explicit writebacks, fsyncs and a
final close, while a CrashPlan counts every write, fsync and punch of the data file and its
sidecar together.
A dry run counts the operations (T); then for many N the same workload stops at operation N
and the files are left as one of three crashes would leave them:

    kill      the process died; what reached the files stays (the page cache outlives it)
    power     everything not fsynced is lost: each file back to its state at its own last fsync
    volatile  a disk with a volatile cache: each unsynced page (data and sidecar blocks alike)
              independently any version written since the last fsync, or the synced one

A new Store then opens the backing file and every page is checked against the model: a page not
written since the last completed fsync reads exactly; any other page reads as its durable bytes,
one of the versions written since, or fails with EIO (DataError) - never anything else.

Mount tier (one variant): a real server started with a ZBLOCK_TEST_FAULTS crash rule dies at the
N-th disk operation after a power cut (tests/faultserver.py, ExitingCrashPlan); a new mount of the
backing file obeys the same rule.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from zblock import PAGE_SIZE
from zblock.config import Config
from faultdisk import Crash, CrashDisk, CrashPlan
from test_store import write_key
from zblock.disk import FileDisk
from zblock.errors import DataError, ZblockError
from zblock.store import Store

NPAGES = 96
SIZE = NPAGES * PAGE_SIZE


# ---------------------------------------------------------------------------------------------
# the workload and its model


def page_content(page: int, version: int, kind: int) -> bytes:
    """Self-describing page: compressible text, or incompressible random bytes (kind 1)."""
    head = f"page {page} version {version} ".encode()
    if kind == 1:
        body = random.Random(page * 1_000_003 + version).randbytes(PAGE_SIZE - len(head))
    else:
        body = (f"zblock crash test {version % 97} " * 300).encode()[:PAGE_SIZE - len(head)]
    assert len(head) + len(body) == PAGE_SIZE
    return head + body


def make_workload(seed: int, nops: int = 40) -> list[tuple]:
    rng = random.Random(seed)
    ops: list[tuple] = []
    for _ in range(nops):
        r = rng.random()
        if r < 0.50:
            n = rng.choice([1, 1, 2, 4, 9, 17])
            start = rng.randrange(0, NPAGES - n + 1)
            ops.append(("write", start, n, rng.randrange(3)))
        elif r < 0.62:
            length = rng.randrange(1, 2 * PAGE_SIZE)
            off = rng.randrange(0, SIZE - length)
            ops.append(("partial", off, length, rng.randrange(256)))
        elif r < 0.68:
            n = rng.randrange(1, 6)
            ops.append(("discard", rng.randrange(0, NPAGES - n + 1), n))
        elif r < 0.80:
            ops.append(("shrink",))
        else:
            ops.append(("fsync",))
    ops.append(("close",))
    return ops


class Model:
    """Per page: `durable` (as of the last completed fsync), `since` (every version written
    since, the one in flight included) and `current`."""

    def __init__(self):
        zero = bytes(PAGE_SIZE)
        self.durable = [zero] * NPAGES
        self.current = [zero] * NPAGES
        self.since: list[list[bytes]] = [[] for _ in range(NPAGES)]

    def put(self, page: int, data: bytes) -> None:
        self.current[page] = data
        self.since[page].append(data)

    def synced(self) -> None:
        self.durable = list(self.current)
        self.since = [[] for _ in range(NPAGES)]


def run_workload(store: Store, ops: list[tuple], model: Model) -> None:
    """Apply ops to the store, recording each new version in the model BEFORE the call, so
    that an operation cut short by the crash is covered. fsync/close count only on return."""
    version = 0
    for op in ops:
        kind = op[0]
        if kind == "write":
            _, start, n, k = op
            pages = []
            for p in range(start, start + n):
                version += 1
                pages.append(page_content(p, version, 1 if k == 1 else 0))
                model.put(p, pages[-1])
            store.write(start * PAGE_SIZE, b"".join(pages))
        elif kind == "partial":
            _, off, length, fill = op
            data = bytes([fill]) * length
            for p in range(off // PAGE_SIZE, (off + length - 1) // PAGE_SIZE + 1):
                page = bytearray(model.current[p])
                lo, hi = max(off, p * PAGE_SIZE), min(off + length, (p + 1) * PAGE_SIZE)
                page[lo - p * PAGE_SIZE:hi - p * PAGE_SIZE] = data[lo - off:hi - off]
                model.put(p, bytes(page))
            store.write(off, data)
        elif kind == "discard":
            _, start, n = op
            for p in range(start, start + n):
                model.put(p, bytes(PAGE_SIZE))
            store.discard(start * PAGE_SIZE, n * PAGE_SIZE)
        elif kind == "shrink":
            store.cache.check_worker()
            if not store.cache.writeback.shrink(0):
                raise ZblockError("writeback failed")
        elif kind == "fsync":
            store.fsync()
            model.synced()
        elif kind == "close":
            store.close()
            model.synced()


def check_pages(store: Store, model: Model) -> dict:
    """Every page against the crash rule. Returns counts of how pages read."""
    seen = {"exact": 0, "old": 0, "new": 0, "eio": 0}
    for p in range(NPAGES):
        try:
            got = store.read(p * PAGE_SIZE, PAGE_SIZE)
        except DataError:
            got = None
        if not model.since[p]:
            assert got == model.durable[p], f"page {p} was synced and not rewritten: " \
                                            f"{'EIO' if got is None else got[:40]!r}"
            seen["exact"] += 1
        elif got is None:
            seen["eio"] += 1
        elif got == model.durable[p]:
            seen["old"] += 1
        else:
            assert got in model.since[p], f"page {p}: neither its old bytes nor a version " \
                                          f"written since: {got[:40]!r}"
            seen["new"] += 1
    return seen


# ---------------------------------------------------------------------------------------------
# one run


def crash_factory(plan: CrashPlan):
    def factory(path, role):
        return CrashDisk(FileDisk(path, direct=role == "data"), plan)
    return factory


def config_for(variant: str, key_dir: str) -> Config:
    """`key_dir`: where the encrypt variant keeps its key file."""
    cfg = Config()
    cfg.shrinker_enabled = False
    cfg.contexts = 2
    if variant in ("evict", "write-through", "encrypt"):  # the writeback worker runs whenever
        cfg.pool_limit = 24 * PAGE_SIZE                   # the tiny pool is full
        cfg.limit_policy = "evict"
        cfg.write_through = variant == "write-through"
        if variant == "encrypt":    # the seal file is a third disk the crash journals
            cfg.encrypt = True
            cfg.key_file = os.path.join(key_dir, "key")
            if not os.path.exists(cfg.key_file):
                write_key(key_dir)
    else:                            # full pool and incompressible pages go straight to disk
        cfg.pool_limit = 16 * PAGE_SIZE
        cfg.limit_policy = "zswap"
        cfg.accept_threshold = 50
        cfg.incompressible_policy = "reject"
    return cfg


def abandon(store: Store) -> None:
    """What a dead process leaves: no write-back, no clean flag; only its fds and flock go.
    (store.close() would wait for pages the dead writeback worker left marked under writeback.)"""
    store._closed = True
    try:
        store.cache.close(write_back=False)
    finally:
        store.backing.close(clean=False)


def one_run(path: str, ops, variant: str, stop_at: int | None, mode: str, seed: int):
    """Run to the crash point (or the end), crash in `mode`, reopen and check.
    Returns (operations counted, crashed?, page counts)."""
    for p in (path, path + ".zbmeta", path + ".zbseal"):
        if os.path.exists(p):
            os.unlink(p)
    plan = CrashPlan(None)
    model = Model()
    key_dir = os.path.dirname(path)
    store = Store.open(path, SIZE, config_for(variant, key_dir), disk_factory=crash_factory(plan))
    opened = plan.count          # kill points count from here: the workload, not the creation
    if stop_at is not None:
        plan.stop_at = opened + stop_at
    try:
        run_workload(store, ops, model)
    except (Crash, ZblockError):
        assert plan.crashed, "an error before any crash point"
    finally:
        if not plan.crashed:
            store.close()
        else:
            abandon(store)
    crashed = plan.crashed
    if mode == "power":
        plan.cut_power()
    elif mode == "volatile":
        plan.cut_power(random.Random(seed))
    reopened = Store.open(path, None, config_for(variant, key_dir))
    try:
        counts = check_pages(reopened, model)
    finally:
        reopened.close()
    return plan.count - opened, crashed, counts


def kill_points(total: int, want: int) -> list[int]:
    """Up to `want` crash points spread over 1..total (all of them when total is small)."""
    if total <= want:
        return list(range(1, total + 1))
    step = total / want
    return sorted({int(1 + i * step) for i in range(want)} | {1, total})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant,mode,seed", [
    ("evict", "power", 1),
    ("zswap", "power", 2),
    ("evict", "volatile", 3),
    ("zswap", "kill", 4),
    ("zswap", "volatile", 5),
    ("evict", "kill", 6),
    ("write-through", "power", 7),
    ("write-through", "volatile", 8),
    ("encrypt", "power", 9),
    ("encrypt", "volatile", 10),
])
def test_crash_at_every_kill_point(tmp_path, variant, mode, seed):
    path = str(tmp_path / "disk.img")
    ops = make_workload(seed)
    total, crashed, counts = one_run(path, ops, variant, None, mode, seed)
    assert not crashed and total > 20, f"dry run counted only {total} disk operations"
    assert counts["exact"] == NPAGES        # no crash: everything exact after the clean close
    tally = {"exact": 0, "old": 0, "new": 0, "eio": 0}
    points = kill_points(total, 150)
    reached = 0
    t0 = time.monotonic()
    for n in points:
        _, crashed, counts = one_run(path, ops, variant, n, mode, seed * 1000 + n)
        # the evict variant's writeback worker is asynchronous: a run may do a few disk
        # operations fewer than the dry run, so its last points may not be reached
        reached += crashed
        for k, v in counts.items():
            tally[k] += v
    elapsed = time.monotonic() - t0
    print(f"\n{variant}/{mode}: {reached} of {len(points)} kill points reached ({total} ops) "
          f"in {elapsed:.1f} s; pages read {tally}")
    assert reached >= len(points) * 0.9
    # the model must have been exercised on both sides of the rule
    assert tally["exact"] > 0 and tally["old"] + tally["new"] > 0


def test_sidecar_and_data_tear_apart(tmp_path):
    """A crash between the sidecar write and the data write of one page (the tightest spot):
    stop at each operation of one write+fsync+rewrite sequence, power cut, check."""
    path = str(tmp_path / "disk.img")
    ops = [("write", 0, 4, 0), ("shrink",), ("fsync",), ("write", 2, 4, 1), ("shrink",),
           ("write", 0, 1, 0), ("shrink",), ("fsync",), ("write", 3, 1, 0), ("shrink",), ("close",)]
    total, _, _ = one_run(path, ops, "evict", None, "power", 0)
    for n in range(1, total + 1):
        for mode in ("power", "volatile", "kill"):
            one_run(path, ops, "evict", n, mode, n)


# ---------------------------------------------------------------------------------------------
# mount tier: a real server killed at a disk operation, with a power cut


@pytest.mark.mount
@pytest.mark.timeout(240)
def test_mount_crash_rule(tmp_path, monkeypatch):
    import mountutil
    import faultserver

    mountutil.require_mounts()
    rules = str(tmp_path / "faults.json")
    rng = random.Random(7)
    npages = 512                                # 2 MiB disk, 256 KiB pool: writeback runs
    base = [page_content(p, 1, p % 3 == 1) for p in range(npages)]
    monkeypatch.setenv(faultserver.ENV_FAULTS, rules)
    workdir = mountutil.new_workdir("crash")
    try:
        backing = os.path.join(workdir, "backing.img")
        for stop_at in (5, 150, 600):
            for p in (backing, backing + ".zbmeta"):
                if os.path.exists(p):
                    os.unlink(p)
            # a healthy first mount writes the durable base image and unmounts cleanly
            faultserver.write_rules(rules, [])
            m = mountutil.Mount(size=str(npages * PAGE_SIZE), backing=backing, workdir=workdir,
                                pool_limit="256K", shrinker="N", faults=True)
            with m:
                fd = os.open(m.disk, os.O_RDWR)
                try:
                    os.pwrite(fd, b"".join(base), 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            # second mount: dies at its stop_at-th disk operation, after a power cut
            faultserver.write_rules(rules, [], crash={"stop_at": stop_at, "power_cut": True})
            m = mountutil.Mount(size=None, backing=backing, workdir=workdir, pool_limit="256K",
                                shrinker="N", faults=True)
            since: dict[int, list[bytes]] = {}
            durable = list(base)
            synced_ok = False
            m.start()
            try:
                fd = os.open(m.disk, os.O_RDWR)
                try:
                    for rnd in range(12):             # ends when the server dies
                        for p in rng.sample(range(npages), 200):
                            data = page_content(p, 10 + rnd, p % 3 == 1)
                            since.setdefault(p, []).append(data)
                            os.pwrite(fd, data, p * PAGE_SIZE)
                        os.fsync(fd)
                        for p, vs in since.items():
                            durable[p] = vs[-1]
                        since = {}
                        synced_ok = True
                except OSError:
                    pass                        # the server died under us: ENOTCONN and such
                finally:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                mountutil.wait_for(lambda: not os.path.exists(f"/proc/{m.pid}") or
                                   open(f"/proc/{m.pid}/stat").read().split()[2] == "Z",
                                   30, "the server to die at its crash point")
                from zblock import runtime
                with open(runtime.log_file(m.mountpoint)) as f:
                    assert "test crash point reached" in f.read(), "the server died of something else"
            finally:
                m.cleanup(remove=False)
            # a third, healthy mount reads every page by the crash rule
            faultserver.write_rules(rules, [])
            m = mountutil.Mount(size=None, backing=backing, workdir=workdir, faults=True)
            with m:
                fd = os.open(m.disk, os.O_RDONLY)
                try:
                    for p in range(npages):
                        try:
                            got = os.pread(fd, PAGE_SIZE, p * PAGE_SIZE)
                        except OSError as e:
                            assert p in since, f"stop_at {stop_at}: synced page {p} fails: {e}"
                            continue
                        if p not in since:
                            assert got == durable[p], f"stop_at {stop_at}: synced page {p} differs"
                        else:
                            assert got == durable[p] or got in since[p], \
                                f"stop_at {stop_at}: page {p} is neither old nor new"
                finally:
                    os.close(fd)
            print(f"stop_at {stop_at}: a fsync completed before the crash: {synced_ok}, "
                  f"pages written since: {len(since)}")
    finally:
        mountutil.cleanup_dir(workdir)
