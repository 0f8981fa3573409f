"""Swap mode: hardening, memory release, sd_notify and swap control without a mount, then real swap through `zblock swapon` under a memory hog.

Tiers:
  - pure functions (no root): /proc parsing, sd_notify datagrams, CLI refusals without a mount;
  - real mounts: swapon/swapoff refusals, the hardening visible in /proc/PID, server memory;
  - real swapping: a hog in a child memory cgroup (limit 96 MiB, working set 320 MiB, checksummed
    pages) swapping through loop -> FUSE -> zblock, every page verified at the end.

Every test leaves no swap, loop device, mount, cgroup or process behind (finally blocks), and the
swap tests fail, not skip, when kernel zswap is enabled: it would take the pages before zblock.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time

import pytest

import cgroups
import mountutil
from conftest import require
from mountutil import Mount, wait_for, zblock

from zblock import hardening, runtime, sdnotify, swapctl

HOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hog.py")
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# helpers: kernel state

PF_MEMALLOC_NOIO = 0x00080000   # include/linux/sched.h; what ublksrv tests/generic/008 checks
PF_LOCAL_THROTTLE = 0x00100000
PF_IO_FLUSHER = PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE


def task_flags(pid: int | str = "self") -> dict[int, int]:
    """Per thread of a process: the `flags` field of /proc/PID/task/TID/stat (PF_* bits)."""
    flags = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue            # the thread exited meanwhile
        # comm may contain spaces and parentheses: fields start after the last ')'
        rest = stat[stat.rindex(")") + 2:].split()
        flags[int(tid)] = int(rest[6])      # field 9: state ppid pgrp session tty tpgid FLAGS
    return flags


def status_kib(field_name: str, pid: int | str = "self") -> int:
    """A `kB` line of /proc/PID/status (VmLck, VmRSS, ...), in KiB; 0 if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0



def zswap_must_be_off() -> None:
    if os.path.exists(runtime.ZSWAP_ENABLED):
        with open(runtime.ZSWAP_ENABLED) as f:
            value = f.read().strip()
        assert value == "N", f"kernel zswap is enabled ({runtime.ZSWAP_ENABLED} = {value}): it would take " \
                             "the pages before zblock; this test refuses to run (echo N > it)"


def vmstat(key: str) -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k == key:
                return int(v)
    return 0


def require_swap_tools() -> None:
    mountutil.require_mounts()
    for tool in ("losetup", "mkswap", "swapon", "swapoff", "blkdiscard"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")
    require(os.path.exists("/dev/loop-control"), "no loop devices (/dev/loop-control)")


def teardown_swap(m: Mount, *known: str | None) -> None:
    """Whatever state the test left: swapoff + detach every loop over the mount's disk.

    `known` are loop devices this test attached: they are torn down even when their backing path
    now reads "/disk" (the mount was lazily unmounted under them, e.g. by another run's sweep).
    """
    disk = os.path.join(os.path.realpath(m.mountpoint), "disk")
    loops = set(swapctl.loops_over(disk))
    loops.update(d for d in known if d and swapctl.loop_backing_file(d) in (disk, "/disk"))
    for loop in sorted(loops):
        if swapctl.swap_entry(loop):
            subprocess.run(["swapoff", loop], capture_output=True, timeout=600)
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60)


def MemCgroup(limit: int) -> cgroups.MemCgroup:
    return cgroups.MemCgroup(limit, prefix="zblock-test-", unavailable=lambda msg: require(False, msg))


# ---------------------------------------------------------------------------------------------
# no mount needed


def test_task_flags_and_status_parse_own_process():
    flags = task_flags()
    assert os.getpid() in flags                       # the main thread's tid is the pid
    assert all(isinstance(v, int) for v in flags.values())
    assert status_kib("VmRSS") > 0
    assert isinstance(hardening.capabilities(), int)


def test_swaps_parses_proc_swaps():
    for s in swapctl.swaps():
        assert s["name"] and s["size_kib"] >= s["used_kib"] >= 0


