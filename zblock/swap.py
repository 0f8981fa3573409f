"""Swap mode: hardening the server that serves swap, the swapon/swapoff commands, sd_notify.

A zblock mount serves swap through a loop device: swap-out -> loop (direct I/O) -> FUSE -> this
process -> compressed cache / backing file. The kernel is short of memory exactly when it sends
us pages, so the server must not need the kernel's help to answer (reference/userspace-peers.md
§2, what s3backer, ublksrv, nbdkit --swap and nbd-client -swap do):

  1. PR_SET_IO_FLUSHER (needs CAP_SYS_RESOURCE; Linux >= 5.6): PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE
     on the task. Our own allocations then never recurse into I/O (swap-out to the device we
     serve, a deadlock that does not even show in dmesg: mayastor #1911), and our backing-file
     writes are not throttled as if we were a dirtier. The flag is per task and copied at
     clone(): it must be set before any other thread exists (see harden_for_swap).
  2. Small thread stacks (threading.stack_size and libfuse's FUSE_THREAD_STACK): bounds what each
     thread can pin, in case MCL_ONFAULT is missing and mlockall has to populate every stack.
     malloc tuned for locked memory (fixed mmap threshold, one arena per CPU): freed heap memory
     cannot be handed back once locked, so --swap would otherwise cost ~20 MiB more RSS.
  3. mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT): no page of the server is ever swapped out
     (a fault would need the device the server serves). ONFAULT locks pages when first touched
     instead of populating every mapping at once: without it each thread's 8 MiB stack and each
     malloc arena becomes resident.
  4. oom_score_adj -1000: the OOM killer must not pick the process that holds the swapped pages.

Locked memory cannot be handed back by glibc (madvise(MADV_DONTNEED) is EINVAL on locked pages),
so after a burst of swap the server would keep its peak resident; release_free_memory() unlocks,
trims and relocks when memory is plentiful (its caller: the cache, after the pool shrank a lot).

Invariant: hardening failures never stop the mount (a server without them still works, it only
risks the deadlocks above); each is one warning, logged once, with what to do about it.

swapon/swapoff: the state lives in the kernel (loop devices in /sys/block/loop*/loop, swap areas
in /proc/swaps), so nothing is recorded here and a second run can finish what a failed one left.
A loop device belongs to a mount when its backing_file is MOUNTPOINT/disk. Both commands hold
RUNTIME_DIR/swap.lock (flock) so that two of them cannot interleave on one machine.

sd_notify: `notify()` sends a state string to $NOTIFY_SOCKET (systemd's Type=notify), with no
dependency; `notify_ready()` sends READY=1 only once the mount answers a stat.

Locks: `_hardening_lock` makes harden_for_swap() run once and guards `_hardening`;
`_release_lock` (try-acquire only) keeps two release_free_memory() calls from interleaving their
unlock/relock; the flock on swap.lock (a file, across processes) serialises swapon/swapoff.
None is held while another is taken.

What this module does not do: mounting (zblock.daemon), option parsing (zblock.cli), and the
backing file's preallocation and ephemeral contents (zblock.backing, Config.swap).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from .errors import MountError, UsageError
from .libc import MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT, PR_SET_IO_FLUSHER
from .libc import libc as _libc
from .pool import MMAP_THRESHOLD, tune_malloc
from .runtime import find_zblock_mount, read_pid_file, read_stats, runtime_dir

log = logging.getLogger("zblock.swap")

# ---------------------------------------------------------------------------------------------
# constants

PF_MEMALLOC_NOIO = 0x00080000   # include/linux/sched.h; what ublksrv tests/generic/008 checks
PF_LOCAL_THROTTLE = 0x00100000
PF_IO_FLUSHER = PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE
CAP_IPC_LOCK = 14
CAP_SYS_RESOURCE = 24
OOM_SCORE_ADJ_MIN = -1000

# 512 KiB per thread: a libfuse worker runs one Python callback (ctypes trampoline, the eval loop,
# lz4's 16 KiB on-stack hash table, zlib/zstd keep theirs on the heap); 8 MiB (the RLIMIT_STACK
# default) is 16x more than any path needs and is what mlockall would pin without ONFAULT.
THREAD_STACK_SIZE = 512 << 10

ZSWAP_ENABLED = "/sys/module/zswap/parameters/enabled"
SWAPON_TIMEOUT = 120.0          # losetup + mkswap + swapon of a fresh area: < 1 s here
SWAPOFF_TIMEOUT = 3600.0        # swapoff reads every swapped page back in: bounded by RAM, not us
LOOP_DETACH_TIMEOUT = 30.0      # losetup -d is deferred (autoclear) while the device is still open
NOTIFY_READY_TIMEOUT = 120.0


# ---------------------------------------------------------------------------------------------
# facts about this machine and a process


def kernel_zswap_enabled() -> bool:
    """True when kernel zswap would take swapped pages before they reach any swap device."""
    try:
        with open(ZSWAP_ENABLED) as f:
            return f.read().strip().upper() in ("Y", "1")
    except OSError:
        return False            # no zswap in this kernel


def capabilities(pid: int | str = "self") -> int:
    """The effective capability mask of a process (CapEff of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def has_capability(cap: int, pid: int | str = "self") -> bool:
    return bool(capabilities(pid) >> cap & 1)


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


def preflight_warnings(config=None) -> list[str]:
    """What the user should hear before a --swap mount starts (the CLI prints these)."""
    out = []
    if kernel_zswap_enabled():
        out.append(f"kernel zswap is enabled ({ZSWAP_ENABLED} = Y): it compresses swapped pages "
                   "before they reach zblock; disable it with: echo N > " + ZSWAP_ENABLED)
    if not has_capability(CAP_SYS_RESOURCE):
        out.append("no CAP_SYS_RESOURCE: PR_SET_IO_FLUSHER and oom_score_adj -1000 will be refused; "
                   "the server may deadlock under memory pressure or be chosen by the OOM killer")
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if not has_capability(CAP_IPC_LOCK) and soft != resource.RLIM_INFINITY:
        out.append(f"no CAP_IPC_LOCK and RLIMIT_MEMLOCK is {soft} bytes: mlockall will fail and the "
                   "server's own pages can be swapped out (raise it: LimitMEMLOCK=infinity)")
    if config is not None and getattr(config, "kernel_cache", False):
        out.append("--kernel-cache cannot be used with --swap")
    return out


# ---------------------------------------------------------------------------------------------
# hardening


@dataclass
class Hardening:
    """What harden_for_swap() achieved; `warnings` are the ones it logged."""

    io_flusher: bool = False
    mlocked: bool = False
    onfault: bool = False
    oom_score_adj: int | None = None
    thread_stack: int = 0
    mmap_threshold: int = 0
    threads_before: int = 1       # tasks that existed when hardening started (only 1 gets the flag)
    warnings: list[str] = field(default_factory=list)


_hardening_lock = threading.Lock()
_hardening: Hardening | None = None


def harden_for_swap(config=None) -> Hardening:
    """Harden this process for serving swap. Idempotent; never raises for a refused step.

    Call it in the server before any other thread starts (before the Store opens: its writeback
    worker would otherwise run without PF_MEMALLOC_NOIO) and before libfuse starts its workers.
    `config` is the mount's Config (only checked: --kernel-cache is refused by Config.check).
    """
    global _hardening
    with _hardening_lock:
        if _hardening is not None:
            return _hardening
        h = Hardening()

        def warn(msg: str) -> None:
            h.warnings.append(msg)
            log.warning("swap hardening: %s", msg)

        with contextlib.suppress(OSError):
            h.threads_before = len(os.listdir("/proc/self/task"))

        # 1. IO_FLUSHER first: everything after it (mlockall populating, thread creation) already
        #    runs with NOIO allocations, and threads created later inherit the flag at clone().
        if _libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
            h.io_flusher = True
            if h.threads_before > 1:
                warn(f"{h.threads_before - 1} thread(s) started before the hardening do not have "
                     "PR_SET_IO_FLUSHER (it is per task, inherited only at thread creation)")
        else:
            err = ctypes.get_errno()
            why = ("needs CAP_SYS_RESOURCE" if err == errno.EPERM
                   else "needs Linux >= 5.6" if err == errno.EINVAL else os.strerror(err))
            warn(f"PR_SET_IO_FLUSHER refused ({why}): the server's allocations may recurse into "
                 "swap-out to its own device under memory pressure")

        # 2. small stacks for every thread created from now on (Python's and libfuse's workers)
        threading.stack_size(THREAD_STACK_SIZE)
        os.environ.setdefault("FUSE_THREAD_STACK", str(THREAD_STACK_SIZE))
        h.thread_stack = THREAD_STACK_SIZE

        # 2b. malloc for a locked process. glibc gives freed heap memory back with
        #     madvise(MADV_DONTNEED), which fails on locked pages (EINVAL): under mlockall whatever an
        #     arena once held stays resident. Measured after 128 MiB of 1 MiB writes and reads
        #     (VmRSS, same server without --swap: 83.7 MiB): glibc defaults 103.5 MiB; a fixed 4 MiB
        #     mmap threshold (glibc otherwise raises it to 32 MiB as big buffers are freed) 92.9;
        #     that plus one arena per CPU 84.0. Every allocation from mmap (128 KiB threshold) held
        #     RSS too but halved read speed (a fault per page of every 1 MiB request buffer).
        tune_malloc()
        h.mmap_threshold = MMAP_THRESHOLD

        # 3. lock memory; ONFAULT needs Linux >= 4.4 (EINVAL before): then lock without it,
        #    the small stacks above bound what that populates.
        for flags, onfault in ((MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT, True), (MCL_CURRENT | MCL_FUTURE, False)):
            if _libc.mlockall(flags) == 0:
                h.mlocked, h.onfault = True, onfault
                break
            err = ctypes.get_errno()
            if err == errno.EINVAL and onfault:
                continue
            if err in (errno.EPERM, errno.ENOMEM) and _raise_memlock_limit():
                if _libc.mlockall(flags) == 0:
                    h.mlocked, h.onfault = True, onfault
                    break
                err = ctypes.get_errno()
            warn(f"mlockall refused ({os.strerror(err)}; needs CAP_IPC_LOCK or RLIMIT_MEMLOCK "
                 "unlimited): the server's own pages may be swapped out to the device it serves")
            break

        # 4. never the OOM killer's choice
        try:
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            try:
                os.write(fd, str(OOM_SCORE_ADJ_MIN).encode())
            finally:
                os.close(fd)
        except OSError as e:
            warn(f"oom_score_adj {OOM_SCORE_ADJ_MIN} refused ({e.strerror}; needs CAP_SYS_RESOURCE): "
                 "the OOM killer may kill the server and lose every swapped page")
        with contextlib.suppress(OSError, ValueError):
            with open("/proc/self/oom_score_adj") as f:
                h.oom_score_adj = int(f.read())

        if kernel_zswap_enabled():
            warn(f"kernel zswap is enabled ({ZSWAP_ENABLED}): it takes swapped pages before "
                 "they reach zblock")
        log.info("swap hardening: io_flusher=%s mlockall=%s%s oom_score_adj=%s thread_stack=%d KiB "
                 "threads_before=%d", h.io_flusher, h.mlocked, "+onfault" if h.onfault else "",
                 h.oom_score_adj, h.thread_stack >> 10, h.threads_before)
        _hardening = h
        return h


def _mem_available_fraction() -> float:
    avail = total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1])
            elif line.startswith("MemTotal:"):
                total = int(line.split()[1])
    return avail / total if total else 0.0


