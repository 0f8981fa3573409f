"""The FUSE kernel protocol, as much of it as zblock speaks: opcodes, flags and the structs
(include/uapi/linux/fuse.h, protocol 7.x, little-endian as on every machine zblock runs on).

Only definitions live here: no I/O and no policy (zblock.fuse.native uses them).
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
# The newest minor whose structs this module knows; INIT agrees on min(kernel's, this). 7.36
# (Linux 5.17) made fuse_init_in/out 64 bytes with flags2; every older kernel is refused.
KERNEL_MINOR = 38
MIN_KERNEL_MINOR = 36

# opcodes (enum fuse_opcode)
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
GETXATTR = 22
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
ACCESS = 34
CREATE = 35
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44

# INIT flags (fuse_init_in/out.flags)
FUSE_ASYNC_READ = 1 << 0
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_BIG_WRITES = 1 << 5
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
FUSE_INIT_EXT = 1 << 30                       # the flags2 word is meant
# flags2 (the high 32 bits of the 64-bit flags)
FUSE_OVER_IO_URING = 1 << (41 - 32)           # requests through io_uring (zblock.fuse.uring)
INIT_FLAG_NAMES = {FUSE_ASYNC_READ: "async_read", FUSE_ATOMIC_O_TRUNC: "atomic_o_trunc",
                   FUSE_BIG_WRITES: "big_writes", FUSE_ASYNC_DIO: "async_dio",
                   FUSE_WRITEBACK_CACHE: "writeback_cache", FUSE_PARALLEL_DIROPS: "parallel_dirops",
                   FUSE_MAX_PAGES: "max_pages"}

# OPEN reply flags (fuse_open_out.open_flags)
FOPEN_DIRECT_IO = 1 << 0
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# SETATTR valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3

FSYNC_FDATASYNC = 1 << 0

# ioctl(new_fd, FUSE_DEV_IOC_CLONE, &old_fd): _IOR(229, 0, uint32_t)
FUSE_DEV_IOC_CLONE = (2 << 30) | (4 << 16) | (229 << 8) | 0

# dirent types (DT_*)
DT_DIR = 4
DT_REG = 8

IN_HEADER = struct.Struct("<IIQQIIIHH")      # len opcode unique nodeid uid gid pid extlen pad
IN_HEAD = struct.Struct("<IIQQ")             # its first fields: len opcode unique nodeid
OUT_HEADER = struct.Struct("<IiQ")           # len error unique
INIT_IN = struct.Struct("<IIIII")            # major minor max_readahead flags flags2 (+ unused)
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 max_stack_depth, then unused space to 64 bytes
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")    # fuse_attr
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")    # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT_HEAD = struct.Struct("<QII")        # attr_valid attr_valid_nsec dummy
OPEN_IN = struct.Struct("<II")               # flags open_flags
OPEN_OUT = struct.Struct("<QIi")             # fh open_flags backing_id
READ_IN = struct.Struct("<QQII")             # fh offset size read_flags (+ lock_owner flags)
WRITE_IN = struct.Struct("<QQII")            # fh offset size write_flags (+ lock_owner flags)
WRITE_IN_SIZE = 40
WRITE_OUT = struct.Struct("<II")             # size padding
RELEASE_IN = struct.Struct("<QII")           # fh flags release_flags (+ lock_owner)
FSYNC_IN = struct.Struct("<QII")             # fh fsync_flags padding
SETATTR_IN = struct.Struct("<IIQQ")          # valid padding fh size (+ the rest)
FALLOCATE_IN = struct.Struct("<QQQI")        # fh offset length mode
BATCH_FORGET_IN = struct.Struct("<II")       # count dummy
KSTATFS = struct.Struct("<QQQQQIII4x24x")    # blocks bfree bavail files ffree bsize namelen frsize
DIRENT_HEAD = struct.Struct("<QQII")         # ino off namelen type, then the name padded to 8


def dirent_size(name: bytes) -> int:
    """Bytes of one fuse_dirent holding `name`: the header and the name, padded to 8."""
    return (DIRENT_HEAD.size + len(name) + 7) & ~7
