"""The bare Python FUSE memory file: the ceiling zblock is measured against.

    python tests/perf/memfile.py MOUNTPOINT --size 256M [--libfuse 3|2|native] [--max-write BYTES]
                                 [--backing FILE]

Exposes `MOUNTPOINT/disk` (SIZE bytes, a block device's semantics like zblock's `disk`) and
`MOUNTPOINT/stats` (JSON: libfuse version, max_write asked for and set, request-size histograms).
Pages live uncompressed in a dict {page index: bytes}; nothing else is done per page, so whatever
zblock loses against this file is the price of its own work (compression, locks, accounting),
not of Python + FUSE. Runs in the foreground until unmounted (`fusermount3 -u`, `umount`).

It uses the FUSE settings zblock's adapter uses, so that the difference is zblock's own work and
not the binding's: libfuse worker threads keep their Python thread states (zblock.threadstate;
without it every request creates and destroys one, which cost this file half of its 4 KiB IOPS),
and `disk` is opened with direct I/O. `--libfuse native` serves the same file on zblock's own
front end (zblock.fuse.native: parallel direct writes, root only), the ceiling of that path.

Invariants: every value in `pages` is exactly PAGE_SIZE bytes; a missing key reads as zeros.
Lock protocol: `rmw_lock` serialises read-modify-write of partial pages only (whole-page stores
are one dict assignment, atomic under the GIL). The histograms are updated without a lock and are
approximate under concurrent requests (they prove sizes, they are not exact counts).

What it does not do: persistence, compression, fsync (a no-op), resize.

`--backing FILE` (DiskFile): the pages live in FILE instead, read and written with O_DIRECT
through an aligned buffer per thread, and fsync is fsync(2): the ceiling of a Python FUSE server
over the backing disk, for the disk tier's benchmark. Its I/O must be page-aligned (EINVAL
otherwise) and it does not discard.
"""

from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import stat
from pathlib import Path
import sys
import threading
import time

PAGE_SIZE = 4096
ZERO_PAGE = bytes(PAGE_SIZE)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
pin_thread_state = None         # zblock.threadstate's, imported in main()


