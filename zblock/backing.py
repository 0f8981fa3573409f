"""Backing store: the raw disk image, its `.zbmeta` checksum sidecar, and the file lock.

The backing file is a raw image at the same offsets as the FUSE `disk` file (after a clean
unmount it is usable directly with losetup). Beside it, `PATH.zbmeta` holds

    block 0      header: magic, version, page size, size, flags (bit 0: clean shutdown),
                 entry size, and at clean shutdown the data file's mtime_ns and inode; crc32c
    block 1...   per page two uint32 values, (durable, latest), little-endian, 512 pages per
                 4 KiB block, exactly the in-memory numpy table `_crc` (npages rounded up to
                 512 rows), so a touched block is written straight from the table.

Entry values: CRC32C of the page, "folded" so that 0, 1 and 2 stay free as sentinels:
    ZERO (0)       the page reads as zeros without touching the disk (never written, discarded)
    UNCHECKED (1)  the content predates the sidecar (a raw image imported without one):
                   accepted as it is until written
    LOST (2)       acknowledged data that never reached the file (a clean close whose write-back
                   failed): never matches, so the page reads EIO until it is written again
Version 1 sidecars kept only 0 and 1 free (crc 0 and 1 folded to 2 and 3); they are converted
at open (2 -> 3 is exact: both stand for "crc 0..3" under the version 2 fold).
A page verifies when its data matches `durable` or `latest`. `durable` is the value as of the
last sync, or of the last completed write since (see write_pages below); `latest` is the value
of the last write started.
A file modified after a clean unmount (mtime differs from the header) keeps its checksums: a
stray write and bit rot look alike and both must read as EIO; the warning (open_state "changed")
says to remove the sidecar if the edit was on purpose.

Crash rules (DESIGN "Data semantics"): a page not written since the last completed sync() reads
exactly; a page written since reads as its synced bytes, as a version written since, or EIO.
Without a crash every page reads exactly, failed writes included. How the ordering gives that:
  write_pages   pair := (what the disk holds now, crc(new)) in memory -- "what it holds" is the
                last completed write, which right after a sync is the durable value -- then
                write the touched sidecar blocks, then the data. The pair covers the page
                whatever part of the write lands. (After two writes since a sync a power cut
                may bring back the synced bytes, which then read as EIO: allowed, and it keeps
                the running case exact with only two values per page.)
  sync          (1) fsync the sidecar: every pair written so far is durable before (2) fsync of
                the data (correctness does not need (1); it narrows the EIO window of pages
                written just before a cut, for one cheap fsync of a small file); (3) collapse durable := latest for pages whose writes had completed
                before (2) began and were not rewritten since, write their blocks, fsync the
                sidecar. A power cut anywhere leaves each synced page covered: its pair has been
                (D, D) in every sidecar version written since its last sync.
  sidecar       Versions of one sidecar block are written in the order their snapshots were
                taken (a stripe lock held across snapshot + pwrite): a stale snapshot landing
                late could otherwise drop a synced page's checksum.
  failed write  the page keeps (old, new): both stay valid (what landed is unknown), sync does
                not collapse it, and the next write keeps `old` as its first value, until a
                write of the page succeeds.
The sidecar is written buffered (fsync orders it); the data file bypasses the page cache
(zblock.disk.FileDisk, O_DIRECT on this machine).

Ephemeral mode (swap): no sidecar, CRCs kept in memory only, the file preallocated and its
contents discarded at open; discard only marks pages zero (a punch would give back the space the
preallocation reserved); sync and close write nothing.

Lock protocol. Lock order: _sync_lock -> stripe lock -> _lock.
  _lock        (small, never held across I/O) guards _crc, _unsynced, _inflight, _failed and the
               counters bd_reads, bd_writes, checksum_errors, io_errors.
  _stripes[b % N]  serialises snapshot + pwrite of sidecar block b (held across one 4 KiB
               buffered pwrite: the ordering above needs it).
  _sync_lock   one sync() at a time.
The caller (the cache) serialises operations on the same page; different pages may be read and
written from several threads, and sync() may run while other pages are written.

Not here: caching, compression, byte ranges (zblock.store), retries (the cache keeps a page whose
writeback failed).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import stat
import struct
import threading
import time
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import crc32c as _crc32c
import numpy as np

from . import PAGE_SIZE
from .disk import FileDisk
from .errors import BackingError, BackingLocked, DataError, DiskError, OutOfRange
from .pagemem import no_huge_pages

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# on-disk format

META_SUFFIX = ".zbmeta"
META_MAGIC = b"ZBLKMETA"
META_VERSION = 2
HEADER_SIZE = 4096
ENTRY_SIZE = 8  # two uint32: durable, latest
ENTRIES_PER_BLOCK = PAGE_SIZE // ENTRY_SIZE  # 512
FLAG_CLEAN = 1
# magic, version, page_size, size, flags, entry_size, data_mtime_ns, data_ino; then crc32c
_HEADER = struct.Struct("<8sIIQIIqQ")

ZERO = 0
UNCHECKED = 1
LOST = 2
_FOLD = 3  # the smallest value a page's checksum takes: 0..2 are the sentinels
_crc = _crc32c.crc32c


def _fold(crcs: np.ndarray) -> np.ndarray:
    """Keep the sentinels free (crcs 0..3 then share one value: negligible strength lost)."""
    crcs[crcs < _FOLD] = _FOLD
    return crcs


ZERO_PAGE_CRC = int(_fold(np.array([_crc(bytes(PAGE_SIZE))], np.uint32))[0])

# A page-read run in fsck; reads in Backing follow the caller's runs.
_FSCK_RUN = 256
# Scans of the table take this many rows at a time: no temporary the table's size.
_SCAN_ROWS = 1 << 20
# The table is read from the sidecar through a buffer this big, and written to a new sidecar in
# steps this big (one pwrite returns at most 2 GiB).
_READ_STEP = 1 << 20
_WRITE_STEP = 64 << 20

DiskFactory = Callable[[str, str], object]  # (path, role "data" | "meta") -> disk


def meta_path(path: str) -> str:
    return path + META_SUFFIX


def _page_crcs(data, count: int) -> np.ndarray:
    mv = memoryview(data)
    crcs = np.fromiter((_crc(mv[o:o + PAGE_SIZE]) for o in range(0, count * PAGE_SIZE, PAGE_SIZE)),
                       np.uint32, count)
    return _fold(crcs)


def _verify(crcs: np.ndarray, pair: np.ndarray) -> np.ndarray:
    """Bool per page: the data matches one of its two values (ZERO means the zero page)."""
    d, l = pair[:, 0], pair[:, 1]
    return ((crcs == d) | (crcs == l) | (d == UNCHECKED) | (l == UNCHECKED)
            | (((d == ZERO) | (l == ZERO)) & (crcs == ZERO_PAGE_CRC)))


def _pack_header(size: int, clean: bool, mtime_ns: int = 0, ino: int = 0) -> bytes:
    head = _HEADER.pack(META_MAGIC, META_VERSION, PAGE_SIZE, size, FLAG_CLEAN if clean else 0,
                        ENTRY_SIZE, mtime_ns, ino)
    head += struct.pack("<I", _crc(head))
    return head + bytes(HEADER_SIZE - len(head))


@dataclass
class _Header:
    version: int
    page_size: int
    size: int
    clean: bool
    entry_size: int
    mtime_ns: int
    ino: int


def _parse_header(raw: bytes, where: str) -> _Header:
    """BackingError naming the problem unless `raw` is a valid header of this version."""
    n = _HEADER.size
    if len(raw) < n + 4:
        raise BackingError(f"{where}: sidecar too short for a header")
    magic, version, page_size, size, flags, entry_size, mtime_ns, ino = _HEADER.unpack(raw[:n])
    if magic != META_MAGIC:
        raise BackingError(f"{where}: not a zblock sidecar (bad magic)")
    if struct.unpack("<I", raw[n:n + 4])[0] != _crc(raw[:n]):
        raise BackingError(f"{where}: sidecar header checksum mismatch")
    if version not in (1, META_VERSION):
        raise BackingError(f"{where}: sidecar version {version} is not supported (want {META_VERSION})")
    if page_size != PAGE_SIZE or entry_size != ENTRY_SIZE:
        raise BackingError(f"{where}: sidecar page size {page_size} / entry size {entry_size} "
                           f"not supported (want {PAGE_SIZE} / {ENTRY_SIZE})")
    return _Header(version, page_size, size, bool(flags & FLAG_CLEAN), entry_size, mtime_ns, ino)


def _table_rows(npages: int) -> int:
    return -(-npages // ENTRIES_PER_BLOCK) * ENTRIES_PER_BLOCK


def _read_table(fd: int, table: np.ndarray, where: str) -> list[tuple[int, int]]:
    """Fill the zeroed `table` from the sidecar and return the row ranges (first, end) it
    wrote; every other row is (ZERO, ZERO). Only the file's data extents are read, and only
    their 4 KiB blocks that hold something are copied in: the rest of `table` stays memory the
    kernel has not given (a new disk's sidecar is one hole; a sidecar copied without its holes,
    or read through the page cache by fsck, is data that reads as zeros).
    BackingError if the file is shorter than the table."""
    dst = memoryview(table).cast("B")
    end = HEADER_SIZE + len(dst)
    if os.fstat(fd).st_size < end:
        raise BackingError(f"{where}: sidecar is truncated")
    scratch = bytearray(_READ_STEP)
    view = memoryview(scratch)
    ranges: list[tuple[int, int]] = []
    pos = HEADER_SIZE
    while pos < end:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:      # nothing but holes from here on
                break
            raise
        if pos >= end:
            break
        stop = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        pos = HEADER_SIZE + (pos - HEADER_SIZE) // PAGE_SIZE * PAGE_SIZE   # whole blocks
        stop = min(end, HEADER_SIZE + -(-(stop - HEADER_SIZE) // PAGE_SIZE) * PAGE_SIZE)
        while pos < stop:
            count = min(len(scratch), stop - pos)
            got = 0
            while got < count:              # one read may return less than asked
                n = os.preadv(fd, [view[got:count]], pos + got)
                if n == 0:
                    raise BackingError(f"{where}: sidecar is truncated")
                got += n
            blocks = np.frombuffer(scratch, np.uint64, count // 8).reshape(-1, ENTRIES_PER_BLOCK)
            used = np.flatnonzero(blocks.any(axis=1))
            base = (pos - HEADER_SIZE) // PAGE_SIZE       # the table block at `pos`
            for run in np.split(used, np.flatnonzero(np.diff(used) != 1) + 1) if len(used) else ():
                a, b = int(run[0]), int(run[-1]) + 1
                dst[(base + a) * PAGE_SIZE:(base + b) * PAGE_SIZE] = view[a * PAGE_SIZE:b * PAGE_SIZE]
                first, last = (base + a) * ENTRIES_PER_BLOCK, (base + b) * ENTRIES_PER_BLOCK
                if ranges and ranges[-1][1] == first:
                    ranges[-1] = (ranges[-1][0], last)
                else:
                    ranges.append((first, last))
            pos += count
    return ranges


def _write_table(meta, table: np.ndarray, ranges) -> None:
    """Write the rows `ranges` ((first, end) rows) of `table` to the sidecar disk `meta`, in
    steps: no copy of the table, and no pwrite longer than one can be."""
    buf = memoryview(table).cast("B")
    for first, end in ranges:
        for lo in range(first * ENTRY_SIZE, end * ENTRY_SIZE, _WRITE_STEP):
            hi = min(lo + _WRITE_STEP, end * ENTRY_SIZE)
            meta.pwrite(HEADER_SIZE + lo, buf[lo:hi])


def _row_steps(ranges, npages: int):
    """Slices of at most _SCAN_ROWS rows over `ranges` ((first, end) rows), clipped to the
    disk's `npages` rows."""
    for first, end in ranges:
        end = min(end, npages)
        for lo in range(first, end, _SCAN_ROWS):
            yield slice(lo, min(lo + _SCAN_ROWS, end))


