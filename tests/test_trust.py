"""Acknowledged data is never lost: the backing space is reserved up front, and a write-back
that fails anyway leaves pages that read EIO after the next mount, never zeros or old bytes.

Real mounts over a small tmpfs as the backing filesystem (so it really fills up), unmounted in
each way a user or a system does it: `zblock umount`, plain `umount`, `umount -c` through the
installed helper, SIGTERM to the server. Then a disk that starts returning EIO halfway.
"""

import errno
import json
import os
import signal
import subprocess

import pytest

import mountutil
from conftest import require
from mountutil import Mount, zblock

PAGE = 4096
pytestmark = [pytest.mark.mount]


@pytest.fixture
def small_fs():
    """A 64 MiB tmpfs (the backing filesystem) in a fresh work directory; removed on every path."""
    mountutil.require_mounts()
    workdir = mountutil.new_workdir("trust")
    fs = os.path.join(workdir, "fs")
    os.makedirs(fs)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", fs], check=True,
                       timeout=30)
        yield workdir, fs
    finally:
        mountutil.cleanup_dir(workdir)


@pytest.fixture
def workdir():
    """A work directory that outlives a mount (remount tests); removed on every path."""
    path = mountutil.new_workdir("trust")
    try:
        yield path
    finally:
        mountutil.cleanup_dir(path)


def grow(fs: str) -> None:
    subprocess.run(["mount", "-o", "remount,size=512M", fs], check=True, timeout=30)


def pages_of(n: int, seed: int = 1) -> bytes:
    """Incompressible pages, each distinct (stored raw: the pool overflows at once)."""
    import random
    return random.Random(seed).randbytes(n * PAGE)


