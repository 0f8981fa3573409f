"""Hardening a server that serves swap: PR_SET_IO_FLUSHER, small stacks, mlockall, oom_score_adj.

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
     malloc tuned for locked memory (fixed mmap threshold, one arena): freed heap memory
     cannot be handed back once locked, so --swap would otherwise cost ~20 MiB more RSS.
  3. mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT): no page of the server is ever swapped out
     (a fault would need the device the server serves). ONFAULT locks pages when first touched
     instead of populating every mapping at once: without it each thread's 8 MiB stack and each
     malloc arena becomes resident.
  4. oom_score_adj -1000: the OOM killer must not pick the process that holds the swapped pages.

Invariant: hardening failures never stop the mount (a server without them still works, it only
risks the deadlocks above); each is one warning, logged once, with what to do about it.
`_hardening_lock` makes harden_for_swap() run once and guards `_hardening`.

What this module does not do: give locked memory back (zblock.memory, with the Hardening this
returns), swapon/swapoff (zblock.swapctl), the backing file's preallocation (zblock.backing).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import resource
import threading
from dataclasses import dataclass, field

from .libc import MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT, PR_SET_IO_FLUSHER, libc
from .pool import MMAP_THRESHOLD, tune_malloc
from .runtime import ZSWAP_ENABLED, kernel_zswap_enabled

log = logging.getLogger("zblock.swap")

CAP_IPC_LOCK = 14
CAP_SYS_RESOURCE = 24
OOM_SCORE_ADJ_MIN = -1000

# 512 KiB per thread: a libfuse worker runs one Python callback (ctypes trampoline, the eval loop,
# lz4's 16 KiB on-stack hash table, zlib/zstd keep theirs on the heap); 8 MiB (the RLIMIT_STACK
# default) is 16x more than any path needs and is what mlockall would pin without ONFAULT.
THREAD_STACK_SIZE = 512 << 10


def capabilities(pid: int | str = "self") -> int:
    """The effective capability mask of a process (CapEff of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def has_capability(cap: int, pid: int | str = "self") -> bool:
    return bool(capabilities(pid) >> cap & 1)


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


@dataclass
class Hardening:
    """What harden_for_swap() achieved; `warnings` are the ones it logged. zblock.memory clears
    `mlocked` if relocking after a release fails."""

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
        if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
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
        #     arena once held stays resident; tune_malloc keeps that near the unlocked server's.
        tune_malloc()
        h.mmap_threshold = MMAP_THRESHOLD

        # 3. lock memory; ONFAULT needs Linux >= 4.4 (EINVAL before): then lock without it,
        #    the small stacks above bound what that populates.
        for flags, onfault in ((MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT, True), (MCL_CURRENT | MCL_FUTURE, False)):
            if libc.mlockall(flags) == 0:
                h.mlocked, h.onfault = True, onfault
                break
            err = ctypes.get_errno()
            if err == errno.EINVAL and onfault:
                continue
            if err in (errno.EPERM, errno.ENOMEM) and _raise_memlock_limit():
                if libc.mlockall(flags) == 0:
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
