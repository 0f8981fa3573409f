"""Disk objects: the lowest layer under zblock.backing, one object per open file.

A disk does positioned, page-aligned I/O on one file and nothing else: no checksums, no locks
beyond its own buffer pool. Every disk has one small interface (`size`, `pread`, `pwrite`,
`pwritev`, `fsync`, `punch`, `zero_range`, `prealloc`, `truncate`, `close`), so tests can stack
fault and crash layers (tests/faultdisk.py) under a real `Backing` through its `disk_factory`.

`FileDisk` is the real file. With `direct=True` it bypasses the page cache: O_DIRECT, from the
caller's buffer when that is one page-aligned buffer, else through page-aligned (mmap) bounce
buffers, where the filesystem accepts O_DIRECT, otherwise buffered I/O
followed by `sync_file_range` + `posix_fadvise(DONTNEED)` ("drop behind"), so writeback really
frees memory when the system is short of it (DESIGN "On-disk format"). `direct=False` is plain
buffered I/O (the sidecar).

Errors are OSError with the real errno; callers (Backing) turn them into DiskError.

Measured on this machine (Linux 6.18): O_DIRECT works on / (ext4 on virtio, logical block 512 B)
and also on tmpfs (/dev/shm, which accepts O_DIRECT since 6.6), so the drop-behind path is only a
fallback; tests force it with `FileDisk(path, direct=False, drop_cache=True)`. Writing then
reading 64 MiB through a Backing left 0 MiB of the file in the page cache (fincore) with either
path, 64 MiB with plain buffered I/O.

Thread-safety: FileDisk methods may run concurrently (pread/pwrite on one fd are atomic w.r.t.
the offset; the bounce-buffer pool has its own lock).

What this module does not do: checksums and crash-safe ordering (zblock.backing), fault
injection (tests/faultdisk.py).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading

from . import PAGE_SIZE
from .libc import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate,
                   sync_file_range)

# Bounce buffers are 1 MiB: the largest FUSE request (libfuse 3 max_write) is 256 pages, so one
# buffer serves a whole request; longer runs are split. Anonymous mmap memory is page-aligned,
# which O_DIRECT needs (address, length and offset multiples of the logical block size).
BOUNCE_SIZE = 1 << 20
_BOUNCE_KEEP = 4  # buffers kept for reuse: 2 cores, a few threads; the rest are unmapped
_IOV_MAX = 1024


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer: its address, read-only buffers' (bytes, a lent FUSE request's view)
    too, which ctypes' from_buffer refuses."""
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)


def _page_aligned(buf) -> bool:
    """Whether a buffer's memory starts on a page boundary (O_DIRECT can write it as it is)."""
    view = _PyBuffer()
    _get_buffer(buf, ctypes.byref(view), 0)     # PyBUF_SIMPLE: contiguous bytes, or raises
    try:
        return (view.buf or 0) % PAGE_SIZE == 0
    finally:
        _release_buffer(ctypes.byref(view))


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
        if len(bufs) == 1 and _page_aligned(bufs[0]):
            self._write_full(memoryview(bufs[0]), length, offset)     # a lent FUSE request
            return
        buf = self._pool.get()
        try:
            with memoryview(buf) as mv:
                if length <= BOUNCE_SIZE:  # the common case: one request, one syscall
                    # one join and one copy beat a Python loop over a run's 256 pages
                    mv[:length] = bufs[0] if len(bufs) == 1 else b"".join(bufs)
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