def write_all(path: str, data: bytes, at: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(0, len(data), 1 << 20):
            os.pwrite(fd, data[off:off + (1 << 20)], at + off)
    finally:
        os.close(fd)


def read_pages(path: str, npages: int) -> list[bytes | None]:
    """Every page, one read each: its bytes, or None where the read failed with EIO."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for p in range(npages):
            try:
                out.append(os.pread(fd, PAGE, p * PAGE))
            except OSError as e:
                assert e.errno == errno.EIO, e
                out.append(None)
    finally:
        os.close(fd)
    return out


def fsck(backing: str) -> tuple[int, dict]:
    res = zblock("fsck", "--json", backing, timeout=120)
    return res.returncode, json.loads(res.stdout)


# ---------------------------------------------------------------------------------------------
# reserved up front


@pytest.mark.timeout(120)
def test_mount_refuses_a_size_the_filesystem_cannot_hold(small_fs):
    workdir, fs = small_fs
    backing = os.path.join(fs, "full.img")
    mp = os.path.join(workdir, "mnt")
    os.makedirs(mp)
    res = zblock("mount", mp, "--backing", backing, "--size", "256M", timeout=60)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "cannot reserve 256.0 MiB" in lines[0] and "free" in lines[0], lines[0]
    assert not mountutil.is_mounted(mp, None)
    assert os.listdir(fs) == [], "a refused new backing file must not be left behind"

    # An existing sparse file is reserved at mount the same way, and kept as it is.
    with open(backing, "wb") as f:
        f.truncate(256 << 20)
    res = zblock("mount", mp, "--backing", backing, timeout=60)
    assert res.returncode != 0 and "cannot reserve" in res.stderr, res.stderr
    assert os.path.getsize(backing) == 256 << 20
    # what the failed reservation allocated is given back: the file is as sparse as it was
    assert os.stat(backing).st_blocks == 0 and os.listdir(fs) == ["full.img"], os.listdir(fs)


@pytest.mark.timeout(120)
def test_reserved_space_survives_discard(small_fs):
    """A discard zeroes pages but keeps their blocks: space given back could be taken by others
    and the next write-back would meet ENOSPC."""
    workdir, fs = small_fs
    backing = os.path.join(fs, "disk.img")
    with Mount(size="32M", backing=backing, workdir=workdir, pool_limit="1M") as m:
        used = os.statvfs(fs)
        before = used.f_blocks - used.f_bfree
        write_all(m.disk, pages_of(2048))
        fd = os.open(m.disk, os.O_RDWR)
        try:
            os.fsync(fd)
            subprocess.run(["fallocate", "--punch-hole", "-o", "0", "-l", str(8 << 20), m.disk],
                           check=True, timeout=30)
            assert os.pread(fd, PAGE, 0) == bytes(PAGE)
        finally:
            os.close(fd)
        after = os.statvfs(fs)
        assert after.f_blocks - after.f_bfree >= before, "discard gave reserved space back"
        assert m.stats()["sparse"] is False


# ---------------------------------------------------------------------------------------------
# --sparse on a filesystem that fills up: each way of unmounting


def fill_sparse_mount(workdir: str, fs: str) -> tuple[Mount, bytes]:
    """A --sparse 256 MiB disk on the 64 MiB tmpfs, 96 MiB of distinct incompressible pages
    written through a 16 MiB pool: writeback fills the tmpfs, the rest stays cached."""
    m = Mount(size="256M", backing=os.path.join(fs, "full.img"), workdir=workdir,
              pool_limit="16M", sparse=True)
    m.start()
    data = pages_of(96 * 256)
    write_all(m.disk, data)       # acknowledged: dd would say rc=0
    st = m.stats()
    assert st["sparse"] is True
    return m, data


def check_after_failed_close(m: Mount, fs: str, data: bytes) -> None:
    """After an unmount whose write-back failed: fsck lists lost pages (exit 4), and the next
    mount reads every page back exactly or as EIO, never zeros or other bytes."""
    grow(fs)
    rc, rep = fsck(m.backing)
    assert rc == 4 and rep["lost_pages"], rep
    npages = len(data) // PAGE
    m2 = Mount(size=None, backing=m.backing, workdir=m.workdir)
    with m2:
        got = read_pages(m2.disk, npages)
    eio = [p for p, g in enumerate(got) if g is None]
    wrong = [p for p, g in enumerate(got) if g is not None and g != data[p * PAGE:(p + 1) * PAGE]]
    assert not wrong, f"{len(wrong)} pages read back wrong (first {wrong[0]})"
    assert eio and set(eio) <= set(rep["lost_pages"]), (len(eio), len(rep["lost_pages"]))


def check_kept_then_clean(m: Mount, fs: str, data: bytes, unmount) -> None:
    """The mount stayed up with every page readable; after making room it unmounts cleanly
    and every page reads back from the backing file."""
    assert mountutil.is_mounted(m.mountpoint)
    st = m.stats()
    assert st["pool_over_limit"] > 0 and st["io_errors"] > 0, st
    got = read_pages(m.disk, len(data) // PAGE)
    assert all(g is not None for g in got) and b"".join(got) == data
    grow(fs)
    unmount()
    assert not mountutil.is_mounted(m.mountpoint, None)
    assert mountutil.wait_pid(m.pid, 60)
    rc, rep = fsck(m.backing)
    assert rc == 0, rep
    with open(m.backing, "rb") as f:
        assert f.read(len(data)) == data


@pytest.mark.timeout(300)
def test_zblock_umount_keeps_the_mount_when_writeback_fails(small_fs):
    workdir, fs = small_fs
    m, data = fill_sparse_mount(workdir, fs)
    res = zblock("umount", m.mountpoint, timeout=120)
    assert res.returncode == 3, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr and "stays up" in lines[0], res.stderr
    check_kept_then_clean(m, fs, data,
                          lambda: zblock("umount", m.mountpoint, timeout=120, check=True))


@pytest.mark.timeout(300)
def test_umount_c_through_the_helper_keeps_the_mount(small_fs):
    from test_integration import helpers_installed, make_wrapper
    require(os.path.exists("/usr/bin/umount") or os.path.exists("/bin/umount"), "no umount(8)")
    workdir, fs = small_fs
    zb = make_wrapper(workdir)
    with helpers_installed(zb):
        m, data = fill_sparse_mount(workdir, fs)
        res = subprocess.run(["umount", "-c", m.mountpoint], capture_output=True, text=True,
                             timeout=180)
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        assert "stays up" in res.stderr, res.stderr

        def umount_c():
            r = subprocess.run(["umount", "-c", m.mountpoint], capture_output=True, text=True,
                               timeout=180)
            assert r.returncode == 0, r.stderr
        check_kept_then_clean(m, fs, data, umount_c)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["umount", "sigterm"])
def test_unmount_without_waiting_marks_what_did_not_reach_the_file(small_fs, how):
    """Plain umount(2) and SIGTERM cannot keep the mount: the server's close fails, and the
    pages that did not reach the file read EIO afterwards."""
    workdir, fs = small_fs
    m, data = fill_sparse_mount(workdir, fs)
    if how == "umount":
        subprocess.run(["umount", m.mountpoint], check=True, timeout=120)
    else:
        os.kill(m.pid, signal.SIGTERM)
    assert mountutil.wait_pid(m.pid, 120), "the server did not exit"
    assert not mountutil.is_mounted(m.mountpoint, None)
    from zblock import runtime
    with open(runtime.log_file(m.mountpoint)) as f:
        log = f.read()
    assert "did not reach" in log and "CRITICAL" in log
    check_after_failed_close(m, fs, data)


# ---------------------------------------------------------------------------------------------
# a disk that starts returning EIO halfway


@pytest.mark.timeout(300)
def test_disk_failing_halfway_never_reads_zeros(fault_rules):
    import faultserver
    rules = fault_rules
    workdir = mountutil.new_workdir("eio")
    try:
        m = Mount(size="64M", workdir=workdir, pool_limit="2M", shrinker="N", faults=True)
        with m:
            first = pages_of(4096, seed=2)
            write_all(m.disk, first[:8 << 20])
            written_back = m.stats()["written_back_pages"]     # on disk before the fault
            faultserver.write_rules(rules, [{"op": "write", "err": "EIO", "times": None}])
            write_all(m.disk, first[8 << 20:], at=8 << 20)
            res = zblock("umount", m.mountpoint, timeout=120)
            assert res.returncode == 3, res
            os.kill(m.pid, signal.SIGTERM)         # the disk stays bad: the server must go
            assert mountutil.wait_pid(m.pid, 120)
        faultserver.write_rules(rules, [])
        rc, rep = fsck(m.backing)
        assert rc == 4 and rep["lost_pages"], rep
        m2 = Mount(size=None, backing=m.backing, workdir=workdir)
        with m2:
            got = read_pages(m2.disk, len(first) // PAGE)
        for p, g in enumerate(got):
            assert g is None or g == first[p * PAGE:(p + 1) * PAGE], f"page {p} read wrong"
        eio = [p for p, g in enumerate(got) if g is None]
        assert eio and set(eio) <= set(rep["lost_pages"]), (len(eio), len(rep["lost_pages"]))
        assert len(got) - len(eio) >= written_back, "pages written back before the fault were lost"
    finally:
        mountutil.cleanup_dir(workdir)


# ---------------------------------------------------------------------------------------------
# the server's start does not depend on the current directory


@pytest.mark.timeout(120)
def test_mount_from_a_directory_with_a_zblock_folder(tmp_path):
    """`python -m` searches the current directory first: a `zblock/` there (a checkout, or
    /var/lib/zblock) must not be imported by the server."""
    import sys
    mountutil.require_mounts()
    script = os.path.join(os.path.dirname(sys.executable), "zblock")
    require(os.path.exists(script), "zblock console script not installed in this venv")
    decoy = tmp_path / "zblock"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy package was imported')\n")
    (decoy / "__main__.py").write_text("raise SystemExit('the decoy package was run')\n")
    workdir = mountutil.new_workdir("cwd")
    mp = os.path.join(workdir, "mnt")
    os.makedirs(mp)
    try:
        res = subprocess.run([script, "mount", mp, "--backing", os.path.join(workdir, "b.img"),
                              "--size", "16M"], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path, env=mountutil.env())
        assert res.returncode == 0, res.stderr
        assert mountutil.is_mounted(mp)
        zblock("umount", mp, timeout=60, check=True)
    finally:
        mountutil.cleanup_dir(workdir)


# ---------------------------------------------------------------------------------------------
# dead mounts


@pytest.mark.timeout(120)
def test_dead_mount_is_named_and_cleared():
    m = Mount(size="16M", pool_limit="1M")
    with m:
        write_all(m.disk, pages_of(64))
        os.kill(m.pid, signal.SIGKILL)
        assert mountutil.wait_pid(m.pid, 30)
        res = zblock("mount", m.mountpoint, "--backing", m.backing, timeout=60)
        assert res.returncode != 0 and "Traceback" not in res.stderr
        assert "dead zblock mount" in res.stderr and "zblock umount --force" in res.stderr, res.stderr
        res = zblock("umount", m.mountpoint, timeout=60)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
        assert "dead mount" in res.stderr
        assert not mountutil.is_mounted(m.mountpoint, None)


def test_start_failure_reports_this_attempt_only(tmp_path):
    from zblock import daemon
    log = tmp_path / "server.log"
    log.write_text("2026-01-01 zblock.daemon CRITICAL an earlier attempt failed\n")
    start = log.stat().st_size
    with open(log, "a") as f:
        f.write("2026-01-01 zblock.daemon INFO starting\n")
    assert daemon._log_tail(str(log), start) == "2026-01-01 zblock.daemon INFO starting"
    assert "earlier" in daemon._log_tail(str(log))


# ---------------------------------------------------------------------------------------------
# fsck that can be trusted


@pytest.mark.timeout(180)
def test_never_written_page_changed_offline_reads_eio(workdir):
    m = Mount(size="16M", workdir=workdir)
    with m:
        write_all(m.disk, pages_of(1))
    with open(m.backing, "r+b") as f:       # as `dd conv=notrunc` into a never-written page
        f.seek(5 * PAGE)
        f.write(b"HELLO")
    rc, rep = fsck(m.backing)
    assert rc == 4 and rep["bad_pages"] == [5], rep
    res = zblock("fsck", m.backing)
    assert "page" in res.stdout and "5" in res.stdout and "FsckReport(" not in res.stdout
    m2 = Mount(size=None, backing=m.backing, workdir=m.workdir)
    with m2:
        got = read_pages(m2.disk, 8)
    assert got[0] == pages_of(1) and got[5] is None and got[6] == bytes(PAGE)


@pytest.mark.timeout(180)
def test_inflight_pages_settle_after_a_crash_and_a_clean_remount(workdir):
    m = Mount(size="16M", pool_limit="256K", shrinker="N", workdir=workdir)
    data = pages_of(1024, seed=3)
    with m:
        write_all(m.disk, data)
        mountutil.wait_for(lambda: m.stats()["written_back_pages"] > 0, 30, "writeback")
        os.kill(m.pid, signal.SIGKILL)
        assert mountutil.wait_pid(m.pid, 30)
        zblock("umount", m.mountpoint, timeout=60, check=True)     # clears the dead mount
    rc, rep = fsck(m.backing)
    assert rc in (1, 4) and not rep["closed_cleanly"] and rep["inflight_pages"] > 0, rep
    m2 = Mount(size=None, backing=m.backing, workdir=m.workdir)
    with m2:
        pass
    rc, rep = fsck(m.backing)
    assert rep["closed_cleanly"] and rep["inflight_pages"] == 0, rep
    assert rc == (4 if rep["bad_pages"] else 0), rep
