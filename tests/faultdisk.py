"""Fault and crash layers for disks, stacked under a real zblock Backing (tests only).

Each layer wraps a disk (zblock.disk.FileDisk or another layer) and has its interface (`size`,
`pread`, `pwrite`, `pwritev`, `fsync`, `punch`, `zero_range`, `prealloc`, `truncate`, `close`),
so a test passes `disk_factory=lambda path, role: FaultyDisk(FileDisk(path))` to Backing.open:

- `FaultyDisk` scripted errors (EIO, ENOSPC, ...) on the N-th read/write/fsync/punch or on any
               operation touching chosen pages, like nbdkit's error filter or borg's
               ChunkerFailing; counts calls and injected faults.
- `CrashDisk`  a power-cut model. Writes since the last fsync are journalled per page; a shared
               `CrashPlan` stops the "process" (raises `Crash` forever after) at the N-th
               write/fsync across every disk it watches, and `cut_power()` then drops what was
               not synced: each file back to its state at its own last fsync, or (with an rng)
               each page to any version written since, as a disk with a volatile cache may.

Errors are OSError with the real errno, as FileDisk raises them. `Crash` is a BaseException so
that no `except Exception` in the code under test can survive it.

Thread-safety: FaultyDisk/CrashDisk guard their counters and journals with one lock each;
CrashDisk holds it across the inner write so that the journal and the file agree (correctness
over speed). What this module does not do: read fault scripts (tests/faultserver.py does, for
real servers).
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field
from typing import Collection

from zblock import PAGE_SIZE
from zblock.disk import _check_aligned

# ---------------------------------------------------------------------------------------------
# FaultyDisk

OPS = ("read", "write", "fsync", "punch", "prealloc")


@dataclass
class Fault:
    """One scripted fault. It matches a call of `op` when `nth` is the call's 1-based number
    (counted per op since the FaultyDisk was made) or when the call touches one of `pages`;
    with neither, every call of `op` matches. It fires at most `times` times (None: forever).
    `torn=True` on a page rule makes a multi-page write apply the pages before the first bad one
    first, as a failing disk may."""

    op: str
    err: int = errno.EIO
    nth: int | None = None
    pages: Collection[int] | None = None
    times: int | None = 1
    torn: bool = False
    fired: int = field(default=0, init=False)

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"Fault.op must be one of {OPS}, not {self.op!r}")
        if self.pages is not None:
            self.pages = frozenset(self.pages)


class FaultyDisk:
    """Wraps a disk and raises OSError(rule.err) instead of doing a matching call.
    `calls[op]` counts every call, `faults[op]` the injected failures."""

    def __init__(self, inner, rules: list[Fault] | None = None):
        self.inner = inner
        self._lock = threading.Lock()  # guards rules, calls, faults
        self.rules: list[Fault] = list(rules or [])
        self.calls = dict.fromkeys(OPS, 0)
        self.faults = dict.fromkeys(OPS, 0)

    def add(self, rule: Fault) -> Fault:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _match(self, op: str, offset: int = 0, length: int = 0) -> tuple[Fault | None, int | None]:
        """Count the call; return the rule that fires (and the first bad page, for torn writes)."""
        with self._lock:
            self.calls[op] += 1
            n = self.calls[op]
            first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
            for rule in self.rules:
                if rule.op != op or (rule.times is not None and rule.fired >= rule.times):
                    continue
                bad = None
                if rule.nth is not None and rule.nth != n:
                    continue
                if rule.pages is not None:
                    hit = [p for p in rule.pages if first <= p <= last] if length else []
                    if not hit:
                        continue
                    bad = min(hit)
                rule.fired += 1
                self.faults[op] += 1
                return rule, bad
        return None, None

    @staticmethod
    def _raise(rule: Fault):
        raise OSError(rule.err, os.strerror(rule.err) + " (injected)")

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, offset: int, length: int) -> bytes:
        rule, _ = self._match("read", offset, length)
        if rule:
            self._raise(rule)
        return self.inner.pread(offset, length)

    def pwrite(self, offset: int, data) -> None:
        self.pwritev(offset, [data])

    def pwritev(self, offset: int, bufs: list) -> None:
        length = sum(len(b) for b in bufs)
        rule, bad = self._match("write", offset, length)
        if rule:
            if rule.torn and bad is not None and bad * PAGE_SIZE > offset:
                head = b"".join(bytes(b) for b in bufs)[: bad * PAGE_SIZE - offset]
                self.inner.pwrite(offset, head)
            self._raise(rule)
        self.inner.pwritev(offset, bufs)

    def fsync(self) -> None:
        rule, _ = self._match("fsync")
        if rule:
            self._raise(rule)
        self.inner.fsync()

    def punch(self, offset: int, length: int) -> None:
        self._clear(self.inner.punch, offset, length)

    def zero_range(self, offset: int, length: int) -> None:
        self._clear(self.inner.zero_range, offset, length)

    def _clear(self, inner_op, offset: int, length: int) -> None:
        """punch and zero_range: both "punch" calls for the rules."""
        rule, _ = self._match("punch", offset, length)
        if rule:
            self._raise(rule)
        inner_op(offset, length)

    def prealloc(self, offset: int, length: int) -> None:
        rule, _ = self._match("prealloc", offset, length)
        if rule:
            self._raise(rule)
        self.inner.prealloc(offset, length)

    def truncate(self, size: int) -> None:
        self.inner.truncate(size)

    def close(self) -> None:
        self.inner.close()


# ---------------------------------------------------------------------------------------------
# CrashDisk


class Crash(BaseException):
    """The simulated process died (CrashPlan stopped it). BaseException: nothing may catch it."""


class CrashPlan:
    """Shared by the CrashDisks of one test (the data file and its sidecar), so one count of
    writes and fsyncs spans both files and a crash can fall between them.

    `stop_at=N`: the N-th counted operation (1-based, of the kinds in `ops`) does not happen and
    raises Crash; every later operation of any watched disk raises Crash too. `count` is the
    number of counted operations seen so far (a dry run with stop_at=None measures a sequence).
    """

    def __init__(self, stop_at: int | None = None, ops: Collection[str] = ("write", "fsync", "punch")):
        self.stop_at = stop_at
        self.ops = frozenset(ops)
        self.count = 0
        self.crashed = False
        self.disks: list[CrashDisk] = []
        self._lock = threading.Lock()  # guards count, crashed, disks

    def tick(self, op: str) -> None:
        with self._lock:
            if self.crashed:
                raise Crash(f"crashed before this {op}")
            if op not in self.ops:
                return
            self.count += 1
            if self.stop_at is not None and self.count >= self.stop_at:
                self.crashed = True
                raise Crash(f"crash at {op} #{self.count}")

    def crash(self) -> None:
        """Stop now (as if the process was killed between two operations)."""
        with self._lock:
            self.crashed = True

    def cut_power(self, rng=None) -> None:
        """Drop what no fsync made durable, on every watched disk (see CrashDisk.cut_power)."""
        with self._lock:
            self.crashed = True
            disks = list(self.disks)
        for d in disks:
            d.cut_power(rng)


class CrashDisk:
    """Journals every page changed since this file's last fsync (its content at that fsync, and
    with `keep_versions` every version written since) so `cut_power` can undo them."""

    def __init__(self, inner, plan: CrashPlan | None = None, *, keep_versions: bool = True):
        self.inner = inner
        self.plan = plan if plan is not None else CrashPlan()
        self.keep_versions = keep_versions
        self._lock = threading.Lock()  # guards _orig, _versions and orders journal vs file
        self._orig: dict[int, bytes] = {}  # page -> content at the last fsync
        self._versions: dict[int, list[bytes]] = {}  # page -> versions written since
        with self.plan._lock:
            self.plan.disks.append(self)

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, offset: int, length: int) -> bytes:
        self.plan.tick("read")
        return self.inner.pread(offset, length)

    def _journal(self, offset: int, data: bytes | None, length: int) -> None:
        """Caller holds _lock. Remember pages' synced content before they change."""
        first = offset // PAGE_SIZE
        n = length // PAGE_SIZE
        for i in range(n):
            p = first + i
            if p not in self._orig:
                self._orig[p] = self.inner.pread(p * PAGE_SIZE, PAGE_SIZE)
            if self.keep_versions:
                page = bytes(PAGE_SIZE) if data is None else data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                self._versions.setdefault(p, []).append(page)

    def pwrite(self, offset: int, data) -> None:
        self.pwritev(offset, [data])

    def pwritev(self, offset: int, bufs: list) -> None:
        data = b"".join(bytes(b) for b in bufs)
        _check_aligned(offset, len(data))
        self.plan.tick("write")
        with self._lock:
            self._journal(offset, data, len(data))
            self.inner.pwrite(offset, data)

    def punch(self, offset: int, length: int) -> None:
        self._clear(self.inner.punch, offset, length)

    def zero_range(self, offset: int, length: int) -> None:
        self._clear(self.inner.zero_range, offset, length)

    def _clear(self, inner_op, offset: int, length: int) -> None:
        """punch and zero_range: both journal the range as zeroed, both are "punch" crash ops."""
        _check_aligned(offset, length)
        self.plan.tick("punch")
        with self._lock:
            self._journal(offset, None, length)
            inner_op(offset, length)

    def fsync(self) -> None:
        self.plan.tick("fsync")
        with self._lock:
            self.inner.fsync()
            self._orig.clear()
            self._versions.clear()

    def prealloc(self, offset: int, length: int) -> None:
        self.inner.prealloc(offset, length)

    def truncate(self, size: int) -> None:
        self.inner.truncate(size)

    def cut_power(self, rng=None) -> None:
        """Restore every page changed since the last fsync: to its synced content, or with `rng`
        (random.Random) to a random choice among the synced content and every version written
        since (a volatile disk cache may keep any of them). Works after close() too."""
        with self._lock:
            orig, self._orig = self._orig, {}
            versions, self._versions = self._versions, {}
        if not orig:
            return
        fd = os.open(self.inner_path(), os.O_RDWR | os.O_CLOEXEC)
        try:
            for p, old in sorted(orig.items()):
                page = old
                if rng is not None:
                    page = rng.choice([old] + versions.get(p, []))
                os.pwrite(fd, page, p * PAGE_SIZE)
            os.fsync(fd)
        finally:
            os.close(fd)

    def inner_path(self) -> str:
        d = self.inner
        while not hasattr(d, "path"):
            d = d.inner
        return d.path

    def close(self) -> None:
        self.inner.close()
