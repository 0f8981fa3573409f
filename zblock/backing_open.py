"""Opening a backing file: the checks, the lock, the space, the sidecar's table, and the pairs a
crash left; `Backing.open` (zblock.backing) serves its I/O from what open_files returns.

open_files, in order: the size rules (a new file needs a size; an existing one keeps its own,
never silently resized); the flock (exclusive, or shared for read-only opens); the table read
from the sidecar by its data extents, copying in only the 4 KiB blocks that hold entries (the
rest of the table stays memory the kernel has not given; the rows copied are `loaded`); a
version 1 sidecar converted; the data file's and the sidecar's space reserved (fallocate, or
zeros written into the holes); the sidecar header marked dirty until a clean close; and every
page that a crash or a failed write left with two checksums read once and settled. Swap mode
(ephemeral) instead discards the old contents and preallocates the file, with no sidecar.

Invariants: on any failure everything opened is closed again, and a file this call created is
removed with its sidecar. Rows of the table outside `loaded` are (ZERO, ZERO). Nothing else
uses the files yet, so settling writes sidecar blocks without the Backing's stripe locks.

What this module does not do: reads, writes, discards, syncs and close of an open backing file
(zblock.backing), the sidecar's format (zblock.sidecar), fsck (zblock.backing).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import stat
import time
from array import array
from dataclasses import dataclass
from typing import Callable

from . import PAGE_SIZE, vec
from .disk import FileDisk
from .diskstats import disk_error
from .errors import BackingError, BackingLocked
from . import pagemem
from .seal import Sealer, seal_path
from .sidecar import (ENTRIES_PER_BLOCK, ENTRY_SIZE, FOLD, HEADER_SIZE, META_VERSION, PAGE_RUN,
                      SCAN_ROWS, UNCHECKED, ZERO, ZERO_PAGE_CRC, meta_path, pack_header,
                      page_crcs, parse_header, row_steps, split_rows, table_rows)

# the same logger as zblock.backing: opening is part of what a backing file reports
log = logging.getLogger("zblock.backing")

# The table is written to a new sidecar in steps this big (one pwrite returns at most 2 GiB).
_WRITE_STEP = 64 << 20

DiskFactory = Callable[[str, str], object]  # (path, role "data" | "meta") -> disk


@dataclass
class Opened:
    """An open backing file's parts, from which Backing serves I/O."""

    path: str
    size: int
    lock_fd: int            # the data file, flocked; closing it releases the lock
    data: object            # disks (the zblock.disk interface): the raw image ...
    meta: object | None     # ... and the sidecar (None in swap and read-only modes)
    table: memoryview       # 'I', two per row: durable, latest (zblock.sidecar)
    state: str              # new | clean | recovered | imported | changed | ephemeral
    loaded: list            # (first, end) rows of `table` that may be other than (ZERO, ZERO)
    ephemeral: bool
    sparse: bool
    read_only: bool
    sealer: Sealer | None = None   # the encryption of an --encrypt image (zblock.seal)

    def close(self) -> None:
        """Release everything, writing nothing (the Backing could not be made)."""
        for d in (self.meta, self.data, self.sealer):
            if d is not None:
                d.close()
        os.close(self.lock_fd)