def _parse_size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().rstrip("B").rstrip("I")
    if t and t[-1] in mult:
        return int(t[:-1]) * mult[t[-1]]
    return int(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mountpoint")
    ap.add_argument("--size", default="256M")
    ap.add_argument("--libfuse", choices=("2", "3", "native", "native-uring"), default="3")
    ap.add_argument("--max-write", type=int, default=1 << 20,
                    help="bytes; libfuse 3 sets it in init (it refuses -o max_write), "
                         "libfuse 2 takes -o max_write and the kernel caps it at 128 KiB")
    ap.add_argument("--backing", help="a file of --size bytes that holds the pages (O_DIRECT)")
    args = ap.parse_args(argv)
    size = _parse_size(args.size)
    if size <= 0 or size % PAGE_SIZE:
        print(f"memfile: --size {args.size!r} must be a positive multiple of {PAGE_SIZE}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    if args.libfuse.startswith("native"):
        return serve_native(args.mountpoint, size, args.max_write, args.libfuse == "native-uring",
                            args.backing)
    # mfusepy picks libfuse 2 when both are installed unless told (DESIGN: Concurrency model).
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3" if args.libfuse == "3" else "fuse"
    import mfusepy
    global pin_thread_state
    from zblock.threadstate import pin_thread_state

    ops = MemFile(mfusepy, size, args.max_write) if args.backing is None else \
        DiskFile(args.backing, mfusepy, size, args.max_write)
    kwargs = dict(foreground=True, fsname="memfile", raw_fi=True)
    if mfusepy.fuse_version_major == 2:
        kwargs.update(big_writes=True, max_write=min(args.max_write, 128 << 10))
    mfusepy.FUSE(ops, args.mountpoint, **kwargs)
    return 0


class _NativeErrors:
    """What MemFile takes from mfusepy, for the native front end."""

    fuse_version_major = "native"
    fuse_version_minor = "-"

    @staticmethod
    def FuseOSError(err: int) -> OSError:
        return OSError(err, os.strerror(err))


def serve_native(mountpoint: str, size: int, max_write: int, uring: bool = False,
                 backing: str | None = None) -> int:
    import signal
    from zblock.fuse.native import URING_DEPTH, NativeFuse
    global pin_thread_state
    pin_thread_state = lambda: None         # noqa: E731 -- Python threads keep theirs anyway
    ops = MemFile(_NativeErrors, size, max_write) if backing is None else \
        DiskFile(backing, _NativeErrors, size, max_write)
    session = NativeFuse(ops, mountpoint, fsname="memfile", allow_other=True,
                         uring_depth=URING_DEPTH if uring else 0)
    session.mount()
    ops.max_write_set = max_write
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: session.stop())
    session.serve()
    return 0


class MemFile:
    """fusepy-style Operations: `/disk` and `/stats` in a flat root directory."""

    use_ns = True

    def __init__(self, mfusepy, size: int, max_write: int):
        self._fuse = mfusepy
        self.size = size
        self.npages = size // PAGE_SIZE
        self.pages: dict[int, bytes] = {}
        self.rmw_lock = threading.Lock()
        self.max_write_asked = max_write
        self.max_write_set = None
        self.write_sizes: dict[int, int] = {}
        self.read_sizes: dict[int, int] = {}
        now = time.time_ns()
        self._times = dict(st_atime=now, st_mtime=now, st_ctime=now)

    # -- lifecycle ----------------------------------------------------------------------------
    def init_with_config(self, conn, config):
        if conn is not None:
            if self._fuse.fuse_version_major == 3:
                conn.max_write = self.max_write_asked
            self.max_write_set = int(conn.max_write)

    # -- metadata -----------------------------------------------------------------------------
    def getattr(self, path, fh=None):
        if path == "/":
            return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2, **self._times)
        if path == "/disk":
            return dict(st_mode=stat.S_IFREG | 0o600, st_nlink=1, st_size=self.size,
                        st_blocks=self.size // 512, **self._times)
        if path == "/stats":
            # a size larger than the JSON: direct I/O ends the read at the short reply
            return dict(st_mode=stat.S_IFREG | 0o444, st_nlink=1, st_size=1 << 16, **self._times)
        raise self._fuse.FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", "..", "disk", "stats"]

    def statfs(self, path):
        return dict(f_bsize=PAGE_SIZE, f_frsize=PAGE_SIZE, f_blocks=self.npages,
                    f_bfree=0, f_bavail=0, f_namemax=255)

    def open(self, path, fi):
        # raw_fi: fi is the fuse_file_info, so the disk gets zblock's open flags (see main)
        if path == "/disk":
            fi.fh = 1
            fi.direct_io = 1
            if hasattr(fi, "parallel_direct_writes"):
                fi.parallel_direct_writes = 1       # as zblock's disk (zblock.fuse_ops.open)
            return 0
        if path == "/stats":
            fi.fh = 2
            fi.direct_io = 1
            return 0
        raise self._fuse.FuseOSError(errno.ENOENT)

    def truncate(self, path, length, fh=None):
        return 0  # a block device's size never changes; O_TRUNC accepted and ignored

    def fsync(self, path, datasync, fh):
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        return 0

    def utimens(self, path, times=None):
        return 0

    # -- data ---------------------------------------------------------------------------------
    def read(self, path, size, offset, fi):
        pin_thread_state()
        if fi.fh == 2:
            return self._stats_json()[offset:offset + size]
        h = self.read_sizes
        h[size] = h.get(size, 0) + 1
        if offset >= self.size:
            return b""
        size = min(size, self.size - offset)
        first, skip = divmod(offset, PAGE_SIZE)
        last = (offset + size + PAGE_SIZE - 1) // PAGE_SIZE
        get = self.pages.get
        out = b"".join([get(i, ZERO_PAGE) for i in range(first, last)])
        if skip or len(out) != size:
            out = out[skip:skip + size]
        return out

    def write(self, path, data, offset, fi):
        pin_thread_state()
        if fi.fh != 1:
            raise self._fuse.FuseOSError(errno.EACCES)
        n = len(data)
        h = self.write_sizes
        h[n] = h.get(n, 0) + 1
        if offset + n > self.size:
            raise self._fuse.FuseOSError(errno.ENOSPC)
        pages = self.pages
        if offset % PAGE_SIZE == 0 and n % PAGE_SIZE == 0:
            first = offset // PAGE_SIZE
            for k in range(n // PAGE_SIZE):
                pages[first + k] = data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
            return n
        pos = 0
        while pos < n:
            idx, skip = divmod(offset + pos, PAGE_SIZE)
            take = min(PAGE_SIZE - skip, n - pos)
            if take == PAGE_SIZE:
                pages[idx] = data[pos:pos + take]
            else:
                with self.rmw_lock:
                    old = pages.get(idx, ZERO_PAGE)
                    pages[idx] = old[:skip] + data[pos:pos + take] + old[skip + take:]
            pos += take
        return n

    def fallocate(self, path, mode, offset, length, fi):
        """Discard: punch-hole or zero-range drop whole pages and zero partial ones."""
        if fi.fh != 1:
            raise self._fuse.FuseOSError(errno.EOPNOTSUPP)
        if not (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)):
            # never ENOSYS: the kernel would stop sending fallocate for the life of the mount
            raise self._fuse.FuseOSError(errno.EOPNOTSUPP)
        end = min(offset + length, self.size)
        pos = offset
        pages = self.pages
        while pos < end:
            idx, skip = divmod(pos, PAGE_SIZE)
            take = min(PAGE_SIZE - skip, end - pos)
            if take == PAGE_SIZE:
                pages.pop(idx, None)
            else:
                with self.rmw_lock:
                    old = pages.get(idx)
                    if old is not None:
                        pages[idx] = old[:skip] + bytes(take) + old[skip + take:]
            pos += take
        return 0

    def _stats_json(self) -> bytes:
        return (json.dumps({
            "libfuse": f"{self._fuse.fuse_version_major}.{self._fuse.fuse_version_minor}",
            "max_write_asked": self.max_write_asked,
            "max_write_set": self.max_write_set,
            "stored_pages": len(self.pages),
            "request_sizes": {"write": {str(k): v for k, v in sorted(self.write_sizes.items())},
                              "read": {str(k): v for k, v in sorted(self.read_sizes.items())}},
        }) + "\n").encode()


def _blocking() -> None:
    """On zblock's native front end, what zblock's disk reads do before they wait (zblock.handoff:
    another worker reads the device meanwhile); nothing on libfuse."""
    if "zblock.handoff" in sys.modules:
        sys.modules["zblock.handoff"].blocking()


class DiskFile(MemFile):
    """MemFile over a file with O_DIRECT (see the module docstring, `--backing`)."""

    def __init__(self, path: str, *args):
        super().__init__(*args)
        self.fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        self._bufs = threading.local()

    def _buffer(self, size: int) -> memoryview:
        buf = getattr(self._bufs, "buf", None)
        if buf is None:
            buf = self._bufs.buf = mmap.mmap(-1, max(self.max_write_asked, 1 << 20))
        return memoryview(buf)[:size]

    def _check(self, offset: int, size: int) -> None:
        if offset % PAGE_SIZE or size % PAGE_SIZE or offset + size > self.size:
            raise self._fuse.FuseOSError(errno.EINVAL)

    def read(self, path, size, offset, fi):
        if fi.fh == 2:
            return super().read(path, size, offset, fi)
        size = min(size, self.size - offset)
        self._check(offset, size)
        buf = self._buffer(size)
        _blocking()
        return bytes(buf[:os.preadv(self.fd, [buf], offset)])

    def write(self, path, data, offset, fi):
        if fi.fh != 1:
            raise self._fuse.FuseOSError(errno.EACCES)
        self._check(offset, len(data))
        buf = self._buffer(len(data))
        buf[:] = data
        _blocking()
        return os.pwritev(self.fd, [buf], offset)

    def fsync(self, path, datasync, fh):
        os.fsync(self.fd)
        return 0

    def fallocate(self, path, mode, offset, length, fi):
        raise self._fuse.FuseOSError(errno.EOPNOTSUPP)


if __name__ == "__main__":
    sys.exit(main())
