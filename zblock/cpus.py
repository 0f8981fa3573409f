"""The CPUs this process may run on, as it started.

A FUSE io_uring queue's thread pins itself to its CPU (zblock.fuse.uring), and on Linux a thread
inherits its creator's CPU mask: a worker started from a request (readahead, a new pool's
helpers, the simulated engine, fsync's flush helper) would stay on that one CPU. Such workers
call unpin() first.
"""

from __future__ import annotations

import os

ALLOWED = frozenset(os.sched_getaffinity(0))


def unpin() -> None:
    """Let the calling thread run on every CPU the process started with."""
    try:
        if os.sched_getaffinity(0) != ALLOWED:
            os.sched_setaffinity(0, ALLOWED)
    except OSError:
        pass                                # a CPU taken away since: the mask it has will do
