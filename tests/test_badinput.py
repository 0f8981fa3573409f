"""Bad input: hostile or odd requests, table-driven. Each gets a clear error (an errno for I/O, one
line and a non-zero exit for the CLI, never a traceback); the server stays up where it should;
nothing already written is lost (a reference pattern written first is checked after every case).

Tables:
  IO_CASES      requests on the mounted `disk` and the mount's other files
  PARAM_CASES   garbage written to params/ files: EINVAL, value unchanged
  CLI_CASES     `zblock mount` with bad sizes, a backing that is a directory, missing, resized,
                truncated, read-only, locked; bad mount points
plus two concurrent `zblock umount`s and a mount point unmounted behind the server's back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import threading

import psutil
import pytest

import mountutil
from zblock import PAGE_SIZE
from zblock.store import TABLE_BYTES_PER_PAGE

pytestmark = [pytest.mark.timeout(180), pytest.mark.mount]

SIZE = 32 << 20
REF = b"".join((f"reference page {i} ".encode() * 300)[:PAGE_SIZE] for i in range(64))
REF_OFF = 8 << 20


@pytest.fixture(scope="module")
def mnt():
    mountutil.require_mounts()
    m = mountutil.Mount(size=str(SIZE), pool_limit="1M")
    m.start()
    try:
        fd = os.open(m.disk, os.O_RDWR)
        try:
            os.pwrite(fd, REF, REF_OFF)
            os.fsync(fd)
        finally:
            os.close(fd)
        yield m
        if mountutil.is_mounted(m.mountpoint):
            m.umount()
    finally:
        m.cleanup()


def check_alive_and_intact(m) -> None:
    """The server answers and the reference pattern is intact."""
    assert m.stats()["schema"] == 1
    fd = os.open(m.disk, os.O_RDONLY)
    try:
        assert os.pread(fd, len(REF), REF_OFF) == REF, "bad input destroyed data written before it"
    finally:
        os.close(fd)
    assert os.path.getsize(m.disk) == SIZE


def errno_of(fn) -> int | None:
    try:
        fn()
    except OSError as e:
        return e.errno
    return None


# ---------------------------------------------------------------------------------------------
# I/O on the mount

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def fallocate(fd, mode, off, length) -> int:
    """0 or the errno."""
    return 0 if _libc.fallocate(fd, mode, off, length) == 0 else ctypes.get_errno()


def case_zero_write(m, fd):
    assert os.pwrite(fd, b"", 4096) == 0


def case_zero_read(m, fd):
    assert os.pread(fd, 0, 0) == b""


def case_huge_write_read(m, fd):
    data = os.urandom(1 << 20) * 8                       # 8 MiB in one call: the kernel splits it
    assert os.pwrite(fd, data, 16 << 20) == len(data)
    assert os.pread(fd, len(data), 16 << 20) == data


def case_read_whole_disk_at_once(m, fd):
    got = os.pread(fd, SIZE + (1 << 20), 0)
    assert len(got) == SIZE and got[REF_OFF:REF_OFF + len(REF)] == REF


def case_read_at_and_past_end(m, fd):
    assert os.pread(fd, 4096, SIZE) == b""
    assert os.pread(fd, 4096, SIZE + 12345) == b""
    assert os.pread(fd, 4096, 1 << 50) == b""
    assert len(os.pread(fd, 8192, SIZE - 4096)) == 4096


def case_write_at_end(m, fd):
    assert errno_of(lambda: os.pwrite(fd, b"x" * 4096, SIZE)) in (errno.ENOSPC, errno.EFBIG)


def case_write_straddling_end(m, fd):
    try:
        n = os.pwrite(fd, b"y" * 8192, SIZE - 4096)
        assert n <= 4096, "wrote past the end"
    except OSError as e:
        assert e.errno in (errno.ENOSPC, errno.EFBIG)


def case_write_far_past_end(m, fd):
    assert errno_of(lambda: os.pwrite(fd, b"z", 1 << 45)) in (errno.ENOSPC, errno.EFBIG, errno.EINVAL)


def case_odd_offsets(m, fd):
    for off, n in [(4095, 3), (1, 1), (SIZE - 1, 1), (12345, 70000)]:
        data = os.urandom(n)
        assert os.pwrite(fd, data, off) == n
        assert os.pread(fd, n, off) == data


def case_truncate_ignored(m, fd):
    os.truncate(m.disk, 0)
    os.ftruncate(fd, 4096)
    with open(m.disk, "r+b", buffering=0):              # O_TRUNC-free; then O_TRUNC below
        pass
    os.close(os.open(m.disk, os.O_WRONLY | os.O_TRUNC))
    assert os.path.getsize(m.disk) == SIZE


def case_fallocate_modes(m, fd):
    # punch-hole (with KEEP_SIZE) is a discard; modes zblock does not support answer
    # EOPNOTSUPP - never ENOSYS, which would make the kernel stop sending fallocate
    assert fallocate(fd, 0x01 | 0x02, 20 << 20, 1 << 20) == 0
    for mode in (0x08, 0x20, 0x40, 0x0):                 # collapse, insert, unshare, allocate
        e = fallocate(fd, mode, 0, 4096)
        assert e != errno.ENOSYS and e in (0, errno.EOPNOTSUPP, errno.EINVAL), (mode, e)
    assert fallocate(fd, 0x01 | 0x02, 20 << 20, 4096) == 0   # still sent after the refusals
    assert fallocate(fd, 0x01 | 0x02, SIZE, 4096) in (0, errno.ENOSPC, errno.EINVAL)


def case_files_refused(m, fd):
    root = m.mountpoint
    assert errno_of(lambda: open(os.path.join(root, "newfile"), "w")) is not None
    assert errno_of(lambda: os.mkdir(os.path.join(root, "d"))) is not None
    assert errno_of(lambda: os.unlink(m.disk)) is not None
    assert errno_of(lambda: os.rename(m.disk, m.disk + "2")) is not None
    assert errno_of(lambda: open(os.path.join(root, "nope"))) == errno.ENOENT
    assert errno_of(lambda: open(os.path.join(root, "params", "nope"), "w")) is not None
    assert errno_of(lambda: open(os.path.join(root, "stats"), "w").write("x")) is not None
    assert errno_of(lambda: os.listdir(m.disk)) == errno.ENOTDIR


def case_many_tiny_writes(m, fd):
    for i in range(300):                                 # one byte at a time across a page edge
        os.pwrite(fd, bytes([i % 256]), 24 << 20 | (4000 + i))
    assert os.pread(fd, 300, 24 << 20 | 4000) == bytes(i % 256 for i in range(300))


IO_CASES = [case_zero_write, case_zero_read, case_huge_write_read, case_read_whole_disk_at_once,
            case_read_at_and_past_end, case_write_at_end, case_write_straddling_end,
            case_write_far_past_end, case_odd_offsets, case_truncate_ignored,
            case_fallocate_modes, case_files_refused, case_many_tiny_writes]


@pytest.mark.parametrize("case", IO_CASES, ids=[c.__name__[5:] for c in IO_CASES])
def test_io_case(mnt, case):
    fd = os.open(mnt.disk, os.O_RDWR)
    try:
        case(mnt, fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    check_alive_and_intact(mnt)


# ---------------------------------------------------------------------------------------------
# params

PARAM_CASES = [
    ("compressor", "bogus"), ("compressor", ""), ("compressor", "lz4 zstd"), ("compressor", "LZ4x"),
    ("zstd_level", "0"), ("zstd_level", "20"), ("zstd_level", "abc"), ("zstd_level", "1.5"),
    ("pool_limit", "-5"), ("pool_limit", "abc"), ("pool_limit", "150%"), ("pool_limit", "5Q"),
    ("accept_threshold", "101"), ("accept_threshold", "-1"), ("accept_threshold", "x"),
    ("limit_policy", "lru"), ("incompressible_policy", "maybe"),
    ("same_filled_pages_enabled", "maybe"), ("shrinker_enabled", "2"),
    ("accelerator", "gpu"), ("hw_fault_rate", "2"), ("hw_fault_rate", "nan"),
    ("compressor", "\xff\x00garbage"), ("compressor", "z" * 70000),
]


@pytest.mark.parametrize("name,value", PARAM_CASES, ids=[f"{n}={v[:12]!r}" for n, v in PARAM_CASES])
def test_param_garbage(mnt, name, value):
    path = os.path.join(mnt.mountpoint, "params", name)
    if not os.path.exists(path):
        pytest.skip(f"no params/{name} on this mount")
    before = mnt.param(name)
    raw = value.encode("utf-8", "surrogateescape") + b"\n"

    def write():
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, raw)
        finally:
            os.close(fd)
    assert errno_of(write) == errno.EINVAL
    assert mnt.param(name) == before, "an invalid value changed the param"
    check_alive_and_intact(mnt)


def test_param_valid_with_newline_then_back(mnt):
    path = os.path.join(mnt.mountpoint, "params", "compressor")
    with open(path, "w") as f:
        f.write("zstd\n")
    assert mnt.param("compressor") == "zstd"
    with open(path, "w") as f:
        f.write("lz4")
    assert mnt.param("compressor") == "lz4"
    check_alive_and_intact(mnt)


# ---------------------------------------------------------------------------------------------
# the CLI


def one_line_error(res, code=None) -> str:
    assert res.returncode != 0, f"expected a failure: {res}"
    if code is not None:
        assert res.returncode == code, res
    assert "Traceback" not in res.stderr, res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, f"not one line: {res.stderr!r}"
    return lines[0]


@pytest.fixture
def workdir():
    mountutil.require_mounts()
    d = mountutil.new_workdir("bad")
    try:
        yield d
    finally:
        for name in os.listdir(d):
            p = os.path.join(d, name)
            subprocess.run(["chattr", "-i", p], capture_output=True)
        mountutil.cleanup_dir(d)


def _mk(workdir, name, size=None, content=None):
    p = os.path.join(workdir, name)
    if content is not None:
        with open(p, "wb") as f:
            f.write(content)
    elif size is not None:
        with open(p, "wb") as f:
            f.truncate(size)
    return p


def setup_directory(w):
    os.mkdir(os.path.join(w, "dir"))
    return ["--backing", os.path.join(w, "dir"), "--size", "1M"], "directory"


def setup_missing_no_size(w):
    return ["--backing", os.path.join(w, "nope.img")], "size"


def setup_bad_size(w):
    return ["--backing", os.path.join(w, "a.img"), "--size", "123"], "size"


def setup_size_garbage(w):
    return ["--backing", os.path.join(w, "a.img"), "--size", "lots"], "size"


def setup_size_zero(w):
    return ["--backing", os.path.join(w, "a.img"), "--size", "0"], "size"


def setup_resize(w):
    return ["--backing", _mk(w, "r.img", size=1 << 20), "--size", "2M"], "resize"


def setup_truncated_odd(w):
    return ["--backing", _mk(w, "t.img", content=b"x" * 5000)], "multiple"


def setup_no_backing(w):
    return [], "backing"


def setup_bad_option(w):
    return ["--backing", os.path.join(w, "a.img"), "--size", "1M", "--compressor", "nope"], "compressor"


def setup_mountpoint_missing(w):
    return ["--backing", os.path.join(w, "a.img"), "--size", "1M", "MNT=" + os.path.join(w, "gone")], ""


def setup_mountpoint_is_file(w):
    return ["--backing", os.path.join(w, "a.img"), "--size", "1M", "MNT=" + _mk(w, "f", size=0)], ""


def setup_readonly(w):
    p = _mk(w, "ro.img", size=1 << 20)
    if subprocess.run(["chattr", "+i", p], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here (root ignores file modes)")
    return ["--backing", p], ""


CLI_CASES = [setup_directory, setup_missing_no_size, setup_bad_size, setup_size_garbage,
             setup_size_zero, setup_resize, setup_truncated_odd, setup_no_backing,
             setup_bad_option, setup_mountpoint_missing, setup_mountpoint_is_file, setup_readonly]


@pytest.mark.parametrize("setup", CLI_CASES, ids=[c.__name__[6:] for c in CLI_CASES])
def test_mount_refused(workdir, setup):
    args, word = setup(workdir)
    mp = os.path.join(workdir, "mnt")
    os.makedirs(mp, exist_ok=True)
    for a in list(args):
        if a.startswith("MNT="):
            args.remove(a)
            mp = a[4:]
    res = mountutil.zblock("mount", mp, *args, timeout=60)
    line = one_line_error(res)
    assert word.lower() in line.lower(), line
    assert not mountutil.is_mounted(mp)


def test_disk_too_large_for_memory_refused_before_any_file(workdir):
    """16 TiB needs 212 GiB of page tables once every page is used: refused with one line naming
    the sizes (exit 2, a usage error), before the backing file or its sidecar exists."""
    need = (16 << 40) // 4096 * TABLE_BYTES_PER_PAGE
    if psutil.virtual_memory().total >= need:
        pytest.skip("this machine has the memory for a 16 TiB disk's tables")
    mp = os.path.join(workdir, "mnt")
    os.makedirs(mp, exist_ok=True)
    img = os.path.join(workdir, "huge.img")
    res = mountutil.zblock("mount", mp, "--backing", img, "--size", "16T", "--sparse", timeout=60)
    line = one_line_error(res, code=2)
    assert f"16.0 TiB needs up to {need / (1 << 30):.1f} GiB" in line, line
    assert f"{TABLE_BYTES_PER_PAGE} bytes a page" in line, line
    assert not os.path.exists(img) and not os.path.exists(img + ".zbmeta")
    assert not mountutil.is_mounted(mp)


def test_backing_truncated_after_unmount(workdir):
    """The backing shrunk behind zblock's back (page-aligned): refused or served sanely."""
    m = mountutil.Mount(size="4M", workdir=workdir)
    with m:
        with open(m.disk, "r+b", buffering=0) as f:
            f.write(REF)
    os.truncate(m.backing, 2 << 20)
    m2 = mountutil.Mount(size=None, backing=m.backing, workdir=workdir)
    res = mountutil.zblock(*m2.args(), timeout=60)
    try:
        if res.returncode != 0:
            one_line_error(res)
            return
        assert os.path.getsize(m2.disk) == 2 << 20
        with open(m2.disk, "rb") as f:
            got = f.read(len(REF))
        assert got == REF
    finally:
        m2.cleanup(remove=False)


