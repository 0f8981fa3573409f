"""Giving locked memory back: release_free_memory() unlocks, trims malloc's free heap, relocks.

Under mlockall (zblock.hardening) glibc cannot return freed heap memory (madvise(MADV_DONTNEED)
is EINVAL on locked pages), so after a burst of swap the server would keep its peak resident.
The daemon hands `functools.partial(release_free_memory, hardening)` to the Store, whose
Trimmer calls it when the pool has shrunk a lot and the cache has been quiet (zblock.pool.Trimmer).

Memory is read through psutil only: MemAvailable (psutil.virtual_memory().available) decides
whether releasing is safe, the process's RSS measures what it gave back.

Locks: `_release_lock` (try-acquire only) keeps two releases from interleaving their
unlock/relock. What this module does not do: lock memory in the first place (zblock.hardening),
decide when to trim (zblock.pool.Trimmer), or trim an unlocked process (the Trimmer's plain
malloc_trim).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import psutil

from .libc import MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT, libc

log = logging.getLogger("zblock.swap")

_release_lock = threading.Lock()


def mem_available_fraction() -> float:
    """MemAvailable / MemTotal of the machine."""
    vm = psutil.virtual_memory()
    return vm.available / vm.total if vm.total else 0.0


def release_free_memory(hardening, min_available: float = 0.25) -> int:
    """Give memory that malloc has freed back to the system; returns the RSS drop in bytes.

    `hardening` is the Hardening that zblock.hardening.harden_for_swap() returned (None: not
    hardened): under mlockall freed heap stays resident, so this unlocks, runs malloc_trim(0)
    and locks again.

    The window between unlock and relock (tens of ms) is the risk: a page of ours reclaimed in it
    would have to come back from the device we serve. So it runs only when the hardening locked
    memory and MemAvailable is at least `min_available` of RAM (the kernel then has no reason to
    reclaim us), and never twice at once. 0 when skipped.
    """
    h = hardening
    if h is None or not h.mlocked:
        return 0
    if not _release_lock.acquire(blocking=False):
        return 0
    try:
        if mem_available_fraction() < min_available:
            return 0
        proc = psutil.Process()
        before = proc.memory_info().rss
        flags = MCL_CURRENT | MCL_FUTURE | (MCL_ONFAULT if h.onfault else 0)
        libc.munlockall()
        try:
            libc.malloc_trim(0)
        finally:
            if libc.mlockall(flags) != 0:
                err = ctypes.get_errno()
                h.mlocked = False
                log.critical("mlockall after malloc_trim failed (%s): the server is no longer "
                             "locked in memory", os.strerror(err))
        return max(0, before - proc.memory_info().rss)
    finally:
        _release_lock.release()
