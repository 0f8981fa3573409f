"""Engine tier: several threads write the one disk at once, as they will once the FUSE front end
asks for parallel direct writes (FOPEN_PARALLEL_DIRECT_WRITES; libfuse 3.14 hands the server one
write to a file at a time, so no other test has writers race on the same pages).

Two oracles that hold whatever order the threads ran in:
  * Owned bytes. The disk is cut into segments of 1 byte .. 1 MiB and more, dealt to the writers
    in turn, so neighbouring segments share pages but no byte. A writer writes, discards and
    reads only its own bytes, so the disk must end as the writers' models put together, a writer
    must read back its own latest bytes at any time (a lost read-modify-write shows at once), and
    after its fsync the backing file must hold them.
  * Records. Writers overlap freely, in 512-byte slots that each carry (writer, sequence number,
    slot number) and a CRC. Every slot must end as the last version some writer wrote to it (zeros
    only if that was a discard), and the versions left on one page must fit one order of the
    writes (no page torn between two writes).

No mount. A small pool limit and forced memory pressure keep the writeback worker and the
shrinker writing back while the writers run, under both limit policies, with and without the C
extension, with and without the write-behind queue.
"""

from __future__ import annotations

import random
import struct
import threading
import time
import zlib

import numpy as np
import pytest

from zblock import PAGE_SIZE, compressors, limits
from zblock.store import WRITE_BEHIND_BYTES, Store
from test_store import check_consistency, make_config
from tableview import npt

MiB = 1 << 20
NWRITERS = 4
POOL_LIMIT = 64 * 1024
# Writers wait for the writeback worker once the pool is this far over its limit (limits.OVERSHOOT
# is 8 MiB, more than these disks hold): the waits before page locks are exercised too.
OVERSHOOT = 32 * 1024
JOIN_TIMEOUT = 40.0


@pytest.fixture(params=["c", "python-lz4"])
def lz4(request, monkeypatch):
    """Software lz4 through the C extension, or through python-lz4 and numpy (as without gcc)."""
    if request.param == "c":
        if compressors._lz4pages is None:
            pytest.skip("zblock._lz4pages is not built here, or ZBLOCK_NO_EXTENSION=1")
    else:
        monkeypatch.setattr(compressors, "_lz4pages", None)
    return request.param


def open_store(path: str, size: int, lz4: str, **kw) -> Store:
    store = Store.open(path, size, make_config(**kw.pop("config")), **kw)
    uses_c = store.cache.registry.current.contexts._contexts[0].tfm.compressor._c is not None
    assert uses_c is (lz4 == "c")
    return store