def test_notify_sends_datagram_to_notify_socket(monkeypatch, tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sdnotify.notify("STATUS=hello")
        assert s.recv(4096) == b"STATUS=hello"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.notify_ready("/nonexistent") is None


def test_notify_abstract_socket(monkeypatch):
    name = f"zblock-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STOPPING=1")
        assert s.recv(4096) == b"STOPPING=1"


def test_notify_ready_waits_for_the_path(monkeypatch, tmp_path):
    """READY=1 goes out only once MOUNTPOINT/stats can be stat'ed (here: created later)."""
    sock = str(tmp_path / "n.sock")
    mp = tmp_path / "mp"
    mp.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(sock)
        s.settimeout(0.5)
        monkeypatch.setenv("NOTIFY_SOCKET", sock)
        t = sdnotify.notify_ready(str(mp), timeout=20)
        with pytest.raises(socket.timeout):
            s.recv(4096)
        (mp / "stats").write_text("{}")
        s.settimeout(10)
        msg = s.recv(4096).decode()
        t.join(10)
    assert msg.startswith("READY=1\n") and f"MAINPID={os.getpid()}" in msg


def test_zswap_and_capability_warnings(monkeypatch, tmp_path):
    """The warnings read the real sysfs file; a stand-in file shows both states without ever
    touching the kernel's setting."""
    fake = tmp_path / "enabled"
    monkeypatch.setattr(runtime, "ZSWAP_ENABLED", str(fake))
    fake.write_text("N\n")
    assert not runtime.kernel_zswap_enabled()
    assert not any("zswap" in w for w in hardening.preflight_warnings())
    fake.write_text("Y\n")
    assert runtime.kernel_zswap_enabled()
    assert any("kernel zswap is enabled" in w for w in hardening.preflight_warnings())
    caps = hardening.preflight_warnings()
    assert hardening.has_capability(hardening.CAP_SYS_RESOURCE) or any("CAP_SYS_RESOURCE" in w for w in caps)


def test_swap_refuses_kernel_cache(tmp_path):
    res = zblock("mount", str(tmp_path), "--backing", str(tmp_path / "b.img"), "--size", "16M",
                 "--swap", "--kernel-cache")
    assert res.returncode == 2 and "kernel-cache" in res.stderr and "Traceback" not in res.stderr, res


RELEASE_CHILD = r"""
import json, os, sys, threading
from zblock import hardening, memory
def status_kib(name):
    with open("/proc/self/status") as f:
        return next((int(ln.split()[1]) for ln in f if ln.startswith(name + ":")), 0)
before_hardening = memory.release_free_memory(None, min_available=0.0)   # not hardened: no-op
h = hardening.harden_for_swap()
objs = []
def work(n):       # libfuse's workers allocate like this: in threads (one arena: tune_malloc)
    objs.extend(os.urandom(1000 + (i * 7919) % 3000) for i in range(n))
# one worker thread (~370 MiB of 1-4 KiB objects): with two and an arena per CPU, the 10% kept
# below interleaved across both arenas by scheduling and pinned a varying share (once 155 MiB
# released of ~330)
ts = [threading.Thread(target=work, args=(150000,))]
[t.start() for t in ts]
[t.join() for t in ts]
del objs[:int(len(objs) * 0.9)]      # the pool shrinks; what is left pins nothing much
rss_held = status_kib("VmRSS")
released = memory.release_free_memory(h, min_available=0.0)
print(json.dumps({"mlocked": h.mlocked, "before_hardening": before_hardening, "held": rss_held,
                  "released": released, "after": status_kib("VmRSS"),
                  "vmlck": status_kib("VmLck"), "still_locked": h.mlocked}))
"""


