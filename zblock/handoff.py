"""A thread answering a request says so before it waits, so that the front end can let another
worker read the next requests meanwhile.

The native FUSE front end has one worker at a time reading the device while requests are
answered from memory (zblock.fuse.readers: that worker spins for its next request, and a second
one asleep on the device would be woken by the kernel for every request the first one takes). A
worker that waits on the disk or the network while it answers would hold up every request
behind it, so the layers below call blocking() just before such a wait, and the parked workers
go and read the device too. Waits on other threads' CPU work (a full write-behind queue) do not
call it: more readers would only compete for the same cores.

Threads that answer no requests (write-behind, writeback, the mfusepy front end's) have no hook:
blocking() costs them a thread-local lookup.
"""

from __future__ import annotations

import threading
from typing import Callable

_local = threading.local()


def set_hook(hook: Callable[[], None] | None) -> None:
    """What blocking() calls on this thread (None: nothing): the front end's, for its workers."""
    _local.hook = hook


def blocking() -> None:
    """The calling thread is about to wait on disk or network I/O."""
    hook = getattr(_local, "hook", None)
    if hook is not None:
        hook()
