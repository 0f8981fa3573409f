"""The mfusepy front end: ZblockOps served through libfuse 3 or 2 (the portable fallback of
zblock.fuse.native). What here depends on the loaded library: the mount options, INIT's
max_write, and the worker threads' Python thread states.

Import note: importing this module imports mfusepy, which loads libfuse 2 unless
FUSE_LIBRARY_NAME=fuse3 was set before (zblock.daemon sets it).
"""

from __future__ import annotations

import os

import mfusepy

from ..fuse_ops import ZblockOps
from ..threadstate import pin_thread_state

# libfuse 3 caps a request at FUSE_DEFAULT_MAX_PAGES_LIMIT (256) pages = 1 MiB; libfuse 2 at
# 32 pages (its receive buffer is 128 KiB + header, libfuse #161).
MAX_WRITE_FUSE3 = 1 << 20
MAX_WRITE_FUSE2 = 128 << 10


def fuse_version_major() -> int:
    """Major version of the libfuse mfusepy loaded in this process (2 or 3)."""
    return mfusepy.fuse_version_major


# libfuse 3.12-3.16's fuse_main() logs "Ignoring invalid max threads value 4294967295" at every
# mount: it hands its default max_idle_threads (-1: never stop an idle worker) to a setter that
# refuses it. At most max_threads (default 10) workers exist, so a limit of 10 idle ones never
# stops one either (workers keep their Python thread states, threadstate.py). max_threads itself
# is not passed: libfuse before 3.12 does not know the option and would refuse the mount.
MAX_IDLE_THREADS_FUSE3 = 10


def fuse_option_value(text: str) -> str:
    """`text` as the value of a libfuse -o option: libfuse splits options at commas and takes
    a backslash as an escape (sshfs escapes its fsname the same way)."""
    return text.replace("\\", "\\\\").replace(",", "\\,")


def mount_options(backing: str, kernel_cache: bool = False, allow_other: bool | None = None,
                  read_only: bool = False) -> dict:
    """Options for mfusepy.FUSE(...) on the loaded library.

    fsname/subtype make the mount table say `BACKING MOUNTPOINT fuse.zblock` (findmnt's SOURCE
    is the backing file); the CLI tells a zblock mount from any other by the type. libfuse 3
    refuses `max_write`/`big_writes` as options (see init_with_config); libfuse 2 needs them for
    anything above 4 KiB writes. `read_only`: the kernel answers EROFS to every write, params
    included. `direct_io` is set per open file (open), not per mount, because stats/params
    always need it.
    """
    opts: dict = {"foreground": True, "fsname": fuse_option_value(backing), "subtype": "zblock"}
    if read_only:
        opts["ro"] = True
    if allow_other is None:
        allow_other = os.geteuid() == 0
    if allow_other:
        # Root mounts serve loop devices, swap and other users; default_permissions makes the
        # kernel check the 0600 mode of `disk` instead of letting everyone in.
        opts["allow_other"] = True
        opts["default_permissions"] = True
    if fuse_version_major() == 2:
        opts["big_writes"] = True
        opts["max_write"] = MAX_WRITE_FUSE2
    else:
        opts["max_idle_threads"] = MAX_IDLE_THREADS_FUSE3
    return opts


class LibfuseOps(ZblockOps, mfusepy.Operations):
    """ZblockOps as mfusepy serves it. mfusepy.Operations supplies the operations zblock leaves
    out, marked so that mfusepy leaves them NULL in libfuse (xattrs: see zblock.fuse_ops).
    libfuse's worker threads call in through ctypes; the first request on each pins the
    worker's Python thread state (threadstate.py)."""

    def init_with_config(self, conn, config) -> None:
        max_write = None
        if conn is not None:
            want = MAX_WRITE_FUSE3 if fuse_version_major() == 3 else MAX_WRITE_FUSE2
            # libfuse 3 refuses -o max_write; this is the only place to raise it. The kernel
            # then sends up to 1 MiB per WRITE (libfuse 3.14 negotiates max_pages=256).
            conn.max_write = want
            conn.max_readahead = want
            max_write = int(conn.max_write)
        self.negotiated({"impl": "mfusepy", "libfuse": fuse_version_major(), "max_write": max_write})

    def read(self, path, size, offset, fi):
        pin_thread_state()
        return ZblockOps.read(self, path, size, offset, fi)

    def write(self, path, data, offset, fi):
        pin_thread_state()
        return ZblockOps.write(self, path, data, offset, fi)