_release_lock = threading.Lock()


def release_free_memory(min_available: float = 0.25) -> int:
    """Give memory that malloc has freed back to the system; returns the VmRSS drop in bytes.

    Under mlockall glibc cannot return freed heap memory (madvise(MADV_DONTNEED) is EINVAL on
    locked pages), so after a burst of swap the server keeps its peak resident (measured: a
    768 MiB hog in a 256 MiB cgroup left VmRSS at 528 MiB with lz4, 955 MiB with zstd, against
    85 / 353 MiB without --swap). This unlocks, runs malloc_trim(0) and locks again.

    The window between unlock and relock (tens of ms) is the risk: a page of ours reclaimed in it
    would have to come back from the device we serve. So it runs only when the hardening locked
    memory and MemAvailable is at least `min_available` of RAM (the kernel then has no reason to
    reclaim us), and never twice at once. Caller: the cache, when its pool has shrunk a lot
    (e.g. by pool_limit/4 since the last call), not on every free. 0 when skipped.
    """
    h = _hardening
    if h is None or not h.mlocked:
        return 0
    if not _release_lock.acquire(blocking=False):
        return 0
    try:
        if _mem_available_fraction() < min_available:
            return 0
        before = status_kib("VmRSS")
        flags = MCL_CURRENT | MCL_FUTURE | (MCL_ONFAULT if h.onfault else 0)
        _libc.munlockall()
        try:
            _libc.malloc_trim(0)
        finally:
            if _libc.mlockall(flags) != 0:
                err = ctypes.get_errno()
                h.mlocked = False
                log.critical("mlockall after malloc_trim failed (%s): the server is no longer "
                             "locked in memory", os.strerror(err))
        return max(0, before - status_kib("VmRSS")) << 10
    finally:
        _release_lock.release()


