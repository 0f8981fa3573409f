"""FUSE adapter: paths, offsets and errnos in front of a Store, served by either front end
(zblock.fuse.native, or zblock.fuse.libfuse through mfusepy). A protocol adapter only.

The filesystem has three kinds of files:

    /disk          the block file: Store.read/write/discard/fsync, size fixed at Store.size
    /stats         a JSON snapshot of Store.stats(), taken when the file is opened
    /params/NAME   one file per Store.param_names(); read: value + newline (snapshot at open),
                   write: Store.set_param (EINVAL and unchanged when invalid); params fixed at
                   mount are read-only (0444, EACCES on open for writing)

Invariants:
  - No cache logic lives here. Every byte of `disk` goes to the Store in one call per request,
    so a 1 MiB write reaches the Store whole and can be compressed on every core at once.
  - Errors leave as errnos: a ZblockError answers its `.errno`, an OSError its own, anything
    else EIO (logged). mfusepy would answer EINVAL for unknown exceptions; EIO is what a disk says.
  - Block-device semantics are decided here only where they are about offsets: truncate and
    O_TRUNC are accepted and ignored, a write starting at or past the end is ENOSPC, a write
    that crosses the end is cut short at the end (as a block device does), reads past the end
    return b"" (the Store clips).
  - xattr operations are not implemented on purpose: the front ends answer ENOSYS once and the
    kernel stops asking GETXATTR(security.capability) before every write (fusepy's default
    getxattr raised ENOTSUP, which costs one round trip per write).
  - fallocate answers EOPNOTSUPP for modes we do not support, never ENOSYS: ENOSYS makes the
    kernel stop sending fallocate for the life of the mount, and the loop driver's discards
    (blkdiscard, fstrim, mkfs, swap) then never reach the Store.

Lock protocol: the adapter keeps one lock, `_fh_lock`, guarding `_handles` and `_next_fh` (the
per-open snapshots of stats/params files). The disk's fast path takes no lock of its own: the
Store serialises what needs it (page locks).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import threading
import time

from . import PAGE_SIZE
from .errors import ZblockError
from .libc import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE

log = logging.getLogger("zblock.fuse")

DISK = "/disk"
STATS = "/stats"
PARAMS_DIR = "/params"

_DISK_FH = 0          # the disk needs no per-open state; other files get fh >= 1


class FuseError(OSError):
    """An errno for the front end to answer (mfusepy's FuseOSError is the same idea)."""

    def __init__(self, err: int):
        super().__init__(err, os.strerror(err))


def _fuse_error(e: Exception, what: str) -> OSError:
    """The errno a failed operation answers: a ZblockError's own, an OSError's own, else EIO
    (logged: it is a bug)."""
    if isinstance(e, ZblockError):
        return FuseError(e.errno or errno.EIO)
    if isinstance(e, OSError):
        return e
    log.error("%s failed", what, exc_info=e)
    return FuseError(errno.EIO)


def _histogram(sizes: dict[int, int]) -> dict[str, int]:
    """Request counts by size, bucketed to the next power of two (keys are strings: JSON)."""
    hist: dict[str, int] = {}
    for nbytes, count in sorted(sizes.items()):
        bucket = str(1 << max(nbytes - 1, 0).bit_length() if nbytes > 0 else 0)
        hist[bucket] = hist.get(bucket, 0) + count
    return hist


def _errno_edge(method):
    """Turn zblock's exceptions into errnos at the edge (_fuse_error)."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception as e:
            raise _fuse_error(e, method.__name__) from None
    return wrapper


class _Snapshot:
    """Per-open state of a stats or params file: its bytes at open, and for params the write buffer."""

    __slots__ = ("data", "param", "wbuf")

    def __init__(self, data: bytes, param: str | None = None):
        self.data = data
        self.param = param
        self.wbuf: bytearray | None = None


class ZblockOps:
    """The filesystem. `store` is a zblock.store.Store (or anything with its interface).

    on_init(): called once the kernel's INIT arrives (the daemon's readiness signal).
    on_destroy(): called when libfuse tears the filesystem down (the daemon closes the Store).
    """

    use_ns = True

    def __init__(self, store, *, kernel_cache: bool = False, on_init=None, on_destroy=None):
        self.store = store
        self.kernel_cache = kernel_cache
        self._on_init = on_init
        self._on_destroy = on_destroy
        # what INIT agreed (front end, max_write, ...), shown under "fuse" in the stats file
        self._fuse_info: dict = {}
        self._fuse_counters = None
        # FUSE request sizes on the disk, counted per request (approximate under races: a
        # lock here would cost more than the count is worth); the stats' "request_sizes"
        self._read_sizes: dict[int, int] = {}
        self._write_sizes: dict[int, int] = {}
        self._fh_lock = threading.Lock()
        self._handles: dict[int, _Snapshot] = {}
        self._next_fh = 1
        self._mount_time = time.time_ns()
        self.uid = os.getuid()
        self.gid = os.getgid()

    # ------------------------------------------------------------------------------------------
    # lifecycle

    def negotiated(self, info: dict, counters=None) -> None:
        """The front end's INIT: record what it agreed (the stats' "fuse", with what
        `counters()` returns when the stats are read), then ready."""
        self._fuse_info = info
        self._fuse_counters = counters
        if self._on_init is not None:
            self._on_init()

    def destroy(self, path) -> None:
        if self._on_destroy is not None:
            self._on_destroy()

    # ------------------------------------------------------------------------------------------
    # helpers

    def _attrs(self, mode: int, size: int, nlink: int = 1) -> dict:
        t = self._mount_time
        return {"st_mode": mode, "st_nlink": nlink, "st_size": size, "st_uid": self.uid,
                "st_gid": self.gid, "st_atime": t, "st_mtime": t, "st_ctime": t,
                "st_blksize": PAGE_SIZE, "st_blocks": (size + 511) // 512}

    def _param_name(self, path: str) -> str | None:
        if path.startswith(PARAMS_DIR + "/"):
            name = path[len(PARAMS_DIR) + 1:]
            if name in self.store.param_names():
                return name
        return None

    def _new_handle(self, snap: _Snapshot) -> int:
        with self._fh_lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = snap
        return fh

    def _handle(self, fi) -> _Snapshot:
        snap = self._handles.get(fi.fh)
        if snap is None:
            raise FuseError(errno.EBADF)
        return snap

    # ------------------------------------------------------------------------------------------
    # metadata

    @_errno_edge
    def getattr(self, path, fh=None):
        if path == DISK:
            return self._attrs(stat.S_IFREG | 0o600, self.store.size)
        if path == "/":
            return self._attrs(stat.S_IFDIR | 0o755, 0, nlink=3)
        if path == STATS:
            # Size 0: the JSON is made at open and read with direct I/O, so readers go to EOF.
            return self._attrs(stat.S_IFREG | 0o444, 0)
        if path == PARAMS_DIR:
            return self._attrs(stat.S_IFDIR | 0o755, 0, nlink=2)
        name = self._param_name(path)
        if name is not None:
            mode = 0o644 if self.store.param_writable(name) else 0o444
            return self._attrs(stat.S_IFREG | mode, 0)
        raise FuseError(errno.ENOENT)

    @_errno_edge
    def readdir(self, path, fh):
        if path == "/":
            return [".", "..", "disk", "stats", "params"]
        if path == PARAMS_DIR:
            return [".", ".."] + list(self.store.param_names())
        raise FuseError(errno.ENOTDIR)

    def statfs(self, path):
        blocks = self.store.size // PAGE_SIZE
        # f_bsize/f_frsize 4096: the loop driver takes its discard granularity from them.
        return {"f_bsize": PAGE_SIZE, "f_frsize": PAGE_SIZE, "f_blocks": blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": 3, "f_ffree": 0, "f_namemax": 255}

    def truncate(self, path, length, fh=None):
        # Block-device semantics: the size never changes, so `dd of=disk` (O_TRUNC) and
        # `echo v > params/x` work. Only existing files get here.
        if path == DISK or path == STATS or self._param_name(path) is not None:
            return 0
        raise FuseError(errno.ENOENT)

    def create(self, path, mode, fi=None):
        raise FuseError(errno.EACCES)

    # ------------------------------------------------------------------------------------------
    # open / release

    @_errno_edge
    def open(self, path, fi):
        # raw_fi=True: fi is the fuse_file_info; we set fh and direct_io on it.
        acc = fi.flags & os.O_ACCMODE
        if path == DISK:
            fi.fh = _DISK_FH
            fi.direct_io = 0 if self.kernel_cache else 1
            if fi.direct_io and hasattr(fi, "parallel_direct_writes"):
                # the native front end, and libfuse 3.15 and later (mfusepy has the field
                # then): the kernel may send writes to the disk in parallel; the Store's page
                # locks keep them apart (docs/concurrency.md). Params and stats files: never.
                fi.parallel_direct_writes = 1
            return 0
        if path == STATS:
            if acc != os.O_RDONLY:
                raise FuseError(errno.EACCES)
            stats = self.store.stats()
            stats["request_sizes"] = {"read": _histogram(self._read_sizes),
                                      "write": _histogram(self._write_sizes)}
            stats["fuse"] = dict(self._fuse_info)
            if self._fuse_counters is not None:
                stats["fuse"].update(self._fuse_counters())
            data = (json.dumps(stats, indent=1, sort_keys=True) + "\n").encode()
            fi.fh = self._new_handle(_Snapshot(data))
            fi.direct_io = 1
            return 0
        name = self._param_name(path)
        if name is None:
            raise FuseError(errno.ENOENT)
        if acc != os.O_RDONLY and not self.store.param_writable(name):
            raise FuseError(errno.EACCES)          # fixed at mount
        data = (self.store.get_param(name) + "\n").encode()
        fi.fh = self._new_handle(_Snapshot(data, name))
        fi.direct_io = 1
        return 0

    def release(self, path, fi):
        if fi.fh != _DISK_FH:
            with self._fh_lock:
                self._handles.pop(fi.fh, None)
        return 0

    # ------------------------------------------------------------------------------------------
    # data

    # read and write map errors themselves instead of through _errno_edge: one Python call less
    # on every request (a 4 KiB request's own work is a few microseconds).

    def read(self, path, size, offset, fi):
        if fi.fh == _DISK_FH:
            sizes = self._read_sizes
            sizes[size] = sizes.get(size, 0) + 1
            try:
                return self.store.read(offset, size)
            except Exception as e:
                raise _fuse_error(e, "read") from None
        return self._handle(fi).data[offset:offset + size]

    def write(self, path, data, offset, fi):
        if fi.fh == _DISK_FH:
            n = len(data)
            sizes = self._write_sizes
            sizes[n] = sizes.get(n, 0) + 1
            size = self.store.size
            if offset >= size:
                raise FuseError(errno.ENOSPC)
            if offset + n > size:
                # Cut at the end, as a block device does; the next write gets ENOSPC.
                data = memoryview(data)[:size - offset]
            try:
                self.store.write(offset, data)
            except Exception as e:
                raise _fuse_error(e, "write") from None
            return len(data)
        return self._write_param(fi, data, offset)

    @_errno_edge
    def _write_param(self, fi, data, offset):
        snap = self._handle(fi)
        if snap.param is None:
            raise FuseError(errno.EACCES)
        # Apply on every write so the writer sees EINVAL from write(2) itself (echo reports
        # it), not from close(2). Writes of one open accumulate: "zs" + "td\n" is "zstd".
        if snap.wbuf is None:
            snap.wbuf = bytearray()
        end = offset + len(data)
        if len(snap.wbuf) < end:
            snap.wbuf.extend(b"\0" * (end - len(snap.wbuf)))
        snap.wbuf[offset:end] = data
        try:
            text = snap.wbuf.decode()
        except UnicodeDecodeError:
            raise FuseError(errno.EINVAL) from None
        self.store.set_param(snap.param, text.strip())
        return len(data)

    @_errno_edge
    def fsync(self, path, datasync, fi):
        if fi.fh == _DISK_FH:
            self.store.fsync()
        return 0

    @_errno_edge
    def fallocate(self, path, mode, offset, length, fi):
        if fi.fh != _DISK_FH:
            raise FuseError(errno.EOPNOTSUPP)
        if offset < 0 or length <= 0:
            raise FuseError(errno.EINVAL)
        size = self.store.size
        keep = mode & FALLOC_FL_KEEP_SIZE
        op = mode & ~FALLOC_FL_KEEP_SIZE
        if op == 0:
            # Preallocate: every byte of the disk already exists. Growing is not possible.
            if not keep and offset + length > size:
                raise FuseError(errno.ENOSPC)
            return 0
        if op == FALLOC_FL_PUNCH_HOLE and not keep:
            raise FuseError(errno.EOPNOTSUPP)   # punch-hole requires KEEP_SIZE (fallocate(2))
        if op not in (FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE):
            raise FuseError(errno.EOPNOTSUPP)
        if op == FALLOC_FL_ZERO_RANGE and not keep and offset + length > size:
            raise FuseError(errno.ENOSPC)
        # Both punch-hole and zero-range leave zeros: whole pages dropped, partial ones zeroed.
        if offset < size:
            self.store.discard(offset, min(length, size - offset))
        return 0
