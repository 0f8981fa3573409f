"""The FUSE adapter called without a mount: paths, offsets and errnos over a real Store.

mfusepy is imported here on whatever library it picks (libfuse 2 by default): the operations
object does not depend on it; zblock.fuse.libfuse's init_with_config and mount options do, tested
for both values of max_write.
"""

import errno
import json
import os

import mfusepy
import pytest

from zblock.config import Config
from zblock.errors import DataError
from zblock.fuse import libfuse
from zblock.fuse_ops import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE,
                             ZblockOps)

SIZE = 4 << 20


def open_store(path, size=SIZE):
    try:
        from zblock.store import Store
    except ImportError:
        from mountutil import FileStore as Store
    return Store.open(str(path), size, Config(pool_limit=8 << 20))


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "b.img")
    yield s
    s.close()


@pytest.fixture
def ops(store):
    return ZblockOps(store)


def fi(flags=os.O_RDWR):
    f = mfusepy.fuse_file_info()
    f.flags = flags
    return f


def opened(ops, path, flags=os.O_RDWR):
    f = fi(flags)
    assert ops.open(path, f) == 0
    return f


def errno_of(fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


# ---------------------------------------------------------------------------------------------
# metadata


def test_getattr_and_readdir(ops):
    disk = ops.getattr("/disk")
    assert disk["st_size"] == SIZE and disk["st_mode"] & 0o777 == 0o600
    assert disk["st_mode"] & 0o170000 == 0o100000
    assert ops.getattr("/")["st_mode"] & 0o170000 == 0o040000
    assert ops.getattr("/params")["st_mode"] & 0o170000 == 0o040000
    assert ops.getattr("/stats")["st_mode"] & 0o777 == 0o444
    assert ops.getattr("/params/compressor")["st_mode"] & 0o777 == 0o644
    for bad in ("/nope", "/params/nope", "/disk/x"):
        assert errno_of(ops.getattr, bad) == errno.ENOENT
    assert set(ops.readdir("/", 0)) >= {"disk", "stats", "params"}
    names = set(ops.readdir("/params", 0))
    assert {"compressor", "pool_limit", "accept_threshold", "hw_batch", "idle"} <= names
    # fixed at mount: there to read, not to write
    assert {"swap", "kernel_cache", "far", "far_replicas"} <= names
    for fixed in ("/params/swap", "/params/far"):
        assert ops.getattr(fixed)["st_mode"] & 0o777 == 0o444


def test_statfs_block_size(ops):
    st = ops.statfs("/")
    assert st["f_bsize"] == 4096 and st["f_frsize"] == 4096
    assert st["f_blocks"] == SIZE // 4096


def test_xattrs_left_unimplemented(store):
    # mfusepy leaves an op NULL when it keeps the base class's marker: the kernel then stops
    # asking GETXATTR(security.capability) before every write.
    ops = libfuse.LibfuseOps(store)
    for name in ("getxattr", "setxattr", "listxattr", "removexattr"):
        assert getattr(getattr(ops, name), "libfuse_ignore", False), name
        assert not hasattr(ZblockOps, name)         # the native front end: ENOSYS
    # and the ones we need are registered
    for name in ("read", "write", "fallocate", "statfs", "fsync", "truncate", "open", "destroy"):
        assert not getattr(getattr(ops, name), "libfuse_ignore", False), name


@pytest.mark.parametrize("major,expected", [(3, 1 << 20), (2, 128 << 10)])
def test_init_sets_max_write(store, monkeypatch, major, expected):
    monkeypatch.setattr(mfusepy, "fuse_version_major", major)
    called = []
    ops = libfuse.LibfuseOps(store, on_init=lambda: called.append(1))
    conn = mfusepy.fuse_conn_info()
    ops.init_with_config(conn, None)
    assert conn.max_write == expected and called == [1]
    opts = libfuse.mount_options("/var/lib/zblock/disk.img")
    assert opts["fsname"] == "/var/lib/zblock/disk.img" and opts["subtype"] == "zblock"
    assert opts["foreground"]
    assert ("max_write" in opts) == (major == 2)       # libfuse 3 refuses it as an option
    # libfuse 2 has no such option; 3 needs a valid one (test_mount: nothing in the log)
    assert ("max_idle_threads" in opts) == (major == 3)


def test_fsname_escapes_what_libfuse_splits_options_at():
    assert libfuse.fuse_option_value(r"/img/a,b\c d.img") == r"/img/a\,b\\c d.img"


# ---------------------------------------------------------------------------------------------
# disk


def test_direct_io_unless_kernel_cache(store):
    assert opened(ZblockOps(store), "/disk").direct_io == 1
    assert opened(ZblockOps(store, kernel_cache=True), "/disk").direct_io == 0
    assert opened(ZblockOps(store, kernel_cache=True), "/stats", os.O_RDONLY).direct_io == 1


def test_unaligned_write_read_roundtrip(ops):
    f = opened(ops, "/disk")
    model = bytearray(SIZE)
    rnd = __import__("random").Random(7)
    for _ in range(60):
        off = rnd.randrange(0, SIZE - 20000)
        data = rnd.randbytes(rnd.randrange(1, 20000))
        assert ops.write("/disk", data, off, f) == len(data)
        model[off:off + len(data)] = data
    for _ in range(60):
        off = rnd.randrange(0, SIZE)
        n = rnd.randrange(1, 70000)
        assert ops.read("/disk", n, off, f) == bytes(model[off:off + n])
    big = os.urandom(1 << 20)
    ops.write("/disk", big, 12345, f)
    assert ops.read("/disk", 1 << 20, 12345, f) == big


def test_eof_and_past_the_end(ops):
    f = opened(ops, "/disk")
    assert ops.read("/disk", 4096, SIZE, f) == b""
    assert ops.read("/disk", 4096, SIZE + 10 * 4096, f) == b""
    assert ops.read("/disk", 8192, SIZE - 4096, f) == bytes(4096)
    assert errno_of(ops.write, "/disk", b"x", SIZE, f) == errno.ENOSPC
    assert errno_of(ops.write, "/disk", b"x" * 4096, SIZE + 4096, f) == errno.ENOSPC
    # a write crossing the end is cut at the end, like a block device's
    assert ops.write("/disk", b"y" * 8192, SIZE - 4096, f) == 4096
    assert ops.read("/disk", 8192, SIZE - 4096, f) == b"y" * 4096


def test_truncate_ignored(ops):
    f = opened(ops, "/disk", os.O_WRONLY | os.O_TRUNC)
    ops.write("/disk", b"a" * 4096, 0, f)
    assert ops.truncate("/disk", 0) == 0
    assert ops.truncate("/disk", 0, f) == 0
    assert ops.getattr("/disk")["st_size"] == SIZE
    assert ops.read("/disk", 4096, 0, f) == b"a" * 4096
    assert errno_of(ops.truncate, "/nope", 0) == errno.ENOENT


def test_fallocate_modes(ops, store):
    f = opened(ops, "/disk")
    data = os.urandom(64 * 1024)
    ops.write("/disk", data, 0, f)
    before = store.stats()["discarded_pages"]
    # punch-hole | keep-size: whole pages dropped, partial ones zeroed
    ops.fallocate("/disk", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1000, 3 * 4096 + 100, f)
    expect = bytearray(data)
    expect[1000:1000 + 3 * 4096 + 100] = bytes(3 * 4096 + 100)
    assert ops.read("/disk", len(data), 0, f) == bytes(expect)
    assert store.stats()["discarded_pages"] > before
    # zero-range (with and without keep-size)
    ops.fallocate("/disk", FALLOC_FL_ZERO_RANGE, 32768, 4096, f)
    ops.fallocate("/disk", FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 40960, 5, f)
    expect[32768:36864] = bytes(4096)
    expect[40960:40965] = bytes(5)
    assert ops.read("/disk", len(data), 0, f) == bytes(expect)
    # mode 0 inside the disk: nothing to do; past the end: cannot grow
    assert ops.fallocate("/disk", 0, 0, SIZE, f) == 0
    assert ops.read("/disk", len(data), 0, f) == bytes(expect)
    assert errno_of(ops.fallocate, "/disk", 0, SIZE - 4096, 8192, f) == errno.ENOSPC
    assert ops.fallocate("/disk", FALLOC_FL_KEEP_SIZE, SIZE - 4096, 8192, f) == 0
    # punch past the end is clipped
    ops.fallocate("/disk", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, SIZE - 4096, 1 << 20, f)


def test_fallocate_never_enosys(ops):
    f = opened(ops, "/disk")
    supported = {0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE}
    for mode in range(0x80):
        if mode in supported:
            ops.fallocate("/disk", mode, 0, 4096, f)
        else:
            assert errno_of(ops.fallocate, "/disk", mode, 0, 4096, f) == errno.EOPNOTSUPP, hex(mode)
    s = opened(ops, "/stats", os.O_RDONLY)
    assert errno_of(ops.fallocate, "/stats", 0, 0, 4096, s) == errno.EOPNOTSUPP


def test_fsync_reaches_store(ops, store):
    f = opened(ops, "/disk")
    ops.write("/disk", os.urandom(8192), 0, f)
    assert ops.fsync("/disk", 0, f) == 0
    if "dirty_pages" in store.stats():
        assert store.stats()["dirty_pages"] == 0


def test_request_sizes_counted(ops):
    f = opened(ops, "/disk")
    ops.write("/disk", bytes(1 << 20), 0, f)
    ops.read("/disk", 1 << 20, 0, f)
    for _ in range(3):
        ops.read("/disk", 4096, 8192, f)
    ops.read("/disk", 3000, 0, f)           # bucketed to the next power of two
    s = opened(ops, "/stats", os.O_RDONLY)
    hist = json.loads(ops.read("/stats", 1 << 20, 0, s))["request_sizes"]
    assert hist == {"write": {str(1 << 20): 1}, "read": {str(1 << 20): 1, "4096": 4}}


# ---------------------------------------------------------------------------------------------
# stats and params


def test_stats_snapshot_at_open(ops):
    d = opened(ops, "/disk")
    s = opened(ops, "/stats", os.O_RDONLY)
    first = ops.read("/stats", 1 << 20, 0, s)
    snap = json.loads(first)
    assert snap["schema"] == 1
    ops.write("/disk", os.urandom(64 * 1024), 0, d)
    # same handle: same snapshot, in pieces too
    assert ops.read("/stats", 1 << 20, 0, s) == first
    assert ops.read("/stats", 10, 5, s) == first[5:15]
    ops.release("/stats", s)
    s2 = opened(ops, "/stats", os.O_RDONLY)
    assert json.loads(ops.read("/stats", 1 << 20, 0, s2))["zswpout"] > snap["zswpout"]
    assert errno_of(ops.open, "/stats", fi(os.O_WRONLY)) == errno.EACCES


def test_params_read_write(ops, store):
    r = opened(ops, "/params/compressor", os.O_RDONLY)
    assert ops.read("/params/compressor", 4096, 0, r) == b"lz4\n"
    w = opened(ops, "/params/compressor", os.O_WRONLY | os.O_TRUNC)
    assert ops.truncate("/params/compressor", 0) == 0
    assert ops.write("/params/compressor", b"zstd\n", 0, w) == 5
    assert store.get_param("compressor") == "zstd"
    # an invalid value: EINVAL, unchanged
    w = opened(ops, "/params/compressor", os.O_WRONLY)
    assert errno_of(ops.write, "/params/compressor", b"brotli\n", 0, w) == errno.EINVAL
    assert store.get_param("compressor") == "zstd"
    w = opened(ops, "/params/zstd_level", os.O_WRONLY)
    assert errno_of(ops.write, "/params/zstd_level", b"\xff\xfe", 0, w) == errno.EINVAL
    # a value written in two pieces
    w = opened(ops, "/params/zstd_level", os.O_WRONLY)
    ops.write("/params/zstd_level", b"1", 0, w)
    ops.write("/params/zstd_level", b"2\n", 1, w)
    assert store.get_param("zstd_level") == "12"
    # read snapshot at open
    assert ops.read("/params/compressor", 4096, 0, r) == b"lz4\n"
    assert errno_of(ops.open, "/params/nope", fi()) == errno.ENOENT
    assert errno_of(ops.create, "/params/new", 0o644, fi()) == errno.EACCES
    # fixed at mount: readable, never writable
    r = opened(ops, "/params/swap", os.O_RDONLY)
    assert ops.read("/params/swap", 4096, 0, r) == b"N\n"
    assert errno_of(ops.open, "/params/swap", fi(os.O_WRONLY)) == errno.EACCES
    assert errno_of(ops.open, "/params/far", fi(os.O_RDWR)) == errno.EACCES


# ---------------------------------------------------------------------------------------------
# errors at the edge


class Failing:
    """A store whose read raises what the test says (a fake at the adapter tier)."""

    size = SIZE

    def __init__(self, exc):
        self.exc = exc

    def read(self, offset, length):
        raise self.exc

    write = discard = read

    def fsync(self):
        raise self.exc


@pytest.mark.parametrize("exc,err", [(DataError("bad checksum"), errno.EIO),
                                     (__import__("zblock.errors").errors.DiskError("disk full", errno.ENOSPC), errno.ENOSPC),
                                     (RuntimeError("bug"), errno.EIO),
                                     (OSError(errno.EROFS, "ro"), errno.EROFS)])
def test_errors_become_errnos(exc, err):
    ops = ZblockOps(Failing(exc))
    f = opened(ops, "/disk")
    assert errno_of(ops.read, "/disk", 4096, 0, f) == err
    assert errno_of(ops.write, "/disk", b"x", 0, f) == err
    assert errno_of(ops.fsync, "/disk", 0, f) == err
    assert errno_of(ops.fallocate, "/disk", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096, f) == err