def _raise_memlock_limit() -> bool:
    """Lift RLIMIT_MEMLOCK as far as the hard limit allows. True if the soft limit changed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == hard:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        return True
    except (ValueError, OSError):
        return False


# ---------------------------------------------------------------------------------------------
# sd_notify (systemd Type=notify), no dependency


def notify(state: str) -> bool:
    """Send `state` ("READY=1", "STOPPING=1", "STATUS=...") to $NOTIFY_SOCKET. False if unset.

    The protocol is one datagram on an AF_UNIX socket; a leading '@' names an abstract socket.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(5.0)
            s.sendto(state.encode(), addr)
        return True
    except OSError as e:
        log.warning("sd_notify %r to %s failed: %s", state, os.environ.get("NOTIFY_SOCKET"), e)
        return False


def notify_ready(mountpoint: str, timeout: float = NOTIFY_READY_TIMEOUT) -> threading.Thread | None:
    """Send READY=1 once the mount answers. Returns at once (the waiting is a thread's).

    Call it from the FUSE init callback: the kernel holds every request until INIT is answered,
    so the stat cannot be done there (it would wait for its own caller). The thread stats
    MOUNTPOINT/stats, which only succeeds once libfuse serves requests, then notifies.
    No-op (None) without $NOTIFY_SOCKET.
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    path = os.path.join(mountpoint, "stats")

    def wait_then_notify() -> None:
        # The stat itself cannot take a deadline; if it never returns, systemd's
        # TimeoutStartSec kills the server, which is the right outcome for a mount that
        # does not answer. The loop bounds the other failure (ENOENT/ENOTCONN while racing).
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.stat(path)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    log.error("mount %s did not answer within %.0f s: %s; READY=1 not sent",
                              mountpoint, timeout, e)
                    return
                time.sleep(0.05)    # the mount appearing is outside this thread's control
        notify(f"READY=1\nSTATUS=serving {mountpoint}\nMAINPID={os.getpid()}")

    t = threading.Thread(target=wait_then_notify, name="zblock-notify", daemon=True)
    t.start()
    return t


def notify_stopping() -> bool:
    return notify("STOPPING=1")


# ---------------------------------------------------------------------------------------------
# kernel state: loop devices and swap areas


def swaps() -> list[dict]:
    """/proc/swaps as dicts: name, type, size_kib, used_kib, priority."""
    out = []
    with open("/proc/swaps") as f:
        for line in list(f)[1:]:
            parts = line.split()
            if len(parts) < 5:
                continue
            name = parts[0].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            out.append({"name": name, "type": parts[1], "size_kib": int(parts[2]),
                        "used_kib": int(parts[3]), "priority": int(parts[4])})
    return out


def swap_entry(device: str) -> dict | None:
    for s in swaps():
        if s["name"] == device:
            return s
    return None


def loop_backing_file(device: str) -> str | None:
    """The file behind /dev/loopN (None if the device is detached)."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            path = f.read().rstrip("\n")
    except OSError:
        return None
    return path[:-len(" (deleted)")] if path.endswith(" (deleted)") else path