def run_threads(targets, timeout: float = JOIN_TIMEOUT) -> None:
    """Run each callable on a thread of its own, released together; re-raise the first exception.
    A thread still running after `timeout` s fails the test (a deadlock or a starved writer)."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(targets))

    def run(fn):
        try:
            start.wait(timeout)
            fn()
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=run, args=(fn,), name=f"writer-{i}", daemon=True)
               for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"still running after {timeout:.0f} s: {stuck}"
    if errors:
        raise errors[0]


def page_mix(rng: random.Random, n: int) -> bytes:
    """n bytes of one kind: random (incompressible), text, zeros or a repeated word (same-filled
    when they cover a page)."""
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(n)
    if kind == 1:
        words = b"".join(rng.choice([b"swap ", b"page ", b"zblock ", b"kernel "])
                         for _ in range(32))
        return (words * (n // len(words) + 1))[:n]
    if kind == 2:
        return bytes(n)
    return (rng.randbytes(8) * (n // 8 + 1))[:n]


def read_backing(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# owned bytes


def deal_segments(rng: random.Random) -> tuple[int, list[list[tuple[int, int]]]]:
    """(disk size, each writer's segments [start, end)). Segment i is writer i % NWRITERS's: first
    a hot zone of segments shorter than a page (four writers' bytes on most of its pages), then
    runs of whole pages (stores of 8-60 KiB and write-behind requests) and segments holding a
    1 MiB aligned request, at unaligned offsets."""
    lengths = []
    while sum(lengths) < 384 * 1024:
        lengths.append(rng.randrange(1, 700) if rng.random() < 0.7 else
                       rng.randrange(700, 3 * PAGE_SIZE))
    for _ in range(NWRITERS):
        lengths += [rng.randrange(3 * PAGE_SIZE, 80 * 1024), rng.randrange(1, 3000),
                    MiB + rng.randrange(PAGE_SIZE, 8 * PAGE_SIZE)]
    lengths.append(-sum(lengths) % PAGE_SIZE or PAGE_SIZE)
    segs: list[list[tuple[int, int]]] = [[] for _ in range(NWRITERS)]
    pos = 0
    for i, n in enumerate(lengths):
        segs[i % NWRITERS].append((pos, pos + n))
        pos += n
    return pos, segs


def owned_writer(store: Store, backing_path: str, model: bytearray, segs, rng: random.Random,
                 nops: int):
    """A writer that touches only the bytes of its segments and keeps their model up to date."""
    pages_of = [(-(-a // PAGE_SIZE), b // PAGE_SIZE) for a, b in segs]    # whole pages inside
    with_pages = [i for i, (p0, p1) in enumerate(pages_of) if p1 > p0]
    big = [i for i, (p0, p1) in enumerate(pages_of) if p1 - p0 >= 256]
    own_pages = np.concatenate([np.arange(p0, p1) for p0, p1 in pages_of if p1 > p0])

    def write(off: int, data: bytes) -> None:
        assert store.write(off, data) == len(data)
        model[off:off + len(data)] = data

    def sub_range(a: int, b: int) -> tuple[int, int]:
        lo = rng.randrange(a, b)
        return lo, rng.randrange(lo + 1, b + 1)

    def fsync_and_check() -> None:
        store.fsync()
        # what this writer wrote has reached the file, and its own pages are clean: nobody else
        # writes these bytes, so nothing may have put older ones back
        on_file = read_backing(backing_path)
        for a, b in segs:
            assert on_file[a:b] == model[a:b], f"after fsync the file differs in {a}..{b}"
        with store.cache.tree_lock:
            dirty = own_pages[npt(store.cache.table).dirty[own_pages]]
        assert not len(dirty), f"pages {dirty[:5]} still dirty after fsync"

    def run():
        for _ in range(nops):
            r = rng.random()
            a, b = segs[rng.randrange(len(segs))]
            if r < 0.40:                        # any bytes of a segment: partial pages
                lo, hi = sub_range(a, b)
                write(lo, page_mix(rng, hi - lo))
            elif r < 0.52:
                write(a, page_mix(rng, b - a))
            elif r < 0.66:                      # whole pages: one (the 4 KiB path) or a run
                p0, p1 = pages_of[rng.choice(with_pages)]
                p = rng.randrange(p0, p1)
                n = 1 if rng.random() < 0.6 else rng.randrange(1, p1 - p + 1)
                write(p * PAGE_SIZE, page_mix(rng, n * PAGE_SIZE))
            elif r < 0.70 and big:              # a 1 MiB request, aligned
                p0, p1 = pages_of[rng.choice(big)]
                p = rng.randrange(p0, p1 - 255)
                write(p * PAGE_SIZE, page_mix(rng, MiB))
            elif r < 0.85:
                lo, hi = sub_range(a, b)
                assert store.read(lo, hi - lo) == model[lo:hi], \
                    f"read of own bytes {lo}..{hi} differs from what this writer wrote"
            elif r < 0.99:
                lo, hi = sub_range(a, b)
                store.discard(lo, hi - lo)
                model[lo:hi] = bytes(hi - lo)
            else:
                fsync_and_check()
        fsync_and_check()
    return run


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["evict", "zswap"])
def test_writers_on_interleaved_bytes_of_shared_pages(tmp_path, monkeypatch, lz4, policy):
    """Four writers, each on its own bytes of pages they share, with every write path (partial
    pages, one page, 8-60 KiB, 1 MiB, discards, fsync) while the pool writes back: every
    writer reads its latest bytes back at once, the file holds them after its fsync, and the
    disk ends as the models put together, before and after a reopen."""
    monkeypatch.setattr(limits, "OVERSHOOT", OVERSHOOT)
    rng = random.Random(f"{policy}-{lz4}")
    size, segs = deal_segments(rng)
    path = str(tmp_path / "disk.img")
    cfg = dict(pool_limit=POOL_LIMIT, limit_policy=policy, accept_threshold=50,
               shrinker_enabled=False)
    store = open_store(path, size, lz4, config=cfg)
    model = bytearray(size)
    try:
        run_threads([owned_writer(store, path, model, segs[w], random.Random(rng.random()), 500)
                     for w in range(NWRITERS)])
        assert store.read(0, size) == model
        st = store.stats()
        assert st["pool_limit_hit"] > 0 and st["written_back_pages"] > 0
        assert st["discarded_pages"] > 0
        check_consistency(store)
        store.close()
        store = open_store(path, None, lz4, config=cfg)
        assert store.read(0, size) == model
    finally:
        store.close()
    assert read_backing(path) == model


# ---------------------------------------------------------------------------------------------
# records

SLOT = 512
SLOTS_PER_PAGE = PAGE_SIZE // SLOT
MAGIC = b"ZBPW"
HEAD = struct.Struct("<4sBBHIII")       # magic, writer, body kind, 0, seq, slot, crc
CRC_AT = 16
HEAD_DTYPE = np.dtype({"names": ["magic", "writer", "seq", "slot", "crc"],
                       "formats": ["S4", "u1", "<u4", "<u4", "<u4"],
                       "offsets": [0, 4, 8, 12, CRC_AT], "itemsize": SLOT})
RECORD_PAGES = 1024                     # a 4 MiB disk
HOT_PAGES = 256                         # where the small writes go: most pages see every writer
ROUNDS = 6
ROUND_OPS = 150


class RecordWriter:
    """One writer's records and what it did last to each slot: `last[s]` the seq of its last
    write or discard of slot s (-1: never), `zeroed[s]` True if that was a discard,
    `last_round[s]` the round it was in; `cover[seq]` the slots [first, end) and the round of a
    write. Rounds are separated by joins: everything in a round came after every earlier round."""

    def __init__(self, store: Store, w: int, seed):
        self.store = store
        self.w = w
        self.rng = random.Random(seed)
        self.seq = 0
        self.round = 0
        nslots = RECORD_PAGES * SLOTS_PER_PAGE
        self.last = np.full(nslots, -1, np.int64)
        self.last_round = np.full(nslots, -1, np.int64)
        self.zeroed = np.zeros(nslots, np.bool_)
        self.cover: dict[int, tuple[int, int, int]] = {}

    def records(self, s0: int, s1: int) -> bytes:
        """Slots s0 .. s1 as this writer's next write: random, text or zero bodies (the pages
        go raw or to disk, compress well, or nearly same-filled)."""
        self.seq += 1
        n = (s1 - s0) * SLOT
        kind = self.rng.randrange(3)
        if kind == 0:
            buf = bytearray(self.rng.randbytes(n))
        elif kind == 1:
            text = f" writer {self.w} wrote {self.seq}".encode()
            buf = bytearray((text * (n // len(text) + 1))[:n])
        else:
            buf = bytearray(n)
        mv = memoryview(buf)
        for i, s in enumerate(range(s0, s1)):
            o = i * SLOT
            HEAD.pack_into(buf, o, MAGIC, self.w, kind, 0, self.seq, s, 0)
            struct.pack_into("<I", buf, o + CRC_AT, zlib.crc32(mv[o:o + SLOT]))
        self.last[s0:s1] = self.seq
        self.last_round[s0:s1] = self.round
        self.zeroed[s0:s1] = False
        self.cover[self.seq] = (s0, s1, self.round)
        return bytes(buf)

    def write_slots(self, s0: int, s1: int) -> None:
        data = self.records(s0, s1)
        assert self.store.write(s0 * SLOT, data) == len(data)

    def discard_slots(self, s0: int, s1: int) -> None:
        self.seq += 1
        self.store.discard(s0 * SLOT, (s1 - s0) * SLOT)
        self.last[s0:s1] = self.seq
        self.last_round[s0:s1] = self.round
        self.zeroed[s0:s1] = True

    def run(self, nops: int) -> None:
        rng = self.rng
        hot = HOT_PAGES * SLOTS_PER_PAGE
        for _ in range(nops):
            r = rng.random()
            if r < 0.28:                    # one page, aligned: the 4 KiB path
                s = rng.randrange(HOT_PAGES) * SLOTS_PER_PAGE
                self.write_slots(s, s + SLOTS_PER_PAGE)
            elif r < 0.50:                  # part of one page: read-modify-write
                s = rng.randrange(hot)
                page_end = (s // SLOTS_PER_PAGE + 1) * SLOTS_PER_PAGE
                self.write_slots(s, rng.randrange(s + 1, page_end + 1) if s % SLOTS_PER_PAGE
                                 else rng.randrange(s + 1, page_end))
            elif r < 0.60:                  # across pages: partial head and tail, whole middle
                s = rng.randrange(hot - 80)
                self.write_slots(s, s + rng.randrange(9, 80))
            elif r < 0.69:                  # 8-60 KiB of whole pages: stored at once
                p = rng.randrange(HOT_PAGES - 15)
                self.write_slots(p * SLOTS_PER_PAGE, (p + rng.randrange(2, 16)) * SLOTS_PER_PAGE)
            elif r < 0.75:                  # 1 MiB: aligned, or partial at its ends
                s = rng.randrange(0, (RECORD_PAGES - 257) * SLOTS_PER_PAGE)
                if rng.random() < 0.6:
                    s -= s % SLOTS_PER_PAGE
                self.write_slots(s, s + 256 * SLOTS_PER_PAGE)
            elif r < 0.80:
                s = rng.randrange(hot - 40)
                self.discard_slots(s, s + rng.randrange(1, 40))
            elif r < 0.98:                  # a read never sees a torn slot
                s = rng.randrange(RECORD_PAGES * SLOTS_PER_PAGE - 64)
                n = rng.randrange(1, 64)
                bad = check_slots(self.store.read(s * SLOT, n * SLOT), s)
                assert not bad, f"read of slots {s}..{s + n}: {bad}"
            else:
                self.store.fsync()


def check_slots(data: bytes, first: int) -> list[str]:
    """Problems with slots first .. (in `data`): each must be zeros or a whole record of its
    own slot."""
    recs = np.frombuffer(data, HEAD_DTYPE)
    zero = ~np.frombuffer(data, np.uint8).reshape(-1, SLOT).any(axis=1)
    bad = []
    for i in np.flatnonzero(~zero).tolist():
        raw = bytearray(data[i * SLOT:(i + 1) * SLOT])
        raw[CRC_AT:CRC_AT + 4] = bytes(4)
        if recs["magic"][i] != MAGIC or recs["slot"][i] != first + i or \
                zlib.crc32(raw) != recs["crc"][i]:
            bad.append(f"slot {first + i} torn or misplaced")
    return bad[:5]


def check_records(data: bytes, writers: list[RecordWriter]) -> None:
    """The disk against the writers' records, whatever order they ran in within a round: each
    slot holds the last version one of them wrote or discarded there in the latest round that
    touched it, and on each page the versions left fit one order of the writes."""
    assert not check_slots(data, 0), check_slots(data, 0)
    recs = np.frombuffer(data, HEAD_DTYPE)
    zero = ~np.frombuffer(data, np.uint8).reshape(-1, SLOT).any(axis=1)
    last = np.stack([w.last for w in writers])
    zeroed = np.stack([w.zeroed for w in writers])
    rounds = np.stack([w.last_round for w in writers])
    # the writers whose last version of a slot may have won it: those of its latest round
    may_win = (rounds == rounds.max(axis=0)) & (last >= 0)
    who = recs["writer"].astype(np.int64)
    idx = np.arange(len(recs))
    written = ~zero
    assert (who[written] < len(writers)).all()
    w, i = who[written], idx[written]
    ok = np.ones(len(recs), np.bool_)
    ok[written] = may_win[w, i] & (last[w, i] == recs["seq"][written]) & ~zeroed[w, i]
    ok[zero] = (last[:, zero] < 0).all(axis=0) | (may_win & zeroed)[:, zero].any(axis=0)
    bad = np.flatnonzero(~ok)[:5].tolist()
    assert not bad, "slots not the last version of any writer: " + "; ".join(
        f"slot {s} holds " + ("zeros" if zero[s] else f"writer {who[s]} seq {recs['seq'][s]}")
        + f", last versions {last[:, s].tolist()}" for s in bad)
    for p in range(len(recs) // SLOTS_PER_PAGE):
        s0 = p * SLOTS_PER_PAGE
        won = {s: (int(who[s]), int(recs["seq"][s])) for s in range(s0, s0 + SLOTS_PER_PAGE)
               if written[s]}
        if len(set(won.values())) > 1:
            assert one_order(won, writers), f"page {p} torn between writes: {won}"


def one_order(won: dict[int, tuple[int, int]], writers: list[RecordWriter]) -> bool:
    """True if some order of the writes that left a version on a page gives the page what it
    holds (`won`: slot -> (writer, seq)). A write covering a slot another one won came before
    it; a writer's writes came in its order, and rounds in theirs. Such an order exists iff
    these edges have no cycle."""
    nodes = set(won.values())
    after: dict[tuple[int, int], set] = {n: set() for n in nodes}
    for s, v in won.items():
        for u in nodes:
            c0, c1, _ = writers[u[0]].cover[u[1]]
            if u != v and c0 <= s < c1:
                after[u].add(v)
    for u in nodes:
        for v in nodes:
            if (u[0] == v[0] and u[1] < v[1]) or \
                    writers[u[0]].cover[u[1]][2] < writers[v[0]].cover[v[1]][2]:
                after[u].add(v)
    indegree = {n: 0 for n in nodes}
    for u in nodes:
        for v in after[u]:
            indegree[v] += 1
    ready = [n for n in nodes if not indegree[n]]
    seen = 0
    while ready:
        u = ready.pop()
        seen += 1
        for v in after[u]:
            indegree[v] -= 1
            if not indegree[v]:
                ready.append(v)
    return seen == len(nodes)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy, incompressible, write_behind, lz4", [
    ("evict", "store_raw", WRITE_BEHIND_BYTES, "c"),
    ("zswap", "reject", WRITE_BEHIND_BYTES, "python-lz4"),
    ("evict", "reject", 0, "python-lz4"),
    ("zswap", "store_raw", 0, "c"),
], indirect=["lz4"])
def test_overlapping_writes_leave_whole_last_versions(tmp_path, monkeypatch, policy,
                                                      incompressible, write_behind, lz4):
    """Four writers overlap on the same pages with every kind of write (4 KiB, partial pages,
    8-60 KiB, 1 MiB over 4 KiB ones), discards, reads and fsync, while the writeback worker and
    the shrinker write back. After each of six rounds no slot is torn, each holds a last version
    and every page fits one order of the writes; the same after a reopen and in the file."""
    monkeypatch.setattr(limits, "OVERSHOOT", OVERSHOOT)
    path = str(tmp_path / "disk.img")
    # write-through on in the evict rows (one with the write-behind queue, one without)
    cfg = dict(pool_limit=POOL_LIMIT, limit_policy=policy, accept_threshold=50,
               incompressible_policy=incompressible, write_through=policy == "evict")
    # always under memory pressure: the shrinker runs between the limit's writebacks
    store = open_store(path, RECORD_PAGES * PAGE_SIZE, lz4, config=cfg,
                       memory_pressure=lambda: True, write_behind=write_behind)
    writers = [RecordWriter(store, w, f"{policy}-{write_behind}-{w}") for w in range(NWRITERS)]
    try:
        for r in range(ROUNDS):
            for w in writers:
                w.round = r
            run_threads([lambda w=w: w.run(ROUND_OPS) for w in writers])
            check_records(store.read(0, RECORD_PAGES * PAGE_SIZE), writers)
        st = store.stats()
        assert st["pool_limit_hit"] > 0 and st["written_back_pages"] > 0
        check_consistency(store)
        store.close()
        store = open_store(path, None, lz4, config=cfg, write_behind=write_behind)
        check_records(store.read(0, RECORD_PAGES * PAGE_SIZE), writers)
    finally:
        store.close()
    check_records(read_backing(path), writers)


# ---------------------------------------------------------------------------------------------
# writers waiting for pool space


class HeldBacking:
    """Wraps a Backing: while `held` is clear, a write_pages (the writeback worker's) waits for
    it, so the pool cannot shrink."""

    def __init__(self, inner):
        self.inner = inner
        self.held = threading.Event()
        self.writing = threading.Event()

    def write_pages(self, idxs, pages):
        self.writing.set()
        assert self.held.wait(JOIN_TIMEOUT), "the test never let the disk write go on"
        return self.inner.write_pages(idxs, pages)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.timeout(60)
def test_writers_waiting_for_space_do_not_wake_each_other(tmp_path, monkeypatch):
    """Four writers wait for pool space while the writeback worker is held in a disk write: they
    sleep until it makes room, instead of each waiter's request to the worker waking the other
    waiters, who then ask again (a storm that took the GIL from the worker it waited for). Once
    the disk goes on, every write lands."""
    from zblock.backing import Backing
    monkeypatch.setattr(limits, "OVERSHOOT", OVERSHOOT)
    backing = HeldBacking(Backing.open(str(tmp_path / "disk.img"), 4 * MiB))
    store = Store(backing, make_config(pool_limit=POOL_LIMIT, shrinker_enabled=False),
                  write_behind=0)
    rng = random.Random(5)
    try:
        fill = rng.randbytes(64 * PAGE_SIZE)        # incompressible: 64 pages held raw
        store.write(0, fill)
        assert backing.writing.wait(10), "the pool went over its limit: writeback should start"
        c = store.cache
        with c.tree_lock:
            assert npt(c.table).pool_total_size >= POOL_LIMIT + OVERSHOOT
        notified = []
        waiting = set()
        all_waiting = threading.Event()
        real_notify, real_wait = c.wb_cond.notify_all, c.wb_cond.wait

        def wait(timeout=None):
            waiting.add(threading.get_ident())
            if len(waiting) == NWRITERS:
                all_waiting.set()
            return real_wait(timeout)
        monkeypatch.setattr(c.wb_cond, "notify_all", lambda: notified.append(1) or real_notify())
        monkeypatch.setattr(c.wb_cond, "wait", wait)
        pages = [rng.randbytes(PAGE_SIZE) for _ in range(NWRITERS)]
        writers = [threading.Thread(target=store.write, args=((100 + w) * PAGE_SIZE, pages[w]),
                                    daemon=True) for w in range(NWRITERS)]
        for t in writers:
            t.start()
        assert all_waiting.wait(10), "the writers should wait for pool space"
        time.sleep(0.2)             # a storm needs no more than this to show
        storm = len(notified)
        backing.held.set()
        for t in writers:
            t.join(JOIN_TIMEOUT)
        assert not any(t.is_alive() for t in writers)
        # each writer's store asks the worker (the pool is over its limit), and the first waiter
        # once more: a handful, not the tens of thousands of a storm
        assert storm <= 2 * NWRITERS, f"{storm} wake-ups while the worker was held"
        for w in range(NWRITERS):
            assert store.read((100 + w) * PAGE_SIZE, PAGE_SIZE) == pages[w]
        assert store.read(0, len(fill)) == fill
        assert store.stats()["written_back_pages"] > 0
        check_consistency(store)
    finally:
        backing.held.set()
        store.close()


def test_a_range_of_pages_takes_the_same_locks_in_the_same_order_as_its_pages_one_by_one():
    """PageLocks cuts a range's locks from the stripe list (wrapping past the last stripe, or all
    of them): the same locks, in the same ascending order, as the set of its pages gives."""
    from zblock.cache import PageLocks
    for stripe_pages in (1, 4):
        locks = PageLocks(16, stripe_pages)
        for start in range(0, 40 * stripe_pages):
            for count in (0, 1, 5, 15, 16, 17, 40, 64, 65, 70):
                by_range = locks._ordered(range(start, start + count))
                by_pages = locks._ordered(list(range(start, start + count)))
                assert by_range == by_pages, (stripe_pages, start, count)
            assert locks.hold_one(start) is locks._ordered([start])[0]
            # the pages before the wrap take the start's stripe and every one above it
            own = locks._locks.index(locks.hold_one(start))
            left = locks.pages_before_wrap(start)
            assert locks._ordered(range(start, start + left)) == locks._locks[own:], start
            assert locks._ordered(range(start, start + left + 1))[0] is locks._locks[0]
    busy = []

    def other(locks):                           # which stripes another thread cannot take
        for i, lk in enumerate(locks._locks):
            if lk.acquire(blocking=False):
                lk.release()
            else:
                busy.append(i)

    # the first two wrap (the top stripes and the first ones); the last two take one stripe
    for locks, pages, stripes in ((PageLocks(16, 1), range(14, 19), [0, 1, 2, 14, 15]),
                                  (PageLocks(16, 4), range(59, 70), [0, 1, 14, 15]),
                                  (PageLocks(16, 4), range(60, 64), [15]),
                                  (PageLocks(16, 4), (9,), [2])):
        with locks.hold(pages):
            t = threading.Thread(target=other, args=(locks,))
            t.start()
            t.join(10)
        assert busy == stripes
        busy.clear()
        other(locks)
        assert busy == []                       # all given back