def test_release_free_memory_returns_locked_heap():
    """Under mlockall freed heap stays resident until release_free_memory (in a child: mlockall
    is process-wide)."""
    res = subprocess.run([sys.executable, "-c", RELEASE_CHILD], capture_output=True, text=True,
                         timeout=60, env=mountutil.env())
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    require(r["mlocked"], "mlockall refused here")
    assert r["before_hardening"] == 0
    assert r["held"] > 250 * 1024, r                 # the freed objects stayed resident
    assert r["released"] > 200 * MIB, r
    assert r["still_locked"] and r["vmlck"] > 0, r


def test_cli_swapon_swapoff_refuse_a_non_mount(tmp_path):
    for cmd in ("swapon", "swapoff"):
        res = zblock(cmd, str(tmp_path))
        assert res.returncode == 1, res
        assert "not a zblock mount" in res.stderr and "Traceback" not in res.stderr
    res = zblock("swapon", str(tmp_path), "--priority", "40000")
    assert res.returncode == 2 and "out of range" in res.stderr
    res = zblock("swapon", str(tmp_path), "--priority", "x")
    assert res.returncode == 2 and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------
# real mounts


@pytest.mark.mount
def test_swapon_refuses_a_mount_not_in_swap_mode():
    require_swap_tools()
    with Mount(size="64M") as m:
        try:
            for cmd in ("swapon", "swapoff"):
                res = zblock(cmd, m.mountpoint)
                assert res.returncode == 1, res
                assert "swap mode" in res.stderr, res.stderr
            assert swapctl.loops_over(os.path.join(os.path.realpath(m.mountpoint), "disk")) == []
        finally:
            teardown_swap(m)


@pytest.mark.mount
def test_swapon_swapoff_cycle_and_state_refusals():
    require_swap_tools()
    zswap_must_be_off()
    with Mount(size="64M", swap=True) as m:
        disk = os.path.join(os.path.realpath(m.mountpoint), "disk")
        loop = None
        try:
            res = zblock("swapoff", m.mountpoint)
            assert res.returncode == 1 and "swap is not on" in res.stderr, res
            res = zblock("swapon", m.mountpoint, "--priority", "7", timeout=120)
            assert res.returncode == 0, res.stderr
            loop = res.stdout.strip()
            assert loop.startswith("/dev/loop") and swapctl.loops_over(disk) == [loop]
            assert swapctl.loop_dio(loop), "loop device without direct I/O"
            entry = swapctl.swap_entry(loop)
            assert entry is not None and entry["priority"] == 7
            discarded0 = m.stats()["discarded_pages"]
            assert discarded0 > 0, "swapon --discard's initial discard did not reach zblock"
            res = zblock("swapon", m.mountpoint)
            assert res.returncode == 1 and "already on" in res.stderr, res
            res = zblock("swapoff", m.mountpoint, timeout=300)
            assert res.returncode == 0, res.stderr
            assert swapctl.swap_entry(loop) is None
            assert swapctl.loops_over(disk) == []
            assert m.stats()["discarded_pages"] > discarded0, "swapoff's blkdiscard did not reach zblock"
        finally:
            teardown_swap(m, loop)
        assert swapctl.loops_over(disk) == []


def _server_log(m: Mount) -> str:
    with open(runtime.log_file(os.path.realpath(m.mountpoint))) as f:
        return f.read()


