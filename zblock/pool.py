"""Compressed pools: one per (compressor, level, backend), with honest memory accounting.

A pool is zswap's `struct zswap_pool`: the algorithm, its bounded set of acomp contexts, and the
objects stored with it. Objects are Python `bytes` held by the cache's entry table; the pool only
accounts for them. `charge(length)` is what one object really costs the process: the bytes
object's header (33 bytes) plus malloc's chunk header and 16-byte rounding (glibc). Measured in
tests/test_cache.py: pool_total_size stays within 10% of the process's RSS growth.

Memory goes back to the system when objects are freed: glibc keeps freed chunks in its arenas, so
after a large free `trim()` asks malloc to return whole free pages (malloc_trim), rate-limited.

Lifetime (zswap's pool find-get): the current pool has one ref for being current plus one per
entry; switching A -> B -> A while A still has entries makes A current again. A pool whose last
ref goes is closed (contexts freed); a store in progress holds a `users` ref. Pools are guarded by the cache's tree lock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

from . import PAGE_SIZE
from .acomp import ContextSet

BYTES_HEADER = 33          # sys.getsizeof(b"") on 64-bit CPython
MALLOC_OVERHEAD = 8        # glibc chunk header on 64-bit


def charge(length: int) -> int:
    """Bytes one stored object of `length` costs: bytes header + malloc chunk, 16-byte aligned."""
    return (length + BYTES_HEADER + MALLOC_OVERHEAD + 15) & ~15


RAW_CHARGE = charge(PAGE_SIZE)


class Pool:
    """Compressed objects of one algorithm. Counters are guarded by the cache's tree lock."""

    def __init__(self, pool_id: int, key: tuple, contexts: ContextSet):
        self.id = pool_id
        self.key = key
        self.contexts = contexts
        self.stored_pages = 0      # entries that point at this pool (compressed + raw)
        self.total_size = 0        # charge() of every object held
        self.users = 0             # stores compressing with it right now
        self.current = True

    @property
    def label(self) -> str:
        name, level, accel = self.key[0], self.key[1], self.key[2]
        label = name if level is None else f"{name}-{level}"
        return label if accel == "none" else f"{label}@{accel}"

    @property
    def refs(self) -> int:
        return self.stored_pages + self.users + (1 if self.current else 0)

    def close(self) -> None:
        self.contexts.close()


# ---------------------------------------------------------------------------------------------
# giving memory back

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_malloc_trim = getattr(_libc, "malloc_trim", None)


class Trimmer:
    """Calls malloc_trim(0) after enough bytes were freed, at most every `min_interval` seconds.

    malloc_trim walks every arena (libfuse's worker threads each get one); at ~1 ms for a few
    hundred MiB of heap it is too slow per page but cheap per freed megabyte.
    """

    def __init__(self, threshold: int = 8 << 20, min_interval: float = 0.2, release=None):
        self.threshold = threshold
        self.min_interval = min_interval
        # swap mode: memory is locked (mlockall), so plain malloc_trim cannot free it;
        # `release` (swap.release_free_memory) unlocks, trims and locks again
        self.release = release
        self._freed = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def freed(self, nbytes: int) -> None:
        self._freed += nbytes          # approximate under races; only decides when to trim
        if self._freed >= self.threshold:
            self.trim()

    def trim(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._freed = 0
            self._last = now
            if self.release is not None:
                self.release()
            elif _malloc_trim is not None:
                _malloc_trim(0)
        finally:
            self._lock.release()
