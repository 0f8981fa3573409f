"""libc through ctypes, loaded once: the calls the os module lacks, and their constants.

One handle, `libc`, with prototypes for what zblock calls: fallocate and sync_file_range
(zblock.disk), prctl, mlockall and munlockall (zblock.hardening, zblock.memory), malloc_trim and
mallopt (zblock.pool, zblock.memory), mount and umount2 (zblock.fuse.native, zblock.runtime),
syscall (io_uring's calls, which glibc does not wrap: zblock.fuse.uring).
The Linux constants these calls take (linux/falloc.h, linux/fs.h, linux/prctl.h, sys/mman.h,
sys/mount.h) are defined here and nowhere else.

Invariant: the handle is opened with use_errno=True, so ctypes.get_errno() right after a call
that failed is that call's errno; `fallocate()`, `sync_file_range()`, `mount()` and `umount2()`
raise it as OSError.
A symbol this libc lacks (malloc_trim and mallopt are glibc's) is simply not given a prototype:
callers look it up with getattr(libc, name, None).

What this module does not do: decide anything. Callers own the policy and the messages.
"""

from __future__ import annotations

import ctypes
import os

# glibc's soname (zblock is Linux-only): ctypes.util.find_library runs ldconfig and costs an idle
# server 1.4 MiB of modules
libc = ctypes.CDLL("libc.so.6", use_errno=True)

# fallocate(2) modes (linux/falloc.h); also the modes the FUSE adapter accepts
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# sync_file_range(2) flags (linux/fs.h)
SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
SYNC_FILE_RANGE_ALL = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER

# prctl(2) (linux/prctl.h, Linux 5.6) and mlockall(2) (sys/mman.h)
PR_SET_IO_FLUSHER = 57
PR_GET_IO_FLUSHER = 58
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4

# mount(2) flags and umount2(2) flags (sys/mount.h)
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2

_PROTOTYPES = {
    "fallocate": (ctypes.c_int, (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)),
    "sync_file_range": (ctypes.c_int, (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)),
    "prctl": (ctypes.c_int, (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)),
    "mlockall": (ctypes.c_int, (ctypes.c_int,)),
    "munlockall": (ctypes.c_int, ()),
    "malloc_trim": (ctypes.c_int, (ctypes.c_size_t,)),
    "mallopt": (ctypes.c_int, (ctypes.c_int, ctypes.c_int)),
    "madvise": (ctypes.c_int, (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)),
    "mount": (ctypes.c_int, (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                             ctypes.c_char_p)),
    "umount2": (ctypes.c_int, (ctypes.c_char_p, ctypes.c_int)),
    # variadic in C; seven longs is how every 64-bit ABI Linux runs on passes its arguments
    "syscall": (ctypes.c_long, (ctypes.c_long,) * 7),
}
for _name, (_restype, _argtypes) in _PROTOTYPES.items():
    _fn = getattr(libc, _name, None)
    if _fn is not None:
        _fn.restype, _fn.argtypes = _restype, _argtypes


syscall = libc.syscall


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if libc.fallocate(fd, mode, offset, length) != 0:
        _raise_errno()


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        _raise_errno()


def umount2(target: str, flags: int) -> None:
    if libc.umount2(target.encode(), flags) != 0:
        _raise_errno()


def sync_file_range(fd: int, offset: int, length: int, flags: int = SYNC_FILE_RANGE_ALL) -> None:
    if libc.sync_file_range(fd, offset, length, flags) != 0:
        _raise_errno()