def loop_dio(device: str) -> bool:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/dio") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def loops_over(path: str) -> list[str]:
    """Loop devices whose backing file is `path` (compared as written: no access to the file)."""
    found = []
    for name in sorted(os.listdir("/sys/block")):
        if name.startswith("loop") and loop_backing_file(name) == path:
            found.append(f"/dev/{name}")
    return found


# ---------------------------------------------------------------------------------------------
# swap mode of a mount


def mount_is_swap(mountpoint: str) -> bool:
    """Whether the zblock mount at `mountpoint` was started with --swap (or -o swap).

    The stats JSON's "swap" flag when the server reports one; otherwise the server's own
    command line (pid file -> /proc/PID/cmdline), parsed by the CLI's mount parser.
    """
    from . import cli
    stats = read_stats(mountpoint)
    if "swap" in stats:
        return bool(stats["swap"])
    pid = read_pid_file(mountpoint)
    if pid is None:
        raise MountError(f"{mountpoint}: cannot tell whether it is in swap mode (no stats flag, "
                         "no server pid file)")
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode(errors="surrogateescape") for a in f.read().split(b"\0") if a]
    try:
        args = argv[argv.index("mount"):]
        parsed = cli.build_parser().parse_args(args)
        config, _, _ = cli._mount_config(parsed)
    except Exception as e:          # any parse failure means "cannot tell"
        raise MountError(f"{mountpoint}: cannot tell whether it is in swap mode "
                         f"(server command line: {e})") from None
    return bool(config.swap)


