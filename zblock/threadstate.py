"""Python thread states for libfuse's worker threads, kept instead of made per request.

libfuse calls the FUSE callbacks from threads Python did not start. A ctypes callback on such a
thread runs between PyGILState_Ensure and PyGILState_Release; when Ensure had to create the
thread state, Release destroys it again. So every request created and destroyed a thread state,
and in Python 3.11 a new thread state also maps its first frame-stack chunk: one mmap, one
munmap (with a TLB shoot-down on every other core) and a gettid per request. Measured with
`strace -c -f` on a mount under fio 4 KiB random reads: exactly one mmap/munmap/gettid per
request; `perf` put 10% of the server's CPU in smp_call_function_many_cond.

pin_thread_state() takes one more PyGILState_Ensure on the calling thread the first time it
runs there and never releases it: the thread keeps its state, and ctypes' Ensure/Release pair
per callback only takes and drops the GIL. A worker that libfuse ends (libfuse 2 ends workers
while more than 10 are idle) leaves its thread state allocated until the interpreter ends; under
4 KiB fio load the libfuse 3 server kept its 10 workers throughout (/proc/PID/task).
"""

from __future__ import annotations

import ctypes
import threading

_pinned = threading.local()     # lives in the thread state, so it is lost exactly when that is


def pin_thread_state() -> None:
    """Keep the calling thread's Python thread state for the life of the thread. Cheap after
    the first call on a thread (one thread-local lookup)."""
    if not getattr(_pinned, "done", False):
        ctypes.pythonapi.PyGILState_Ensure()
        _pinned.done = True
