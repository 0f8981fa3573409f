"""Helpers for tests that use real mounts: start with a deadline, stop with abort + `umount -l`
fallback, sweep leftovers of earlier runs. Shared by every real-mount test file.

Every mount point and backing file of a test lives under PREFIX (`/tmp/zblock-test-*`), outside
pytest's tmp_path, so `sweep()` can find what an earlier, killed run left behind: FUSE mounts
(aborted through /sys/fs/fuse/connections, then lazily unmounted), swap and loop devices over
files there, servers still running, and the directories.

Typical use:

    with mountutil.Mount(size="64M") as m:   # skips without /dev/fuse or root
        subprocess.run(["dd", f"of={m.disk}", ...])
        m.stats()                                            # the JSON of MOUNT/stats
    # unmounted (zblock umount; on failure abort + umount -l + kill), directory removed

Nothing here sleeps without a deadline: waits poll something outside the test process (the mount
table, a pid) until a deadline, which DESIGN.md allows for tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse

import rediscluster
from conftest import require

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
PREFIX = "/tmp/zblock-test-"
# The FUSE front ends a test can mount with, as `zblock mount` options. Mounts use
# ZBLOCK_TEST_FUSE (make test runs the mount tests once more with fuse3) unless a test names one.
FRONT_ENDS = {"native": ["--fuse-impl", "native"],
              "native-uring": ["--fuse-impl", "native", "--fuse-uring", "on"],
              "fuse3": ["--fuse-impl", "mfusepy", "--fuse-version", "3"],
              "fuse2": ["--fuse-impl", "mfusepy", "--fuse-version", "2"]}
DEFAULT_FUSE = os.environ.get("ZBLOCK_TEST_FUSE", "native")
FSTYPE = "fuse.zblock"

# The fault-injecting entry point (tests/faultserver.py): `zblock mount` with a faulty store.
FAULTSERVER = os.path.join(TESTS, "faultserver.py")


def env() -> dict:
    """Environment for zblock subprocesses: the repo and tests/ importable."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([REPO, TESTS] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.pop("FUSE_LIBRARY_NAME", None)
    return e