# ---------------------------------------------------------------------------------------------
# swapon / swapoff


@contextlib.contextmanager
def _swap_lock(timeout: float = 60.0):
    """One swapon/swapoff at a time on this machine (flock with a deadline)."""
    fd = os.open(os.path.join(runtime_dir(), "swap.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MountError("another zblock swapon/swapoff is running") from None
                time.sleep(0.1)     # another process holds it; flock has no timed wait
        yield
    finally:
        os.close(fd)


def _run(cmd: list[str], timeout: float) -> str:
    """Run a system tool; MountError naming the tool and its last stderr line on failure."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise MountError(f"{cmd[0]} is not installed (apt-get install util-linux)") from None
    except subprocess.TimeoutExpired:
        raise MountError(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from None
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines()
        raise MountError(f"{' '.join(cmd)} failed: {lines[-1] if lines else f'exit {res.returncode}'}")
    return res.stdout


def _zblock_disk(mountpoint: str) -> tuple[str, str]:
    """(mount point as in the mount table, its disk path); MountError if not a zblock mount."""
    entry = find_zblock_mount(mountpoint)
    return entry.mountpoint, os.path.join(entry.mountpoint, "disk")


def swapon(mountpoint: str, priority: int | None = None, *, timeout: float = SWAPON_TIMEOUT) -> str:
    """Attach a direct-I/O loop device over MOUNTPOINT/disk, mkswap, swapon --discard.

    Returns the loop device. Refuses a mount that is not in swap mode or already has a loop
    device. On any failure, what this call set up is undone before the error is raised.
    """
    if priority is not None and not -1 <= priority <= 32767:
        raise UsageError(f"swapon: --priority {priority} is out of range (-1..32767)")
    mp, disk = _zblock_disk(mountpoint)
    if not mount_is_swap(mp):
        raise MountError(f"{mountpoint} is not mounted in swap mode (mount it with --swap or -o swap)")
    if kernel_zswap_enabled():
        log.warning("kernel zswap is enabled: it will take swapped pages before they reach zblock")
    with _swap_lock():
        existing = loops_over(disk)
        if existing:
            active = [d for d in existing if swap_entry(d)]
            what = "swap is already on" if active else "a loop device is attached"
            raise MountError(f"{mountpoint}: {what} ({', '.join(existing)}); "
                             f"run zblock swapoff {mountpoint} first")
        # 4096-byte sectors: every request is whole pages (no read-modify-write in zblock);
        # direct I/O: no second copy of each page in the page cache above FUSE.
        loop = _run(["losetup", "--find", "--show", "--direct-io=on", "--sector-size", "4096", disk],
                    timeout).strip()
        if not loop.startswith("/dev/loop"):
            raise MountError(f"losetup printed {loop!r}, not a loop device")
        try:
            if not loop_dio(loop):
                raise MountError(f"{loop} did not get direct I/O (/sys/block/{os.path.basename(loop)}"
                                 "/loop/dio = 0): refusing buffered swap over FUSE")
            _run(["mkswap", "--label", "zblock", loop], timeout)
            cmd = ["swapon", "--discard"]
            if priority is not None:
                cmd += ["--priority", str(priority)]
            _run(cmd + [loop], timeout)
        except BaseException:
            _teardown(loop, discard=False)
            raise
        log.info("swap on %s over %s", loop, disk)
        return loop


def swapoff(mountpoint: str, *, timeout: float = SWAPOFF_TIMEOUT) -> list[str]:
    """swapoff, blkdiscard and detach every loop device over MOUNTPOINT/disk. Returns them.

    Refuses a mount that is not in swap mode (its loop devices may hold a user's filesystem)
    and a mount with no loop device over it.
    """
    mp, disk = _zblock_disk(mountpoint)
    if not mount_is_swap(mp):
        raise MountError(f"{mountpoint} is not mounted in swap mode: not touching its loop devices")
    with _swap_lock():
        loops = loops_over(disk)
        if not loops:
            raise MountError(f"{mountpoint}: swap is not on (no loop device over {disk})")
        for loop in loops:
            _teardown(loop, discard=True, timeout=timeout)
        return loops


def _teardown(loop: str, *, discard: bool, timeout: float = SWAPOFF_TIMEOUT) -> None:
    """swapoff if active, optionally blkdiscard (zblock drops the pages), detach, wait for it."""
    errors = []
    if swap_entry(loop) is not None:
        _run(["swapoff", loop], timeout)        # a failure here must stop us: the area is live
    if discard:
        try:
            _run(["blkdiscard", "--force", loop], 600.0)
        except MountError as e:
            errors.append(str(e))               # still detach: the pages die with the mount
    try:
        _run(["losetup", "--detach", loop], 60.0)
    except MountError as e:
        errors.append(str(e))
    deadline = time.monotonic() + LOOP_DETACH_TIMEOUT
    while loop_backing_file(loop) is not None:
        if time.monotonic() > deadline:
            errors.append(f"{loop} still attached {LOOP_DETACH_TIMEOUT:.0f} s after losetup -d "
                          "(something keeps it open)")
            break
        time.sleep(0.05)            # the kernel detaches when the last opener closes
    if errors:
        raise MountError("; ".join(errors))


# ---------------------------------------------------------------------------------------------
# command line (zblock.cli calls register_cli)


def cmd_swapon(args, argv) -> int:
    if kernel_zswap_enabled():
        print(f"zblock: warning: kernel zswap is enabled, it takes the pages first: echo N > {ZSWAP_ENABLED}",
              file=sys.stderr)
    print(swapon(args.mountpoint, args.priority))
    return 0


def cmd_swapoff(args, argv) -> int:
    swapoff(args.mountpoint)
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("swapon", help="use a --swap mount as swap (loop device, mkswap, swapon)",
                       description="Attach a direct-I/O loop device over MOUNTPOINT/disk, mkswap it "
                                   "and swapon --discard it; prints the loop device.")
    p.add_argument("mountpoint")
    p.add_argument("--priority", "-p", type=int, help="swap priority (-1..32767; default: the kernel's)")
    p.set_defaults(func=cmd_swapon)
    p = sub.add_parser("swapoff", help="undo zblock swapon (swapoff, blkdiscard, detach)",
                       description="swapoff the loop device over MOUNTPOINT/disk, discard it and "
                                   "detach it.")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_swapoff)