def open_files(path: str, size: int | None = None, *, ephemeral: bool = False,
               sparse: bool = False, read_only: bool = False, encrypt: bool = False,
               key: bytes | None = None, disk_factory: DiskFactory | None = None,
               progress: Callable[[str], None] | None = None) -> Opened:
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
    `encrypt` makes a new image encrypted (zblock.seal) under `key` (swap mode: a random key
    of this mount's own); an encrypted image opens only with its key, before any page is read.
    Raises BackingError with a one-line message, BackingLocked if another Backing has it,
    DiskError if settling the pairs a crash left fails.
    """
    path = os.path.abspath(os.fspath(path))
    factory = disk_factory or functools.partial(_default_factory, writable=not read_only)
    if size is not None and (not isinstance(size, int) or size <= 0 or size % PAGE_SIZE):
        raise BackingError(f"{path}: size {size!r} must be a positive multiple of {PAGE_SIZE}")
    st = stat_backing(path)
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
    made_meta = False           # this call created the sidecar (new or imported)
    made_seal = False           # ... or the seal file
    data = meta = sealer = None
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
        table = pagemem.array(2 * table_rows(npages), "I")
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
            for old in (meta_path(path), seal_path(path)):    # of discarded contents
                try:
                    os.unlink(old)
                except FileNotFoundError:
                    pass
            if encrypt:
                sealer = Sealer.ephemeral(size // PAGE_SIZE)
        elif read_only:
            state, _, loaded, encrypted = _load_table(path, size, new, fd, table, read_only=True)
            sealer = _open_sealer(path, size, state, encrypted, encrypt, key, None)
        else:
            state, version, loaded, encrypted = _load_table(path, size, new, fd, table)
            made_meta = state in ("new", "imported")
            made_seal = encrypt and state == "new"      # (before: a failed create leaves it)
            sealer = _open_sealer(path, size, state, encrypted, encrypt, key, factory)
            meta = factory(meta_path(path), "meta")
            if not sparse:
                _reserve(data, path, size, progress)
            # always: a lost page must still be recordable when the filesystem is full
            _reserve(meta, meta_path(path), HEADER_SIZE + table.nbytes, progress)
            if sealer is not None:      # no page can be written back without its seal
                _reserve(sealer.disk, seal_path(path), sealer.file_size, progress)
            if state == "imported" or version == 1:
                _write_table(meta, table, loaded)
            # dirty until a clean close
            meta.pwrite(0, pack_header(size, clean=False, encrypted=sealer is not None))
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
        if not (ephemeral or read_only):
            _settle_pairs(path, data, meta, table, loaded, size // PAGE_SIZE)
        return Opened(path, size, fd, data, meta, table, state, loaded, ephemeral, sparse,
                      read_only, sealer)
    except BaseException as e:
        for d in (meta, data, sealer):
            if d is not None:
                d.close()
        os.close(fd)
        if not isinstance(e, BackingLocked):
            for p in ([path] if created else []) + ([meta_path(path)] if made_meta else []) \
                    + ([seal_path(path)] if made_seal else []):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        if isinstance(e, OSError):
            raise BackingError(f"{path}: {e.strerror}") from None
        raise


def _open_sealer(path: str, size: int, state: str, encrypted: bool, encrypt: bool,
                 key: bytes | None, factory: DiskFactory | None) -> Sealer | None:
    """The image's encryption, its seal file written through `factory` (None: read-only), or
    None. BackingError with the reason when the image and the
    request do not agree: an encrypted image needs its key, and pages already in clear cannot
    be made secret by mounting with --encrypt."""
    if encrypted and not encrypt:
        raise BackingError(f"{path} is encrypted: mount it with --encrypt --key-file FILE")
    if not encrypt:
        if state == "new":              # a seal file left from an image of the same name
            try:
                os.unlink(seal_path(path))
            except FileNotFoundError:
                pass
        return None
    if key is None:
        raise BackingError(f"{path}: --encrypt needs --key-file (only swap mode makes its own key)")
    if state == "new":
        return Sealer.create(path, size, key, factory)
    if not encrypted:
        raise BackingError(f"{path} holds pages in clear (not made with --encrypt): an encrypted "
                           f"image must be a new one")
    return Sealer.open(path, size, key, factory)


# ---------------------------------------------------------------------------------------------
# the sidecar's table


def _load_table(path: str, size: int, new: bool, data_fd: int, table: memoryview,
                read_only: bool = False) -> tuple[str, int, list[tuple[int, int]], bool]:
    """Fill the zeroed `table` from the sidecar (creating it if needed, unless
    `read_only`); return how the file was found, the sidecar's format version, the row
    ranges that may hold other than (ZERO, ZERO) and whether the image is encrypted."""
    mpath = meta_path(path)
    nbytes = HEADER_SIZE + table.nbytes
    if new:
        mfd = os.open(mpath, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(mfd, nbytes)  # sparse zeros: every entry ZERO
        finally:
            os.close(mfd)
        return "new", META_VERSION, [], False
    try:
        mfd = os.open(mpath, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except FileNotFoundError:
        if os.path.exists(seal_path(path)):
            raise BackingError(f"{path} is encrypted ({seal_path(path)} is beside it) but its "
                               f"sidecar {mpath} is missing: restore the sidecar (importing the "
                               f"image would serve its ciphertext as data)") from None
        if not read_only:
            mfd = os.open(mpath, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(mfd, nbytes)
            finally:
                os.close(mfd)
        for lo in range(0, len(table), 2 * SCAN_ROWS):     # no temporary the table's size
            vec.fill(table, lo, min(lo + 2 * SCAN_ROWS, len(table)), UNCHECKED)
        return "imported", META_VERSION, [(0, len(table) // 2)], False
    try:
        head = parse_header(os.pread(mfd, HEADER_SIZE, 0), mpath)
        if head.size != size:
            raise BackingError(f"{mpath}: sidecar is for a {head.size}-byte file, the backing "
                               f"file is {size} bytes (remove the sidecar to import it unchecked)")
        loaded = pagemem.fill_from_file(mfd, table, HEADER_SIZE, f"{mpath}: sidecar", 8)
    finally:
        os.close(mfd)
    if head.version == 1:       # zblock.sidecar: "Version 1 sidecars"; open_files rewrites it
        for rows in row_steps(loaded, len(table) // 2):
            part = table[2 * rows.start:2 * rows.stop]
            values = part.tolist()
            if 2 in values:
                part[:] = array("I", [FOLD if v == 2 else v for v in values])
    if not head.clean:
        # after a crash: trust both values of every pair
        return "recovered", head.version, loaded, head.encrypted
    st = os.fstat(data_fd)
    if st.st_mtime_ns != head.mtime_ns:  # not the inode: `cp -p` of both files is fine
        # Written outside zblock (losetup, dd) since the clean unmount. The checksums stay
        # in force: bit rot and a stray dd look alike, and both must read as EIO. A user
        # who edited the image on purpose removes the sidecar to import it unchecked.
        return "changed", head.version, loaded, head.encrypted
    return "clean", head.version, loaded, head.encrypted


def _write_table(meta, table: memoryview, ranges) -> None:
    """Write the rows `ranges` ((first, end) rows) of `table` to the sidecar disk `meta`, in
    steps: no copy of the table, and no pwrite longer than one can be."""
    buf = memoryview(table).cast("B")
    for first, end in ranges:
        for lo in range(first * ENTRY_SIZE, end * ENTRY_SIZE, _WRITE_STEP):
            hi = min(lo + _WRITE_STEP, end * ENTRY_SIZE)
            meta.pwrite(HEADER_SIZE + lo, buf[lo:hi])


def _settle_pairs(path: str, data, meta, table: memoryview, loaded, npages: int) -> None:
    """A page whose pair still holds two values (written since a sync, then a crash or a
    failed write) is read once and its pair collapsed to the value its data matches, so a
    later sync does not keep reporting it. Pages matching neither keep their pair (they read
    EIO; fsck lists them). Only rows loaded from the sidecar can hold two values."""
    pages = []
    for rows in row_steps(loaded, npages):
        split = split_rows(table, rows.start, rows.stop)
        if 1 in split:          # rarely: positions costs as much with one as with all
            pages += vec.positions(split, rows.start)
    if not pages:
        return
    try:
        data.fsync()            # what we read must be durable before the pairs say so
    except OSError as e:
        raise disk_error(path, "fsync", e) from None
    settled = []
    for first, end in vec.runs(pages):
        for lo in range(first, end, PAGE_RUN):
            hi = min(lo + PAGE_RUN, end)
            try:
                raw = data.pread(lo * PAGE_SIZE, (hi - lo) * PAGE_SIZE)
            except OSError as e:
                log.warning("%s: reading pages %d..%d to settle their checksums: %s",
                            path, lo, hi - 1, e.strerror)
                continue
            for p, c in zip(range(lo, hi), page_crcs(raw, hi - lo)):
                d, l = table[2 * p], table[2 * p + 1]
                if c in (d, l) or (c == ZERO_PAGE_CRC and ZERO in (d, l)):
                    table[2 * p] = table[2 * p + 1] = c if c in (d, l) else ZERO
                    settled.append(p)
    if settled:
        try:
            for b in sorted({p // ENTRIES_PER_BLOCK for p in settled}):
                rows = table[2 * b * ENTRIES_PER_BLOCK:2 * (b + 1) * ENTRIES_PER_BLOCK]
                meta.pwrite(HEADER_SIZE + b * PAGE_SIZE, rows.tobytes())
            meta.fsync()
        except OSError as e:
            raise disk_error(path, "sidecar update", e) from None
        log.info("%s: settled the checksums of %d page(s) written before the last close",
                 path, len(settled))


# ---------------------------------------------------------------------------------------------
# checks and space


def stat_backing(path: str) -> os.stat_result | None:
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


def human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _reserve(disk, path: str, size: int, progress: Callable[[str], None] | None) -> None:
    """Allocate every block of the first `size` bytes of `disk` (the file at `path`) without
    changing its data. BackingError naming the sizes if the filesystem cannot hold it; the holes
    it had are then holes again (a failed fallocate may keep what it allocated)."""
    holes = _holes(path, size)
    if not holes:
        return
    try:
        disk.prealloc(0, size)
        return
    except OSError as e:
        if e.errno == errno.ENOSPC:
            err = _no_space(path, size)
            _give_back(disk, holes)
            raise err from None
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise BackingError(f"{path}: cannot reserve its space: {e.strerror}") from None
    # No fallocate here: write zeros into the holes (the data regions are allocated already).
    log.info("%s: the filesystem has no fallocate; writing zeros into its holes", path)
    total, done, last = sum(b - a for a, b in holes), 0, 0.0
    zeros = [bytes(PAGE_SIZE)] * 256
    for a, b in holes:
        for off in range(a, b, len(zeros) * PAGE_SIZE):
            n = min(len(zeros) * PAGE_SIZE, b - off)
            try:
                disk.pwritev(off, zeros[:n // PAGE_SIZE])
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    err = _no_space(path, size)
                    _give_back(disk, holes)
                    raise err from None
                raise BackingError(f"{path}: cannot reserve its space: {e.strerror}") from None
            done += n
            if progress and time.monotonic() - last >= 1.0:
                last = time.monotonic()
                progress(f"reserving {path}: {human(done)} of {human(total)} written")
    disk.fsync()


def _give_back(disk, holes: list[tuple[int, int]]) -> None:
    """Punch the ranges that were holes before a failed reservation (best effort: where the
    filesystem cannot punch, the zeros stay)."""
    for a, b in holes:
        try:
            disk.punch(a, b - a)
        except OSError:
            return


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
        f"{path}: cannot reserve {human(size)}: the filesystem has {human(free)} free and "
        f"needs {human(need)} more (free space, use a smaller --size, or mount with --sparse "
        f"to take the risk that writes fail once it is full)")


def _default_factory(path: str, role: str, writable: bool = True):
    # The data file bypasses the page cache; the sidecar is small and ordered by fsync.
    return FileDisk(path, direct=(role == "data"), writable=writable)