def zblock(*args, timeout: float = 60, check: bool = False, input=None,
           faults: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m zblock ARGS` (with `faults`: tests/faultserver.py ARGS) with a deadline;
    output captured as text."""
    program = [FAULTSERVER] if faults else ["-m", "zblock"]
    res = subprocess.run([sys.executable, *program, *map(str, args)], capture_output=True,
                         text=True, timeout=timeout, env=env(), input=input, cwd=REPO)
    if check and res.returncode != 0:
        raise AssertionError(f"zblock {' '.join(map(str, args))} exited {res.returncode}: {res.stderr.strip()}")
    return res


def require_mounts() -> None:
    require(os.path.exists("/dev/fuse"), "no /dev/fuse")
    require(os.geteuid() == 0, "real mounts need root here (allow_other, umount, loop devices)")
    require(shutil.which("fusermount3") is not None or shutil.which("fusermount") is not None,
            "no fusermount")


FUSE_URING_PARAM = "/sys/module/fuse/parameters/enable_uring"
_fuse_uring_before: list[str] = []


def set_fuse_uring(value: str) -> None:
    """Whether the kernel offers FUSE over io_uring (Linux 6.14+: "Y" or "N");
    restore_fuse_uring() (conftest, at the session's end) puts the admin's setting back."""
    require(os.path.exists(FUSE_URING_PARAM), "this kernel has no FUSE over io_uring (6.14+)")
    with open(FUSE_URING_PARAM) as f:
        now = f.read().strip()
    if not _fuse_uring_before:
        _fuse_uring_before.append(now)
    if now != value:
        with open(FUSE_URING_PARAM, "w") as f:
            f.write(value)


def enable_fuse_uring() -> None:
    set_fuse_uring("Y")


def restore_fuse_uring() -> None:
    if _fuse_uring_before:
        with open(FUSE_URING_PARAM, "w") as f:
            f.write(_fuse_uring_before.pop())


# ---------------------------------------------------------------------------------------------
# the mount table


def mountinfo() -> list[tuple[str, str, int]]:
    """(mountpoint, fstype, fuse connection minor) from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            mp = parts[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            out.append((mp, parts[sep + 1], int(parts[2].split(":")[1])))
    return out


def is_mounted(path: str, fstype: str | None = FSTYPE) -> bool:
    path = os.path.realpath(path)
    return any(mp == path and (fstype is None or t == fstype) for mp, t, _ in mountinfo())


def wait_for(cond, timeout: float = 20.0, what: str = "condition", interval: float = 0.05):
    """Poll cond() (something outside this process) until true or the deadline; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def force_unmount(path: str) -> None:
    """Abort the FUSE connection (a dead server would hang everything), then `umount -l`."""
    path = os.path.realpath(path)
    for mp, fstype, minor in mountinfo():
        if mp == path and fstype.startswith("fuse"):
            with contextlib.suppress(OSError):
                with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
                    f.write("1")
    subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)


def server_pids(under: str) -> list[int]:
    """Pids of zblock servers whose command line mentions `under`."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        server = b"zblock" in cmd or FAULTSERVER.encode() in cmd
        if server and b"--foreground" in cmd and any(a.startswith(under.encode()) for a in cmd):
            pids.append(int(d))
    return pids


def kill_and_wait(pid: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        import select
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def wait_pid(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to exit (pidfd). True if it did."""
    import select
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def cleanup_dir(path: str) -> None:
    """Unmount anything under path (abort + umount -l), kill its servers, remove it."""
    for mp, _, _ in sorted(mountinfo(), key=lambda m: -len(m[0])):
        if mp.startswith(path.rstrip("/") + "/"):
            force_unmount(mp)
    for pid in server_pids(path):
        if not wait_pid(pid, 10):
            kill_and_wait(pid)
    shutil.rmtree(path, ignore_errors=True)
    remove_runtime_files(path)


def remove_runtime_files(path: str, keep=lambda mountpoint: False) -> int:
    """Remove the servers' pid and log files (zblock.runtime) of mount points under `path`,
    but those `keep` names: tests leave none behind in /run/zblock. Returns how many."""
    from zblock import runtime
    rt = runtime.runtime_dir()
    prefix = urllib.parse.quote(os.path.realpath(path).rstrip("/") + "/", safe="")
    n = 0
    with contextlib.suppress(OSError):
        for name in os.listdir(rt):
            if name.startswith(prefix) and name.endswith((".log", ".pid")) and \
                    not keep(urllib.parse.unquote(name.rsplit(".", 1)[0])):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(rt, name))
                    n += 1
    return n


def new_workdir(tag: str = "") -> str:
    """A fresh directory PREFIX<pid>-<tag><random>: the pid says which run owns it (see sweep)."""
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-{tag}")


def _owner_alive(path: str, prefix: str) -> bool:
    """True when the directory under prefix belongs to a test process that still runs.

    Several test runs (other sessions, CI jobs) may share the machine: a sweep must only take
    what a dead run left behind, never the mounts of a live one.
    """
    rest = path[len(prefix):].split("/", 1)[0]
    owner = rest.split("-", 1)[0]
    if not owner.isdigit():
        return False
    pid = int(owner)
    if pid == os.getpid():
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"python" in f.read()
    except OSError:
        return False


def sweep(prefix: str = PREFIX) -> list[str]:
    """Remove what dead earlier runs left under prefix: swap, loops, mounts, servers, directories.

    Directories are named PREFIX<pid>-...; those of a live test process are left alone.
    """
    def stale(path: str) -> bool:
        return path.startswith(prefix) and not _owner_alive(path, prefix)

    done = []
    # swap and loop devices over our files first: they pin the mounts.
    loops = {}
    for dev in os.listdir("/sys/block"):
        if not dev.startswith("loop"):
            continue
        with contextlib.suppress(OSError):
            with open(f"/sys/block/{dev}/loop/backing_file") as f:
                bf = f.read().strip()
            if stale(bf):
                loops[f"/dev/{dev}"] = bf
    with contextlib.suppress(OSError):
        with open("/proc/swaps") as f:
            for line in list(f)[1:]:
                name = line.split()[0]
                if name in loops or stale(name):
                    subprocess.run(["swapoff", name], capture_output=True, timeout=120)
                    done.append(f"swapoff {name}")
    for dev in loops:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)
        done.append(f"losetup -d {dev}")
    for mp, fstype, _ in sorted(mountinfo(), key=lambda m: -len(m[0])):
        if stale(mp):
            force_unmount(mp)
            done.append(f"umount {mp}")
    for pid in server_pids(prefix):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except OSError:
            continue
        if any(stale(a) for a in args):
            kill_and_wait(pid)
            done.append(f"kill {pid}")
    for name in os.listdir(os.path.dirname(prefix)):
        path = os.path.join(os.path.dirname(prefix), name)
        if stale(path) and rediscluster.sweep(path):
            done.append(f"redis cluster in {path}")
        if stale(path) and not any(mp.startswith(path) for mp, _, _ in mountinfo()):
            shutil.rmtree(path, ignore_errors=True)
    removed = remove_runtime_files(os.path.dirname(prefix), keep=lambda mp: not stale(mp))
    if removed:
        done.append(f"{removed} runtime file(s) of earlier runs")
    return done


# ---------------------------------------------------------------------------------------------
# a mount


class Mount:
    """A zblock mount in a fresh directory under PREFIX, started through the CLI.

    Arguments are `zblock mount` options (size="64M", compressor="zstd", extra=[...]).
    `backing` reuses an existing file (remount tests); otherwise DIR/backing.img is made.
    `faults=True` starts the server through tests/faultserver.py: its disks follow the rules file
    named by ZBLOCK_TEST_FAULTS in this process's environment.
    """

    def __init__(self, size: str | None = "64M", fuse: str | None = None, *, backing: str | None = None,
                 workdir: str | None = None, extra: list[str] | None = None, start_timeout: float = 60,
                 faults: bool = False, **options):
        self.size = size
        self.fuse = fuse or DEFAULT_FUSE
        if self.fuse not in FRONT_ENDS:
            raise ValueError(f"fuse={self.fuse!r}: one of {sorted(FRONT_ENDS)}")
        self.workdir = workdir or new_workdir()
        self._own_workdir = workdir is None
        self.mountpoint = os.path.join(self.workdir, "mnt")
        os.makedirs(self.mountpoint, exist_ok=True)
        self.backing = backing or os.path.join(self.workdir, "backing.img")
        self.disk = os.path.join(self.mountpoint, "disk")
        self.extra = list(extra or [])
        for k, v in options.items():
            flag = "--" + k.replace("_", "-")
            self.extra += [flag] if v is True else [flag, str(v)]
        self.start_timeout = start_timeout
        self.faults = faults
        self.pid: int | None = None

    def args(self) -> list[str]:
        a = ["mount", self.mountpoint, "--backing", self.backing, *FRONT_ENDS[self.fuse]]
        if self.size is not None:
            a += ["--size", self.size]
        return a + self.extra

    def start(self) -> "Mount":
        require_mounts()
        if self.fuse == "native-uring":
            enable_fuse_uring()
        res = zblock(*self.args(), timeout=self.start_timeout, faults=self.faults)
        if res.returncode != 0:
            self.cleanup()
            raise AssertionError(f"zblock mount failed ({res.returncode}): {res.stderr.strip()}")
        wait_for(lambda: is_mounted(self.mountpoint), 10, f"{self.mountpoint} in the mount table")
        pids = server_pids(self.mountpoint)
        self.pid = pids[0] if pids else None
        return self

    def stats(self) -> dict:
        with open(os.path.join(self.mountpoint, "stats")) as f:
            return json.load(f)

    def param(self, name: str) -> str:
        with open(os.path.join(self.mountpoint, "params", name)) as f:
            return f.read().strip()

    def umount(self, timeout: float = 120) -> None:
        """Clean unmount through the CLI; raises if it fails (after forcing clean-up)."""
        res = zblock("umount", self.mountpoint, timeout=timeout)
        if res.returncode != 0:
            self.cleanup(remove=False)
            raise AssertionError(f"zblock umount failed ({res.returncode}): {res.stderr.strip()}")
        assert not is_mounted(self.mountpoint)
        if self.pid is not None:
            # exited (a zombie until init reaps it: pidfd says so, /proc may still list it)
            assert wait_pid(self.pid, 0), "server still running after zblock umount"

    def cleanup(self, remove: bool = True) -> None:
        """Whatever state things are in: abort, umount -l, kill the server, remove the directory."""
        if is_mounted(self.mountpoint, None):
            force_unmount(self.mountpoint)
        for pid in server_pids(self.mountpoint) + ([self.pid] if self.pid else []):
            # the server may still be writing back after an abort: give it a moment, then kill
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                import select
                if not select.select([fd], [], [], 10)[0]:
                    kill_and_wait(pid)
            finally:
                os.close(fd)
        if remove and self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            remove_runtime_files(self.workdir)

    def __enter__(self) -> "Mount":
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            if is_mounted(self.mountpoint):
                try:
                    self.umount(timeout=60)
                except Exception:
                    if exc[0] is None:
                        raise
        finally:
            self.cleanup()