@pytest.mark.mount
def test_hardening_is_visible_in_proc():
    """--swap: VmLck, IO_FLUSHER on every thread (or the warning), oom_score_adj, memory cost."""
    require_swap_tools()
    with Mount(size="256M", swap=True, pool_limit="64M") as hard, \
            Mount(size="256M", pool_limit="64M", write_through="N") as plain:   # swap has none
        assert hard.pid and plain.pid
        pid = hard.pid
        assert status_kib("VmLck", pid) > 0, "the --swap server has no locked memory (mlockall)"
        assert status_kib("VmLck", plain.pid) == 0
        log = _server_log(hard)
        if hardening.has_capability(hardening.CAP_SYS_RESOURCE, pid):
            flags = task_flags(pid)
            missing = [tid for tid, fl in flags.items() if fl & PF_IO_FLUSHER != PF_IO_FLUSHER]
            assert not missing, f"threads without PF_MEMALLOC_NOIO|PF_LOCAL_THROTTLE: {missing} of {flags}"
            with open(f"/proc/{pid}/oom_score_adj") as f:
                assert int(f.read()) == hardening.OOM_SCORE_ADJ_MIN
        else:
            assert "PR_SET_IO_FLUSHER refused" in log, log
            assert "oom_score_adj" in log, log
        # Same work on both (write 32 MiB, read it back): the locked server stays within a few MiB.
        data = os.urandom(MIB) * 16 + bytes(16 * MIB)
        for m in (hard, plain):
            with open(m.disk, "r+b") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                f.seek(0)
                assert f.read(len(data)) == data
        rss_hard = status_kib("VmRSS", hard.pid)
        rss_plain = status_kib("VmRSS", plain.pid)
        print(f"VmRSS --swap {rss_hard} KiB, without {rss_plain} KiB, VmLck {status_kib('VmLck', pid)} KiB")
        assert abs(rss_hard - rss_plain) < 8 * 1024, (rss_hard, rss_plain)