def test_locked_backing_second_mount(workdir):
    m = mountutil.Mount(size="4M", workdir=workdir)
    with m:
        with open(m.disk, "r+b", buffering=0) as f:
            f.write(REF)
        mp2 = os.path.join(workdir, "mnt2")
        os.mkdir(mp2)
        res = mountutil.zblock("mount", mp2, "--backing", m.backing, timeout=60)
        line = one_line_error(res)
        assert "in use" in line or "lock" in line, line
        assert not mountutil.is_mounted(mp2)
        res = mountutil.zblock("mount", m.mountpoint, "--backing", os.path.join(workdir, "x.img"),
                               "--size", "1M", timeout=60)
        one_line_error(res)                                # already a mount point
        with open(m.disk, "rb") as f:
            assert f.read(len(REF)) == REF                 # the first mount still serves


def test_umount_not_a_mount(workdir):
    one_line_error(mountutil.zblock("umount", workdir, timeout=30))
    one_line_error(mountutil.zblock("umount", os.path.join(workdir, "nope"), timeout=30))
    one_line_error(mountutil.zblock("stats", workdir, timeout=30))


def test_two_umounts_at_once(workdir):
    m = mountutil.Mount(size="16M", workdir=workdir, pool_limit="8M")
    m.start()
    try:
        data = os.urandom(1 << 20) * 12
        with open(m.disk, "r+b", buffering=0) as f:
            f.write(data)                                  # dirty, not fsynced: umount writes back
        results = [None, None]

        def run(i):
            results[i] = mountutil.zblock("umount", m.mountpoint, timeout=120)
        ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(150)
        assert all(r is not None for r in results)
        assert any(r.returncode == 0 for r in results), results
        for r in results:
            assert "Traceback" not in r.stderr, r.stderr
            if r.returncode != 0:
                one_line_error(r)
        mountutil.wait_for(lambda: not mountutil.is_mounted(m.mountpoint), 30, "the unmount")
        if m.pid:
            assert mountutil.wait_pid(m.pid, 60), "server still running"
    finally:
        m.cleanup(remove=False)
    with mountutil.Mount(size=None, backing=m.backing, workdir=workdir) as m2:
        with open(m2.disk, "rb") as f:
            assert f.read(len(data)) == data


def test_mountpoint_unmounted_behind_the_server(workdir):
    """Someone runs `umount -l` on the mount point: the server writes back and exits; the
    data is in the backing file."""
    m = mountutil.Mount(size="16M", workdir=workdir, pool_limit="4M")
    m.start()
    try:
        data = os.urandom(1 << 20) * 10
        with open(m.disk, "r+b", buffering=0) as f:
            f.write(data)
        subprocess.run(["umount", "-l", m.mountpoint], check=True, timeout=30)
        if m.pid:
            assert mountutil.wait_pid(m.pid, 60), "the server did not exit after losing its mount"
    finally:
        m.cleanup(remove=False)
    with mountutil.Mount(size=None, backing=m.backing, workdir=workdir) as m2:
        with open(m2.disk, "rb") as f:
            assert f.read(len(data)) == data