def _stat_backing(path: str) -> os.stat_result | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BackingError(f"{path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BackingError(f"{path} is a directory, not a backing file")
    if not stat.S_ISREG(st.st_mode):
        raise BackingError(f"{path} is not a regular file")
    return st


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _reserve(disk, path: str, size: int, progress: Callable[[str], None] | None) -> None:
    """Allocate every block of the first `size` bytes of `disk` (the file at `path`) without
    changing its data. BackingError naming the sizes if the filesystem cannot hold it."""
    try:
        disk.prealloc(0, size)
        return
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _no_space(path, size) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise BackingError(f"{path}: cannot reserve its space: {e.strerror}") from None
    # No fallocate here: write zeros into the holes (the data regions are allocated already).
    log.info("%s: the filesystem has no fallocate; writing zeros into its holes", path)
    holes = _holes(path, size)
    total, done, last = sum(b - a for a, b in holes), 0, 0.0
    zeros = [bytes(PAGE_SIZE)] * 256
    for a, b in holes:
        for off in range(a, b, len(zeros) * PAGE_SIZE):
            n = min(len(zeros) * PAGE_SIZE, b - off)
            try:
                disk.pwritev(off, zeros[:n // PAGE_SIZE])
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise _no_space(path, size) from None
                raise BackingError(f"{path}: cannot reserve its space: {e.strerror}") from None
            done += n
            if progress and time.monotonic() - last >= 1.0:
                last = time.monotonic()
                progress(f"reserving {path}: {_human(done)} of {_human(total)} written")
    disk.fsync()


def _holes(path: str, size: int) -> list[tuple[int, int]]:
    """The page-aligned unallocated ranges of the file's first `size` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    holes, off = [], 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_HOLE)
            except OSError:
                return [(off, size)]        # no SEEK_HOLE: treat it all as a hole
            if start >= size:
                break
            try:
                end = os.lseek(fd, start, os.SEEK_DATA)
            except OSError:                 # ENXIO: a hole up to the end
                end = size
            start &= ~(PAGE_SIZE - 1)
            end = min(size, -(-end // PAGE_SIZE) * PAGE_SIZE)
            holes.append((start, end))
            off = end
    finally:
        os.close(fd)
    return holes


def _no_space(path: str, size: int) -> BackingError:
    st = os.stat(path)
    need = max(size - st.st_blocks * 512, 0)
    vfs = os.statvfs(os.path.dirname(path))
    free = vfs.f_bavail * vfs.f_frsize
    return BackingError(
        f"{path}: cannot reserve {_human(size)}: the filesystem has {_human(free)} free and "
        f"needs {_human(need)} more (free space, use a smaller --size, or mount with --sparse "
        f"to take the risk that writes fail once it is full)")


def _default_factory(path: str, role: str, writable: bool = True):
    # The data file bypasses the page cache; the sidecar is small and ordered by fsync.
    return FileDisk(path, direct=(role == "data"), writable=writable)


# ---------------------------------------------------------------------------------------------
# Backing


class Backing:
    """An open backing file. Make one with `Backing.open`."""

    _NSTRIPES = 64

    def __init__(self, path: str, size: int, lock_fd: int, data, meta, table: np.ndarray,
                 ephemeral: bool, open_state: str, *, sparse: bool = False,
                 read_only: bool = False, loaded: list[tuple[int, int]] | None = None):
        self.path = path
        self.size = size
        self.npages = size // PAGE_SIZE
        self.ephemeral = ephemeral
        self.sparse = sparse        # space not reserved: a write may meet ENOSPC
        self.read_only = read_only  # nothing is written: no sidecar header, no sync
        # Pages marked zero are read and checked like any other when the file was changed
        # outside zblock: a never-written page someone wrote into must read EIO, not zeros.
        self.verify_zero = open_state == "changed"
        self.open_state = open_state  # new | clean | recovered | imported | changed | ephemeral
        self.io_mode = getattr(data, "mode", type(data).__name__)
        self._lock_fd = lock_fd
        self._data = data
        self._meta = meta
        self._crc = table  # (rows, 2) uint32: durable, latest
        n = self.npages
        # the rows that may be other than (ZERO, ZERO) as opened: every other row is
        self._loaded = [(0, n)] if loaded is None else loaded
        self._unsynced = np.zeros(n, bool)  # written/discarded since the last sync
        self._inflight = np.zeros(n, bool)  # disk write or punch in progress
        self._failed = np.zeros(n, bool)  # last write failed: keep both values across sync
        no_huge_pages((self._unsynced, self._inflight, self._failed))
        self.arrays = (self._crc, self._unsynced, self._inflight, self._failed)   # table_bytes
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(self._NSTRIPES)]
        self._sync_lock = threading.Lock()
        self._closed = False
        self.bd_reads = 0
        self.bd_writes = 0
        self.checksum_errors = 0
        self.io_errors = 0           # disk operations that failed (EIO, ENOSPC, ...)

    # -- open --------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, size: int | None = None, *, ephemeral: bool = False,
             sparse: bool = False, read_only: bool = False,
             disk_factory: DiskFactory | None = None,
             progress: Callable[[str], None] | None = None) -> "Backing":
        """Create (needs `size`) or open the backing file at `path`, locked while open.

        An existing file keeps its contents and its size: `size` None uses it, a different
        `size` is refused (no silent resize). An empty existing file counts as new.
        The file's whole size (and the sidecar's) is reserved on the filesystem, so no write
        acknowledged later can meet ENOSPC; BackingError names the sizes when it cannot be.
        `sparse` skips that (writes may then fail when the filesystem fills). `progress`
        receives one-line messages during a long reservation (writing zeros).
        `read_only` opens an existing file and its sidecar for reading only and writes nothing
        (no reservation; the sidecar keeps its state; without one, pages read unchecked);
        several read-only opens may share the file (LOCK_SH). Writing is the caller's to refuse.
        Raises BackingError with a one-line message, BackingLocked if another Backing has it.
        """
        path = os.path.abspath(os.fspath(path))
        factory = disk_factory or functools.partial(_default_factory, writable=not read_only)
        if size is not None and (not isinstance(size, int) or size <= 0 or size % PAGE_SIZE):
            raise BackingError(f"{path}: size {size!r} must be a positive multiple of {PAGE_SIZE}")
        st = _stat_backing(path)
        if st is None and read_only:
            raise BackingError(f"{path} does not exist (nothing to open read-only)")
        if st is None and size is None:
            raise BackingError(f"{path} does not exist (a new backing file needs --size)")
        try:
            access = os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT
            fd = os.open(path, access | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise BackingError(f"{path}: cannot open: {e.strerror}") from None
        created = st is None
        data = meta = None
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BackingLocked(f"{path} is in use (locked by another zblock)") from None
            cur = os.fstat(fd).st_size
            new = cur == 0
            if new and read_only:
                raise BackingError(f"{path} is empty (nothing to open read-only)")
            if new:
                if size is None:
                    raise BackingError(f"{path} is empty (a new backing file needs --size)")
                os.ftruncate(fd, size)
            else:
                if cur % PAGE_SIZE:
                    raise BackingError(f"{path}: size {cur} is not a multiple of {PAGE_SIZE}")
                if size is not None and size != cur:
                    raise BackingError(f"{path} is {cur} bytes, not {size}: no silent resize")
                size = cur
            npages = size // PAGE_SIZE
            table = np.zeros((_table_rows(npages), 2), np.uint32)
            no_huge_pages((table,))
            loaded: list[tuple[int, int]] = []      # a new or ephemeral table is all ZERO
            data = factory(path, "data")
            if ephemeral:
                state = "ephemeral"
                # Discard the old contents and reserve every block: swap must not meet ENOSPC.
                try:
                    data.punch(0, size)
                except OSError as e:  # the table marks every page zero anyway
                    if e.errno != errno.EOPNOTSUPP:
                        raise
                try:
                    data.prealloc(0, size)
                except OSError as e:
                    if e.errno != errno.EOPNOTSUPP:
                        raise  # ENOSPC: BackingError below, at mount time, not during reclaim
                    log.warning("%s: cannot preallocate (%s): swap may meet ENOSPC", path, e.strerror)
                try:
                    os.unlink(meta_path(path))  # checksums of discarded contents
                except FileNotFoundError:
                    pass
            elif read_only:
                state, _, loaded = cls._load_table(path, size, new, fd, table, read_only=True)
            else:
                state, version, loaded = cls._load_table(path, size, new, fd, table)
                meta = factory(meta_path(path), "meta")
                if not sparse:
                    _reserve(data, path, size, progress)
                # always: a lost page must still be recordable when the filesystem is full
                _reserve(meta, meta_path(path), HEADER_SIZE + table.nbytes, progress)
                if state == "imported" or version != META_VERSION:
                    _write_table(meta, table, loaded)
                meta.pwrite(0, _pack_header(size, clean=False))  # dirty until a clean close
                meta.fsync()
                if new:
                    data.fsync()
            if state == "imported":
                log.warning("%s: no checksum sidecar; its pages are accepted unchecked until "
                            "written", path)
            elif state == "changed":
                log.warning("%s: modified since its last clean unmount; pages changed outside "
                            "zblock will fail their checksums (remove %s to accept them)",
                            path, meta_path(path))
            elif sparse:
                log.warning("%s: sparse (--sparse): its space is not reserved, writes fail "
                            "once the filesystem is full", path)
            backing = cls(path, size, fd, data, meta, table, ephemeral, state, sparse=sparse,
                          read_only=read_only, loaded=loaded)
            if not (ephemeral or read_only):
                backing._settle_pairs()
            return backing
        except BaseException as e:
            for d in (meta, data):
                if d is not None:
                    d.close()
            os.close(fd)
            if created and not isinstance(e, BackingLocked):
                for p in (path, meta_path(path)):
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
            if isinstance(e, OSError):
                raise BackingError(f"{path}: {e.strerror}") from None
            raise

    @staticmethod
    def _load_table(path: str, size: int, new: bool, data_fd: int, table: np.ndarray,
                    read_only: bool = False) -> tuple[str, int, list[tuple[int, int]]]:
        """Fill the zeroed `table` from the sidecar (creating it if needed, unless
        `read_only`); return how the file was found, the sidecar's format version and the row
        ranges that may hold other than (ZERO, ZERO)."""
        mpath = meta_path(path)
        nbytes = HEADER_SIZE + table.nbytes
        if new:
            mfd = os.open(mpath, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(mfd, nbytes)  # sparse zeros: every entry ZERO
            finally:
                os.close(mfd)
            return "new", META_VERSION, []
        try:
            mfd = os.open(mpath, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except FileNotFoundError:
            if not read_only:
                mfd = os.open(mpath, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.ftruncate(mfd, nbytes)
                finally:
                    os.close(mfd)
            table[:] = UNCHECKED
            return "imported", META_VERSION, [(0, len(table))]
        try:
            head = _parse_header(os.pread(mfd, HEADER_SIZE, 0), mpath)
            if head.size != size:
                raise BackingError(f"{mpath}: sidecar is for a {head.size}-byte file, the backing "
                                   f"file is {size} bytes (remove the sidecar to import it unchecked)")
            loaded = _read_table(mfd, table, mpath)
        finally:
            os.close(mfd)
        if head.version == 1:       # see "Version 1 sidecars" above; open() rewrites the table
            for rows in _row_steps(loaded, len(table)):
                part = table[rows]
                part[part == 2] = _FOLD
        if not head.clean:
            # after a crash: trust both values of every pair
            return "recovered", head.version, loaded
        st = os.fstat(data_fd)
        if st.st_mtime_ns != head.mtime_ns:  # not the inode: `cp -p` of both files is fine
            # Written outside zblock (losetup, dd) since the clean unmount. The checksums stay
            # in force: bit rot and a stray dd look alike, and both must read as EIO. A user
            # who edited the image on purpose removes the sidecar to import it unchecked.
            return "changed", head.version, loaded
        return "clean", head.version, loaded

    # -- helpers -----------------------------------------------------------------------------

    def _check_range(self, start: int, count: int) -> None:
        if self._closed:
            raise BackingError(f"{self.path}: backing is closed")
        if start < 0 or count < 0 or start + count > self.npages:
            raise OutOfRange(f"{self.path}: pages {start}+{count} outside 0..{self.npages}")

    def _on_disk(self, pages) -> np.ndarray:
        """Caller holds _lock. The value of what the disk holds for `pages` now, barring a
        crash: latest when the last write completed (it equals durable right after a sync),
        durable when it failed (what landed is unknown; durable at least is covered)."""
        return np.where(self._failed[pages], self._crc[pages, 0], self._crc[pages, 1])

    def _put_meta_blocks(self, blocks) -> None:
        """Write sidecar blocks from the table. Each block's snapshot is taken and written under
        its stripe lock, so versions of a block reach the file in snapshot order."""
        for b in blocks:
            b = int(b)
            with self._stripes[b % self._NSTRIPES]:
                with self._lock:
                    buf = self._crc[b * ENTRIES_PER_BLOCK:(b + 1) * ENTRIES_PER_BLOCK].tobytes()
                self._meta.pwrite(HEADER_SIZE + b * PAGE_SIZE, buf)

    def _disk_error(self, what: str, e: OSError) -> DiskError:
        with self._lock:
            self.io_errors += 1
        return DiskError(f"{self.path}: {what} failed: {e.strerror or e}", e.errno or errno.EIO)

    def _read_error(self, what: str, e: OSError) -> DataError:
        """A read that failed answers EIO whatever the disk said (ENOSPC from a read would only
        confuse the reader); the disk's own error stays in the message."""
        return DataError(str(self._disk_error(what, e)))

    # -- reads -------------------------------------------------------------------------------

    def written_mask(self) -> np.ndarray:
        """Bool per page: the file may hold data for it (not marked zero), as opened. The
        cache starts with these pages on disk and serves the others as zeros without a read."""
        if self.verify_zero:
            return np.ones(self.npages, bool)
        # Set only where True, from each pair read as one uint64 (0 is (ZERO, ZERO)), over the
        # rows loaded at open: comparing each value built temporaries of 3 bytes a page.
        mask = np.zeros(self.npages, bool)
        pairs = self._crc.view(np.uint64)[:, 0]
        with self._lock:
            for rows in _row_steps(self._loaded, self.npages):
                mask[np.flatnonzero(pairs[rows]) + rows.start] = True
        return mask

    def read_pages(self, start: int, count: int) -> bytes:
        """`count` pages from page `start`, each verified. DataError (EIO) naming the first bad
        page if any does not match its checksums; DiskError on an I/O error."""
        self._check_range(start, count)
        if count == 1:
            return self._read_one(start)
        end = start + count
        with self._lock:
            pair = self._crc[start:end].copy()
        zero = (pair[:, 0] == ZERO) & (pair[:, 1] == ZERO)
        if self.verify_zero:
            zero[:] = False     # check them like written pages (_verify: zeros match ZERO)
        if zero.all():
            return bytes(count * PAGE_SIZE)
        try:
            data = self._data.pread(start * PAGE_SIZE, count * PAGE_SIZE)
        except OSError as e:
            raise self._read_error(f"read of pages {start}..{end - 1}", e) from None
        ok = _verify(_page_crcs(data, count), pair)
        if zero.any():
            # Pages marked zero read as zeros whatever the disk holds (in swap mode a discard
            # only marks them); they need no check.
            ok |= zero
            if ok.all():
                data = self._zero_fill(data, zero)
        if not ok.all():
            bad = (np.flatnonzero(~ok) + start).tolist()
            with self._lock:
                self.checksum_errors += len(bad)
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            err = DataError(f"{self.path}: page {bad[0]}{more}: checksum mismatch")
            err.pages = bad
            raise err
        with self._lock:
            self.bd_reads += count
        return data

    def _read_one(self, i: int) -> bytes:
        """read_pages for a single page, same checks, scalar bookkeeping."""
        with self._lock:
            d, l = int(self._crc[i, 0]), int(self._crc[i, 1])
        if d == ZERO and l == ZERO and not self.verify_zero:
            return bytes(PAGE_SIZE)
        try:
            data = self._data.pread(i * PAGE_SIZE, PAGE_SIZE)
        except OSError as e:
            raise self._read_error(f"read of page {i}", e) from None
        c = max(_crc(data), _FOLD)
        if not (c == d or c == l or d == UNCHECKED or l == UNCHECKED
                or (c == ZERO_PAGE_CRC and (d == ZERO or l == ZERO))):
            with self._lock:
                self.checksum_errors += 1
            err = DataError(f"{self.path}: page {i}: checksum mismatch")
            err.pages = [i]
            raise err
        with self._lock:
            self.bd_reads += 1
        return data

    @staticmethod
    def _zero_fill(data: bytes, zero: np.ndarray) -> bytes:
        idx = np.flatnonzero(zero)
        buf = bytearray(data)
        z = bytes(PAGE_SIZE)
        for i in idx.tolist():
            o = i * PAGE_SIZE
            if buf[o:o + PAGE_SIZE] != z:
                buf[o:o + PAGE_SIZE] = z
        return bytes(buf)

    def read_page(self, idx: int) -> bytes:
        return self.read_pages(idx, 1)

    # -- writes ------------------------------------------------------------------------------

    def write_pages(self, idxs: list[int], pages: list[bytes]) -> None:
        """Write whole pages (any order; contiguous runs go out in one syscall each).
        DiskError(err) on failure: the pages then read as their old or new bytes."""
        n = len(idxs)
        if n != len(pages):
            raise ValueError("write_pages: idxs and pages differ in length")
        if n == 0:
            return
        if self._closed:
            raise BackingError(f"{self.path}: backing is closed")
        if n == 1:  # scalar path: numpy's per-call overhead dominates one page
            i = int(idxs[0])
            if not 0 <= i < self.npages:
                raise OutOfRange(f"{self.path}: page {i} outside 0..{self.npages - 1}")
            if len(pages[0]) != PAGE_SIZE:
                raise ValueError(f"write_pages: every page must be {PAGE_SIZE} bytes")
            self._write_one(i, pages[0])
            return
        idx = np.fromiter(idxs, np.int64, n)
        if idx.min() < 0 or idx.max() >= self.npages:
            raise OutOfRange(f"{self.path}: page index outside 0..{self.npages - 1}")
        if sum(map(len, pages)) != n * PAGE_SIZE:
            raise ValueError(f"write_pages: every page must be {PAGE_SIZE} bytes")
        crcs = _fold(np.fromiter(map(_crc, pages), np.uint32, n))
        if not (np.diff(idx) > 0).all():
            order = np.argsort(idx, kind="stable")
            sidx = idx[order]
            spages = [pages[i] for i in order.tolist()]
        else:
            sidx, spages = idx, pages
        with self._lock:
            self._crc[idx, 0] = self._on_disk(idx)
            self._crc[idx, 1] = crcs
            self._inflight[idx] = True
            self._unsynced[idx] = True
        done = 0
        try:
            if not self.ephemeral:
                self._put_meta_blocks(np.unique(sidx // ENTRIES_PER_BLOCK))  # pairs first
            cuts = (np.flatnonzero(np.diff(sidx) != 1) + 1).tolist() if n > 1 else []
            for a, b in zip([0] + cuts, cuts + [n]):
                self._data.pwritev(int(sidx[a]) * PAGE_SIZE, spages[a:b])
                done = b
        except OSError as e:
            with self._lock:
                self._failed[sidx[done:]] = True
                self._inflight[idx] = False
            raise self._disk_error(f"write of {n - done} page(s) from page {int(sidx[done])}", e) from None
        except BaseException:
            with self._lock:
                self._inflight[idx] = False
            raise
        with self._lock:
            self._inflight[idx] = False
            self._failed[idx] = False
            self.bd_writes += n

    def _write_one(self, i: int, data) -> None:
        """write_pages for a single page, same protocol, scalar bookkeeping."""
        c = max(_crc(data), _FOLD)
        crc = self._crc
        with self._lock:
            if not self._failed[i]:
                crc[i, 0] = crc[i, 1]
            crc[i, 1] = c
            self._inflight[i] = True
            self._unsynced[i] = True
        try:
            if not self.ephemeral:
                self._put_meta_blocks((i // ENTRIES_PER_BLOCK,))
            self._data.pwrite(i * PAGE_SIZE, data)
        except OSError as e:
            with self._lock:
                self._failed[i] = True
                self._inflight[i] = False
            raise self._disk_error(f"write of page {i}", e) from None
        except BaseException:
            with self._lock:
                self._inflight[i] = False
            raise
        with self._lock:
            self._inflight[i] = False
            self._failed[i] = False
            self.bd_writes += 1

    def discard(self, start: int, count: int) -> None:
        """Drop pages: they read as zeros. Punches the file (except in swap mode, where the
        preallocated space is kept and only the table changes)."""
        self._check_range(start, count)
        if count == 0:
            return
        end = start + count
        with self._lock:
            # Only pairs not already (ZERO, ZERO) change (and a failed page's, whose disk is
            # unknown): writing every pair gave table memory and sidecar writes to pages that
            # never held data, as when mkfs discards a whole disk.
            pairs = self._crc.view(np.uint64)[start:end, 0]
            idx = np.flatnonzero((pairs != 0) | self._failed[start:end]) + start
            if self.ephemeral:
                self._crc[idx] = ZERO
                return
            self._crc[idx, 0] = self._on_disk(idx)
            self._crc[idx, 1] = ZERO
            self._inflight[idx] = True
            self._unsynced[idx] = True
        try:
            self._put_meta_blocks(np.unique(idx // ENTRIES_PER_BLOCK))
            self._punch(start, count)
        except OSError as e:
            with self._lock:
                self._failed[idx] = True
                self._inflight[idx] = False
            raise self._disk_error(f"discard of pages {start}..{end - 1}", e) from None
        except BaseException:
            with self._lock:
                self._inflight[idx] = False
            raise
        with self._lock:
            self._inflight[idx] = False
            self._failed[idx] = False

    def _punch(self, start: int, count: int) -> None:
        """Zero the pages on disk. The space stays reserved unless the file is sparse: a punch
        alone would give it back, and a later write there could meet ENOSPC."""
        offset, length = start * PAGE_SIZE, count * PAGE_SIZE
        try:
            if self.sparse:
                self._data.punch(offset, length)
            else:
                try:
                    self._data.zero_range(offset, length)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
                    self._data.punch(offset, length)
                    self._data.prealloc(offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):  # no hole punching here
                raise
            zeros = bytes(PAGE_SIZE)
            for o in range(start, start + count, 256):
                k = min(256, start + count - o)
                self._data.pwritev(o * PAGE_SIZE, [zeros] * k)

    def mark_lost(self, pages) -> None:
        """Record that acknowledged data of `pages` never reached the file (a close whose
        write-back failed): they read EIO until written again, and fsck lists them. Writes
        only the sidecar; DiskError if even that fails."""
        idx = np.unique(np.asarray(pages, np.int64))
        if not len(idx):
            return
        with self._lock:
            self._crc[idx] = LOST
            self._failed[idx] = False
        if self.ephemeral:
            return
        try:
            self._put_meta_blocks(np.unique(idx // ENTRIES_PER_BLOCK))
            self._meta.fsync()
        except OSError as e:
            raise self._disk_error(f"marking {len(idx)} lost page(s) in the sidecar", e) from None

    def _settle_pairs(self) -> None:
        """At open: a page whose pair still holds two values (written since a sync, then a
        crash or a failed write) is read once and its pair collapsed to the value its data
        matches, so a later sync does not keep reporting it. Pages matching neither keep their
        pair (they read EIO; fsck lists them)."""
        with self._lock:            # only rows loaded at open can hold two values
            pages = np.concatenate([np.zeros(0, np.int64)] + [
                np.flatnonzero(self._crc[rows, 0] != self._crc[rows, 1]) + rows.start
                for rows in _row_steps(self._loaded, self.npages)])
        if not len(pages):
            return
        try:
            self._data.fsync()      # what we read must be durable before the pairs say so
        except OSError as e:
            raise self._disk_error("fsync", e) from None
        settled = []
        for run in np.split(pages, np.flatnonzero(np.diff(pages) != 1) + 1):
            for lo in range(0, len(run), _FSCK_RUN):
                part = run[lo:lo + _FSCK_RUN]
                try:
                    data = self._data.pread(int(part[0]) * PAGE_SIZE, len(part) * PAGE_SIZE)
                except OSError as e:
                    log.warning("%s: reading pages %d..%d to settle their checksums: %s",
                                self.path, part[0], part[-1], e.strerror)
                    continue
                crcs = _page_crcs(data, len(part))
                with self._lock:
                    for p, c in zip(part.tolist(), crcs.tolist()):
                        d, l = self._crc[p]
                        if c in (d, l) or (c == ZERO_PAGE_CRC and ZERO in (d, l)):
                            self._crc[p] = c if c in (d, l) else ZERO
                            settled.append(p)
        if settled:
            try:
                self._put_meta_blocks(np.unique(np.asarray(settled) // ENTRIES_PER_BLOCK))
                self._meta.fsync()
            except OSError as e:
                raise self._disk_error("sidecar update", e) from None
            log.info("%s: settled the checksums of %d page(s) written before the last close",
                     self.path, len(settled))

    # -- durability --------------------------------------------------------------------------

    def sync(self) -> None:
        """Make every page written so far durable (see the module docstring for the order).
        DiskError on failure; the pages then keep both their values."""
        if self._closed:
            raise BackingError(f"{self.path}: backing is closed")
        with self._sync_lock:
            with self._lock:
                # the unsynced pages first: three full-size temporaries cost 768 MiB at 1 TiB
                cand = np.flatnonzero(self._unsynced)
                cand = cand[~self._inflight[cand] & ~self._failed[cand]]
                snap = self._crc[cand, 1].copy()
            if self.ephemeral or self.read_only:    # no sidecar to write
                with self._lock:
                    self._crc[cand, 0] = snap
                    self._unsynced[cand] = False
                return
            try:
                self._meta.fsync()  # (1) the pairs covering the data about to be made durable
                self._data.fsync()  # (2)
            except OSError as e:
                raise self._disk_error("fsync", e) from None
            with self._lock:  # (3) collapse what (2) covered and nobody rewrote since
                still = self._crc[cand, 1] == snap
                keep = cand[still]
                self._crc[keep, 0] = snap[still]
                self._unsynced[keep] = False
            try:
                self._put_meta_blocks(np.unique(keep // ENTRIES_PER_BLOCK))
                self._meta.fsync()
            except OSError as e:
                raise self._disk_error("sidecar update", e) from None

    def close(self, clean: bool = True) -> None:
        """Release the file. `clean=True` syncs and marks the sidecar clean (an error then
        propagates, still releasing everything); `clean=False` writes nothing (a crash, or a
        caller that has given up). Idempotent."""
        if self._closed:
            return
        try:
            if clean and not (self.ephemeral or self.read_only):
                self.sync()
                st = os.fstat(self._lock_fd)
                self._meta.pwrite(0, _pack_header(self.size, True, st.st_mtime_ns, st.st_ino))
                self._meta.fsync()
        except OSError as e:
            raise self._disk_error("clean close", e) from None
        finally:
            self._closed = True
            for d in (self._meta, self._data):
                if d is not None:
                    try:
                        d.close()
                    except OSError as e:
                        log.warning("%s: close: %s", self.path, e)
            os.close(self._lock_fd)  # releases the flock

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(clean=exc_type is None)


# ---------------------------------------------------------------------------------------------
# fsck


# fsck exit codes, as e2fsck's: scripts can tell a clean image from one that needs action
FSCK_CLEAN = 0       # closed cleanly, every page verified
FSCK_PROBLEMS = 1    # readable, but not closed cleanly or with pages written since the last sync
FSCK_DAMAGE = 4      # bad or lost pages, or a sidecar that cannot be used: some pages read EIO
FSCK_USAGE = 8       # not checked: missing, not a file, in use


@dataclass
class FsckReport:
    """What `fsck` found."""

    path: str
    size: int = 0
    npages: int = 0
    version: int | None = None
    closed_cleanly: bool = False  # the last mount ended with a clean close
    checked_pages: int = 0  # pages read and compared with their checksums
    zero_pages: int = 0  # marked zero (never written or discarded)
    unchecked_pages: int = 0  # no checksum to compare with
    inflight_pages: int = 0  # two checksums (written since the last sync); either may match
    bad_pages: list[int] = field(default_factory=list)  # data matches neither checksum
    lost_pages: list[int] = field(default_factory=list)  # write-back failed at close
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == FSCK_CLEAN

    @property
    def exit_code(self) -> int:
        if self.errors or self.bad_pages or self.lost_pages:
            return FSCK_DAMAGE
        if not self.closed_cleanly or self.inflight_pages or self.notes:
            return FSCK_PROBLEMS
        return FSCK_CLEAN

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exit_code"] = self.exit_code
        return d

    def summary(self) -> str:
        state = "closed cleanly" if self.closed_cleanly else "NOT closed cleanly"
        lines = [f"{self.path}: {_human(self.size)}, {self.npages} pages, {state}"]
        lines.append(f"  {self.checked_pages} checked, {self.zero_pages} never written or "
                     f"discarded, {self.unchecked_pages} without checksum, "
                     f"{self.inflight_pages} written since the last sync")
        for label, pages in (("bad (data matches no checksum)", self.bad_pages),
                             ("lost (write-back failed at unmount)", self.lost_pages)):
            if pages:
                shown = ", ".join(map(str, pages[:20]))
                more = f" (+{len(pages) - 20} more)" if len(pages) > 20 else ""
                lines.append(f"  {len(pages)} {label}, they read EIO: {shown}{more}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  error: {e}" for e in self.errors]
        verdict = {FSCK_CLEAN: "clean", FSCK_PROBLEMS: "problems found",
                   FSCK_DAMAGE: "damaged: some pages read EIO until rewritten"}[self.exit_code]
        lines.append(f"{verdict} (exit {self.exit_code})")
        return "\n".join(lines)


def fsck(path: str) -> FsckReport:
    """Check an unmounted backing file: sidecar header, size, and every page against its
    checksums (zero-marked pages must read as zeros). BackingError if the file is missing or
    not a file, BackingLocked if it is in use. Reads through the page cache and drops it."""
    path = os.path.abspath(os.fspath(path))
    st = _stat_backing(path)
    if st is None:
        raise BackingError(f"{path} does not exist")
    rep = FsckReport(path=path, size=st.st_size, npages=st.st_size // PAGE_SIZE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise BackingError(f"{path}: cannot open: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackingLocked(f"{path} is in use (mounted?)") from None
        if st.st_size % PAGE_SIZE:
            rep.errors.append(f"size {st.st_size} is not a multiple of {PAGE_SIZE}")
            return rep
        mpath = meta_path(path)
        try:
            with open(mpath, "rb") as f:
                raw_head = f.read(HEADER_SIZE)
                head = _parse_header(raw_head, mpath)
                rep.version, rep.closed_cleanly = head.version, head.clean
                rows = _table_rows(rep.npages)
                raw = f.read(rows * ENTRY_SIZE)
        except FileNotFoundError:
            rep.errors.append(f"no sidecar {mpath}: pages cannot be checked")
            return rep
        except BackingError as e:
            rep.errors.append(str(e))
            return rep
        if head.size != st.st_size:
            rep.errors.append(f"sidecar is for {head.size} bytes, file has {st.st_size}")
            return rep
        if len(raw) != rows * ENTRY_SIZE:
            rep.errors.append("sidecar is truncated")
            return rep
        table = np.frombuffer(raw, "<u4").reshape(rows, 2)[:rep.npages]
        if head.version == 1:
            table = np.where(table == 2, _FOLD, table).astype(np.uint32)
        if head.clean and st.st_mtime_ns != head.mtime_ns:
            rep.notes.append("file modified since its last clean unmount (mtime); if that was "
                             "on purpose, remove the sidecar to import the image unchecked")
        if not head.clean:
            rep.notes.append("not closed cleanly (crash?): pages written since the last sync "
                             "may read as their old bytes or EIO")
        d, l = table[:, 0], table[:, 1]
        rep.zero_pages = int(((d == ZERO) & (l == ZERO)).sum())
        rep.unchecked_pages = int(((d == UNCHECKED) | (l == UNCHECKED)).sum())
        rep.inflight_pages = int((d != l).sum())
        lost = (d == LOST) & (l == LOST)
        rep.lost_pages = np.flatnonzero(lost).tolist()
        for start in range(0, rep.npages, _FSCK_RUN):
            count = min(_FSCK_RUN, rep.npages - start)
            data = os.pread(fd, count * PAGE_SIZE, start * PAGE_SIZE)
            if len(data) < count * PAGE_SIZE:
                data += bytes(count * PAGE_SIZE - len(data))
            os.posix_fadvise(fd, start * PAGE_SIZE, count * PAGE_SIZE, os.POSIX_FADV_DONTNEED)
            ok = _verify(_page_crcs(data, count), table[start:start + count])
            ok |= lost[start:start + count]     # listed as lost, not as bad
            rep.bad_pages += (np.flatnonzero(~ok) + start).tolist()
        rep.checked_pages = rep.npages - rep.unchecked_pages - len(rep.lost_pages)
        return rep
    finally:
        os.close(fd)