@pytest.mark.mount
@pytest.mark.timeout(120)
def test_swap_mode_gives_freed_memory_back_once_quiet():
    """--swap keeps its memory locked; after a burst is discarded the server gives it back once
    the cache has been quiet for a moment (Trimmer.quiet), not in the middle of the burst."""
    require_swap_tools()
    need = shutil.which("fallocate")
    require(need, "util-linux fallocate is missing")
    with Mount(size="256M", swap=True) as m:
        require(status_kib("VmLck", m.pid) > 0, "mlockall refused here")
        base = status_kib("VmRSS", m.pid)
        half_random = (os.urandom(MIB // 2) + bytes(MIB // 2)) * 4
        with open(m.disk, "r+b") as f:
            for off in range(0, 160 * MIB, len(half_random)):
                f.write(half_random)
            # pages stored after the burst sit above it in the heap: free() alone cannot give
            # the burst back by shrinking the heap's top, only the release (malloc_trim) can
            f.seek(200 * MIB)
            f.write(half_random * 4)
            f.flush()
            os.fsync(f.fileno())
        grown = status_kib("VmRSS", m.pid) - base
        assert grown > 60 * 1024, f"the pool did not grow: {grown} KiB"
        subprocess.run([need, "--punch-hole", "--keep-size", "--offset", "0", "--length",
                        str(160 * MIB), m.disk], check=True, timeout=60)
        t0 = time.monotonic()
        wait_for(lambda: status_kib("VmRSS", m.pid) - base < grown // 3, timeout=60,
                 what="the discarded pool's memory to be given back", interval=0.2)
        print(f"grew {grown} KiB; given back {time.monotonic() - t0:.1f} s after the discard")
        # the release unlocks, trims, then locks again: the RSS may fall before the relock
        wait_for(lambda: status_kib("VmLck", m.pid) > 0, timeout=10,
                 what="the server to lock its memory again", interval=0.05)


# ---------------------------------------------------------------------------------------------
# real swapping


LIMIT = 96 * MIB
WORKING_SET_MIB = 320


# the run's front end (make test's last run: mfusepy), and FUSE over io_uring once
HOG_FRONT_ENDS = [mountutil.DEFAULT_FUSE] + (["native-uring"] if mountutil.DEFAULT_FUSE == "native"
                                              else [])


@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fuse", HOG_FRONT_ENDS)
def test_hog_really_swaps_through_zblock(fuse):
    require_swap_tools()
    zswap_must_be_off()
    with Mount(size="512M", swap=True, pool_limit="128M", fuse=fuse) as m:
        disk = os.path.join(os.path.realpath(m.mountpoint), "disk")
        hog = loop = None
        try:
            res = zblock("swapon", m.mountpoint, "--priority", "32767", timeout=120)
            assert res.returncode == 0, res.stderr
            loop = res.stdout.strip()
            others0 = {s["name"]: s["used_kib"] for s in swapctl.swaps() if s["name"] != loop}
            stats0 = m.stats()
            kernel_zswpout0 = vmstat("zswpout")
            with MemCgroup(LIMIT) as cg:
                hog = subprocess.Popen([sys.executable, HOG, "--mib", str(WORKING_SET_MIB), "--passes", "1",
                                        "--hold", "--cgroup-procs", cg.procs], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                max_used = 0
                line = ""
                deadline = time.monotonic() + 420
                while not line:
                    e = swapctl.swap_entry(loop)
                    max_used = max(max_used, e["used_kib"] if e else 0)
                    if hog.poll() is not None:
                        break
                    if time.monotonic() > deadline:
                        raise AssertionError("the hog did not finish within 420 s")
                    # sample /proc/swaps every 0.2 s until the hog prints its result
                    if select.select([hog.stdout], [], [], 0.2)[0]:
                        line = hog.stdout.readline()
                assert line.strip(), f"hog exited {hog.poll()} without a result: {hog.stderr.read()[-2000:]}"
                result = json.loads(line)
                print(f"hog: {result}, max swap used {max_used} KiB")
                assert result["errors"] == 0 and result["verified"] == result["pages"] == WORKING_SET_MIB * 256, result
                # the hog still holds its pages: some are in zblock now
                held = m.stats()
                held_used = swapctl.swap_entry(loop)["used_kib"]
                assert held["stored_pages"] > 0 and held_used > 0, (held["stored_pages"], held_used)
                hog.stdin.write("exit\n")
                hog.stdin.close()
                hog.wait(timeout=60)
                assert hog.returncode == 0, hog.stderr.read()[-2000:]
                hog.stdout.close()
                hog.stderr.close()
                hog = None
            # it really swapped, through zblock, not elsewhere
            assert max_used * 1024 >= (WORKING_SET_MIB * MIB - LIMIT) // 2, f"swap used only {max_used} KiB"
            stats1 = m.stats()
            grew = stats1["zswpout"] - stats0["zswpout"]
            assert grew * 4096 >= (WORKING_SET_MIB * MIB - LIMIT) // 2, f"zswpout grew by {grew} pages only"
            for s in swapctl.swaps():
                if s["name"] in others0:
                    assert s["used_kib"] <= others0[s["name"]], f"another swap device took pages: {s}"
            assert vmstat("zswpout") == kernel_zswpout0, "kernel zswap stored pages during the test"
            zswap_must_be_off()
            # the hog is gone: swap frees its slots and discards whole clusters, asynchronously
            t0 = time.monotonic()
            wait_for(lambda: m.stats()["discarded_pages"] > held["discarded_pages"], 60,
                     "discards to reach zblock after the hog exited")
            wait_for(lambda: m.stats()["stored_pages"] < held["stored_pages"], 60,
                     "zblock to drop the discarded pages")
            print(f"discards arrived within {time.monotonic() - t0:.2f} s; zswpout +{grew}, "
                  f"written back {stats1['written_back_pages'] - stats0['written_back_pages']} pages, "
                  f"stored {held['stored_pages']} -> {m.stats()['stored_pages']} pages")
            e = swapctl.swap_entry(loop)
            assert e is not None and e["used_kib"] < held_used
            res = zblock("swapoff", m.mountpoint, timeout=600)
            assert res.returncode == 0, res.stderr
            assert swapctl.swap_entry(loop) is None and swapctl.loops_over(disk) == []
        finally:
            if hog is not None:
                mountutil.kill_and_wait(hog.pid)
                hog.communicate(timeout=30)
            teardown_swap(m, loop)
    assert not mountutil.is_mounted(m.mountpoint)
    assert swapctl.loops_over(disk) == []
    assert all(not s["name"].startswith("/dev/loop") or swapctl.loop_backing_file(s["name"]) != disk
               for s in swapctl.swaps())
