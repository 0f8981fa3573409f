"""Disk objects: the lowest layer under zblock.backing, one object per open file.

A disk does positioned, page-aligned I/O on one file and nothing else: no checksums, no locks
beyond its own buffer pool. Three kinds share one small interface (`size`, `pread`, `pwrite`,
`pwritev`, `fsync`, `punch`, `prealloc`, `truncate`, `close`), so tests can stack fault layers
under a real `Backing`:

- `FileDisk`   the real file. With `direct=True` it bypasses the page cache: O_DIRECT through
               page-aligned (mmap) bounce buffers where the filesystem accepts O_DIRECT, otherwise
               buffered I/O followed by `sync_file_range` + `posix_fadvise(DONTNEED)` ("drop
               behind"), so writeback really frees memory when the system is short of it
               (DESIGN "On-disk format"). `direct=False` is plain buffered I/O (the sidecar).
- `FaultyDisk` scripted errors (EIO, ENOSPC, ...) on the N-th read/write/fsync/punch or on any
               operation touching chosen pages, like nbdkit's error filter or borg's
               ChunkerFailing; counts calls and injected faults.
- `CrashDisk`  a power-cut model. Writes since the last fsync are journalled per page; a shared
               `CrashPlan` stops the "process" (raises `Crash` forever after) at the N-th
               write/fsync across every disk it watches, and `cut_power()` then drops what was
               not synced: each file back to its state at its own last fsync, or (with an rng)
               each page to any version written since, as a disk with a volatile cache may.

Errors are OSError with the real errno; callers (Backing) turn them into DiskError. `Crash` is a
BaseException so that no `except Exception` in the code under test can survive it.

Measured on this machine (Linux 6.18): O_DIRECT works on / (ext4 on virtio, logical block 512 B)
and also on tmpfs (/dev/shm, which accepts O_DIRECT since 6.6), so the drop-behind path is only a
fallback; tests force it with `FileDisk(path, direct=False, drop_cache=True)`. Writing then
reading 64 MiB through a Backing left 0 MiB of the file in the page cache (fincore) with either
path, 64 MiB with plain buffered I/O.

Thread-safety: FileDisk methods may run concurrently (pread/pwrite on one fd are atomic w.r.t.
the offset; the bounce-buffer pool has its own lock). FaultyDisk/CrashDisk guard their counters
and journals with one lock each; CrashDisk holds it across the inner write so that the journal
and the file agree (it is a test layer: correctness over speed).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from dataclasses import dataclass, field
from typing import Collection

from . import PAGE_SIZE
from .libc import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate,
                   sync_file_range)

# Bounce buffers are 1 MiB: the largest FUSE request (libfuse 3 max_write) is 256 pages, so one
# buffer serves a whole request; longer runs are split. Anonymous mmap memory is page-aligned,
# which O_DIRECT needs (address, length and offset multiples of the logical block size).
BOUNCE_SIZE = 1 << 20
_BOUNCE_KEEP = 4  # buffers kept for reuse: 2 cores, a few threads; the rest are unmapped
_IOV_MAX = 1024


def _check_aligned(offset: int, length: int) -> None:
    if offset % PAGE_SIZE or length % PAGE_SIZE:
        raise ValueError(f"disk I/O must be page-aligned: offset {offset}, length {length}")


# ---------------------------------------------------------------------------------------------
# FileDisk


class _BouncePool:
    """Aligned 1 MiB buffers, taken with get and given back with put (a page fault per page the
    first time a buffer is touched; reusing buffers keeps that cost out of every request)."""

    def __init__(self):
        self._lock = threading.Lock()  # guards _free
        self._free: list[mmap.mmap] = []

    def get(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, BOUNCE_SIZE)

    def put(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < _BOUNCE_KEEP:
                self._free.append(buf)
                return
        buf.close()

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for buf in free:
            buf.close()


class FileDisk:
    """One open file. `mode` says which I/O path is in use: "direct" (O_DIRECT), "dropbehind"
    (buffered + sync_file_range + fadvise DONTNEED) or "buffered" (page cache kept)."""

    def __init__(self, path: str, direct: bool = True, *, drop_cache: bool | None = None,
                 writable: bool = True):
        """`direct`: try O_DIRECT. Without it (refused, or direct=False) `drop_cache` (default:
        the value of `direct`) chooses drop-behind over plain buffered I/O. `writable=False`
        opens the file read-only (a read-only mount)."""
        if drop_cache is None:
            drop_cache = direct
        self.path = path
        self.mode = "buffered"
        access = os.O_RDWR if writable else os.O_RDONLY
        fd = -1
        if direct:
            try:
                fd = os.open(path, access | os.O_DIRECT | os.O_CLOEXEC)
                self.mode = "direct"
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: the filesystem refuses O_DIRECT
                    raise
        if fd < 0:
            fd = os.open(path, access | os.O_CLOEXEC)
            if drop_cache:
                self.mode = "dropbehind"
                # No readahead: pages read ahead of a pread are still under I/O when the
                # DONTNEED that follows runs, so they stay (measured: 34 of 64 MiB stayed
                # cached after reading a file in 1 MiB preads; none with FADV_RANDOM).
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.fd = fd
        self._pool = _BouncePool()
        self._closed = False

    # -- queries --

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    # -- reads --

    def pread(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (a short file reads as zeros past its end)."""
        _check_aligned(offset, length)
        if self.mode != "direct":
            data = self._pread_all(offset, length)
            if self.mode == "dropbehind":
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
            return data
        if length <= BOUNCE_SIZE:
            return self._pread_direct(offset, length)
        return b"".join(
            self._pread_direct(offset + o, min(BOUNCE_SIZE, length - o))
            for o in range(0, length, BOUNCE_SIZE)
        )

    def _pread_direct(self, offset: int, length: int) -> bytes:
        buf = self._pool.get()
        try:
            with memoryview(buf) as mv:
                done = 0
                while done < length:
                    n = os.preadv(self.fd, [mv[done:length]], offset + done)
                    if n == 0:  # past the end: zeros, as a hole would read
                        mv[done:length] = bytes(length - done)
                        break
                    done += n
                return bytes(mv[:length])
        finally:
            self._pool.put(buf)

    def _pread_all(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        done = len(data)
        while done < length:
            more = os.pread(self.fd, length - done, offset + done)
            if not more:
                parts.append(bytes(length - done))
                break
            parts.append(more)
            done += len(more)
        return b"".join(parts)

    # -- writes --

    def pwrite(self, offset: int, data) -> None:
        self.pwritev(offset, [data])

    def pwritev(self, offset: int, bufs: list) -> None:
        """Write the buffers back to back from `offset` (a contiguous run of pages) with as few
        syscalls as the bounce size allows: one per 1 MiB."""
        length = sum(len(b) for b in bufs)
        _check_aligned(offset, length)
        if self.mode == "direct":
            self._pwritev_direct(offset, bufs, length)
        else:
            self._pwritev_buffered(offset, bufs)
            if self.mode == "dropbehind":
                # Write the range back now and wait, then drop it: dirty pages of the backing
                # file would otherwise sit in the page cache exactly when memory is short.
                sync_file_range(self.fd, offset, length)
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def _pwritev_direct(self, offset: int, bufs: list, length: int) -> None:
        buf = self._pool.get()
        try:
            with memoryview(buf) as mv:
                if length <= BOUNCE_SIZE:  # the common case: one request, one syscall
                    fill = 0
                    for b in bufs:
                        end = fill + len(b)
                        mv[fill:end] = b
                        fill = end
                    self._write_full(mv, length, offset)
                    return
                fill = 0
                for b in bufs:
                    pos = 0
                    blen = len(b)
                    while pos < blen:
                        take = min(blen - pos, BOUNCE_SIZE - fill)
                        if pos == 0 and take == blen:
                            mv[fill:fill + take] = b
                        else:
                            mv[fill:fill + take] = memoryview(b)[pos:pos + take]
                        fill += take
                        pos += take
                        if fill == BOUNCE_SIZE:
                            self._write_full(mv, fill, offset)
                            offset += fill
                            fill = 0
                if fill:
                    self._write_full(mv, fill, offset)
        finally:
            self._pool.put(buf)

    def _write_full(self, mv: memoryview, length: int, offset: int) -> None:
        done = 0
        while done < length:
            done += os.pwritev(self.fd, [mv[done:length]], offset + done)

    def _pwritev_buffered(self, offset: int, bufs: list) -> None:
        for i in range(0, len(bufs), _IOV_MAX):
            chunk = bufs[i:i + _IOV_MAX]
            want = sum(len(b) for b in chunk)
            n = os.pwritev(self.fd, chunk, offset)
            if n < want:  # short write (rare): finish the rest byte-exactly
                rest = b"".join(bytes(b) for b in chunk)[n:]
                self._write_full(memoryview(rest), len(rest), offset + n)
            offset += want

    # -- space and durability --

    def fsync(self) -> None:
        os.fsync(self.fd)

    def punch(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads as zeros afterwards (PUNCH_HOLE|KEEP_SIZE)."""
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def zero_range(self, offset: int, length: int) -> None:
        """Make a range read as zeros, keeping its blocks allocated (ZERO_RANGE|KEEP_SIZE)."""
        fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)

    def prealloc(self, offset: int, length: int) -> None:
        """Allocate a range (fallocate mode 0) so later writes cannot fail with ENOSPC."""
        fallocate(self.fd, 0, offset, length)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self.fd)
        self._pool.close()


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
        rule, _ = self._match("punch", offset, length)
        if rule:
            self._raise(rule)
        self.inner.punch(offset, length)

    def zero_range(self, offset: int, length: int) -> None:
        rule, _ = self._match("punch", offset, length)
        if rule:
            self._raise(rule)
        self.inner.zero_range(offset, length)

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
        _check_aligned(offset, length)
        self.plan.tick("punch")
        with self._lock:
            self._journal(offset, None, length)
            self.inner.punch(offset, length)

    def zero_range(self, offset: int, length: int) -> None:
        _check_aligned(offset, length)
        self.plan.tick("punch")
        with self._lock:
            self._journal(offset, None, length)
            self.inner.zero_range(offset, length)

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
