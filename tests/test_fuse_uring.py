"""FUSE over io_uring (`--fuse-uring`, zblock.fuse.uring) on real mounts: requests really go
through the per-CPU rings, the data is right under parallel writers, and a mount refuses or
falls back as the admin's kernel setting says. The mount tests of tests/test_mount.py and the
swap hog of tests/test_swap.py run on this front end too ("native-uring")."""

from __future__ import annotations

import os
import subprocess

import pytest

import faultserver
import mountutil
from conftest import require
from mountutil import Mount

pytestmark = pytest.mark.mount


def _possible_cpus() -> int:
    from zblock.fuse import uring
    return uring.queue_count()


def _fio(cwd: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """fio in `cwd` (where a verify run leaves its state files)."""
    require(subprocess.run(["which", "fio"], capture_output=True).returncode == 0, "no fio")
    return subprocess.run(["fio", "--output-format=terse", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_requests_go_through_one_ring_a_cpu_and_verify():
    """fio with crc32c verify, four writers in parallel over disjoint regions, then the reads:
    every request after the rings are up is served from them (the counter moves by at least
    the number of fio's requests), and the bytes verify."""
    with Mount(size="64M", fuse="native-uring", pool_limit="8M") as m:
        fuse = m.stats()["fuse"]
        assert fuse["uring"] == {"queues": _possible_cpus(), "depth": 2}, fuse
        before = fuse["uring_requests"]
        res = _fio(m.workdir, "--name=v", f"--filename={m.disk}", "--rw=randwrite", "--bs=4k",
                   "--direct=1", "--ioengine=psync", "--numjobs=4", "--size=16M",
                   "--offset_increment=16M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1")
        assert res.returncode == 0, res.stderr[-2000:]
        # terse v3: field 5 is the error count of the job group
        errors = [line.split(";")[4] for line in res.stdout.splitlines() if ";" in line]
        assert errors and all(e == "0" for e in errors), res.stdout
        served = m.stats()["fuse"]["uring_requests"] - before
        # 4 jobs x 16 MiB written and read back in 4 KiB requests
        assert served >= 2 * 4 * (16 << 20) // 4096, served


def test_two_writers_sharing_pages_through_the_rings():
    """Parallel direct writes arrive on both CPUs' rings at once: 2 KiB stripes from two
    writers share every page; the result is each writer's stripes, nothing lost."""
    with Mount(size="16M", fuse="native-uring") as m:
        stripe, n = 2048, 2048
        want = bytearray(n * stripe)
        pids = []
        for w in range(2):
            pid = os.fork()
            if pid == 0:                            # pragma: no cover - the child
                code = 0
                try:
                    fd = os.open(m.disk, os.O_WRONLY)
                    for i in range(w, n, 2):
                        os.pwrite(fd, bytes([1 + w]) * stripe, i * stripe)
                    os.close(fd)
                except BaseException:
                    code = 1
                os._exit(code)
            pids.append(pid)
        for i in range(n):
            want[i * stripe:(i + 1) * stripe] = bytes([1 + i % 2]) * stripe
        for pid in pids:
            assert os.waitpid(pid, 0)[1] == 0
        with open(m.disk, "rb") as f:
            assert f.read(len(want)) == bytes(want)
        assert m.stats()["fuse"]["uring_requests"] >= n, "the writes did not go through the rings"


def test_fuse_uring_on_is_refused_where_the_kernel_does_not_offer_it():
    mountutil.require_mounts()
    mountutil.set_fuse_uring("N")
    try:
        with pytest.raises(AssertionError, match="FUSE over io_uring: not enabled in this kernel"):
            Mount(size="16M", fuse="native", fuse_uring="on").start()
    finally:
        mountutil.set_fuse_uring("Y")
    with pytest.raises(AssertionError, match="needs the native front end"):
        Mount(size="16M", fuse="fuse3", fuse_uring="on").start()


@pytest.mark.parametrize("option,param,rings", [("auto", "Y", True), ("auto", "N", False),
                                                 (None, "Y", False)])
def test_auto_follows_the_admins_setting_and_the_default_is_off(option, param, rings):
    """--fuse-uring auto: the rings where the admin has enabled them, else /dev/fuse with the
    usual workers. Without the option (off) /dev/fuse serves even where the kernel offers them."""
    mountutil.require_mounts()
    mountutil.set_fuse_uring(param)
    try:
        extra = {"fuse_uring": option} if option else {}
        with Mount(size="16M", fuse="native", **extra) as m:
            with open(m.disk, "r+b") as f:
                f.write(b"x" * 4096)
            fuse = m.stats()["fuse"]
            if rings:
                assert fuse["uring"] and fuse["uring_requests"] > 0, fuse
            else:
                assert fuse["uring"] is False and fuse["uring_requests"] == 0, fuse
                assert fuse["workers"] == 2, fuse
    finally:
        mountutil.set_fuse_uring("Y")


def test_a_queue_the_kernel_refuses_leaves_every_request_to_dev_fuse(monkeypatch):
    """The last queue's registration is refused (a payload buffer too small): the queues set up
    before it are taken down, /dev/fuse serves everything with the usual workers, the log says
    why, and the data is right."""
    monkeypatch.setenv(faultserver.ENV_RING_FAULT, f"register:{_possible_cpus() - 1}")
    with Mount(size="16M", fuse="native-uring", faults=True) as m:
        data = os.urandom(1 << 20)
        with open(m.disk, "r+b", buffering=0) as f:
            f.write(data)
        with open(m.disk, "rb") as f:
            assert f.read(len(data)) == data
        fuse = m.stats()["fuse"]
        assert fuse["uring"] is False and fuse["workers"] == 2, fuse
        assert fuse["uring_requests"] == 0, fuse
        from zblock import runtime
        with open(runtime.log_file(m.mountpoint)) as f:
            assert "could not be set up" in f.read()


@pytest.mark.timeout(180)
def test_a_ring_that_dies_while_serving_ends_the_connection_instead_of_hanging(monkeypatch):
    """Queue 0's thread fails after 200 requests. The kernel would keep sending CPU 0's requests
    to it, unanswered: the server ends the connection instead. A writer on CPU 0 gets an error,
    the server exits, the mount goes; nothing is left blocked."""
    monkeypatch.setenv(faultserver.ENV_RING_FAULT, "serve:0:200")
    with Mount(size="16M", fuse="native-uring", faults=True) as m:
        pid = m.pid
        writer = subprocess.Popen(
            ["taskset", "-c", "0", "dd", "if=/dev/zero", f"of={m.disk}", "bs=4k", "count=4000",
             "oflag=direct", "conv=notrunc"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        try:
            _, err = writer.communicate(timeout=60)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait(10)
        assert writer.returncode != 0, "the writer finished through a dead ring"
        assert mountutil.wait_pid(pid, 60), "the server did not exit"
        mountutil.wait_for(lambda: not mountutil.is_mounted(m.mountpoint, None), 30,
                           "the mount to go")
        from zblock import runtime
        with open(runtime.log_file(m.mountpoint)) as f:
            assert "failed, ending the connection" in f.read()
