"""Compressed pools: one per (compressor, level, backend), with honest memory accounting.

A pool is zswap's `struct zswap_pool`: the algorithm, its bounded set of acomp contexts, and the
objects stored with it. Objects are Python `bytes` held by the cache's entry table; the pool only
accounts for them (and with dedup indexes them: `objects` and `sharers`, kept by
zblock.entries). `charge(length)` is what one object really costs the process: the bytes
object's header (33 bytes) plus malloc's chunk header and 16-byte rounding (glibc). Measured in
tests/test_cache.py: pool_total_size stays within 10% of the process's RSS growth.

Memory goes back to the system when objects are freed: glibc keeps freed chunks in its arenas, so
after a large free `trim()` asks malloc to return whole free pages (malloc_trim), rate-limited.

Lifetime (zswap's pool find-get): the current pool has one ref for being current plus one per
entry; switching A -> B -> A while A still has entries makes A current again. A pool whose last
ref goes is closed (contexts freed); a store or load at work with the pool holds it (`holds`).
Counters are guarded by the cache's tree lock; `holds` is a deque so that giving a hold back is one
atomic pop, without the tree lock (see zblock.pools), and without the realloc that a list's pop
from 1 to 0 items makes.
"""

from __future__ import annotations

import collections
import threading
import time

from . import PAGE_SIZE
from .acomp import ContextSet
from .libc import libc as _libc

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
        self.far_pages = 0         # entries whose object is in the far tier (decompressed here)
        # dedup (zblock.entries): every object held, mapped to itself, and the number of
        # entries holding each object held by more than one
        self.objects: dict[bytes, bytes] = {}
        self.sharers: dict[bytes, int] = {}
        self.holds = collections.deque()    # one item per store or load at work with it, unlocked
        self.current = True

    @property
    def label(self) -> str:
        """`zstd-3`, `lzo@sim`: the algorithm and accelerator (see labels() for the stats)."""
        name, level, accel = self.key[:3]
        label = name if level is None else f"{name}-{level}"
        return label if accel == "none" else f"{label}@{accel}"

    @property
    def refs(self) -> int:
        return self.stored_pages + self.far_pages + len(self.holds) + (1 if self.current else 0)

    @property
    def users(self) -> int:
        return len(self.holds)

    def close(self) -> None:
        self.contexts.close()


def labels(pools: list[Pool]) -> list[str]:
    """The pools' names in the stats: each its label, with `#id` where two live pools share one
    (engine pools that differ only in hw_* settings: `lzo@sim#0`, `lzo@sim#1`)."""
    counts = collections.Counter(p.label for p in pools)
    return [p.label if counts[p.label] == 1 else f"{p.label}#{p.id}" for p in pools]


# ---------------------------------------------------------------------------------------------
# giving memory back

_malloc_trim = getattr(_libc, "malloc_trim", None)
_mallopt = getattr(_libc, "mallopt", None)
M_TRIM_THRESHOLD = -1             # malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 4 << 20          # above the 1 MiB request buffers
TRIM_THRESHOLD = 64 << 20         # free heap kept before free() itself gives it back
ARENA_MAX = 1


def tune_malloc() -> None:
    """glibc settings for the server, before it starts threads.

    A fixed mmap threshold above the request size: glibc otherwise raises it towards 32 MiB as
    big buffers are freed, and those buffers then sit between pool objects in the heap.

    One arena for every thread: one per thread would give each of libfuse's up to 10 workers a
    heap of its own with a freed 1 MiB request buffer in it, and even one per CPU keeps what a
    second arena once held resident, since malloc_trim gives back the free top of the main arena
    only and free() trims another arena's top only above the trim threshold (in-process, the
    256 MiB /usr tar written and read back from 4 threads: RSS growth 167.9 MiB with an arena
    per CPU, 164.9 with one). The one arena's lock is rarely contended: Python allocates under
    the GIL, and glibc's per-thread caches serve small blocks without it.

    Fixing the mmap threshold also freezes the trim threshold at 128 KiB, so free() would give
    back (and the next request fault in again) every 1 MiB read buffer; a high trim threshold
    keeps them, and the Trimmer's malloc_trim(0) still gives freed pool memory back.
    """
    if _mallopt is None:
        return
    _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _mallopt(M_ARENA_MAX, ARENA_MAX)


class Trimmer:
    """Decides when to call malloc_trim(0): when the pool has shrunk by `threshold` bytes from its
    peak since the last trim, or when asked (request(): free heap outside the pool, such as
    request buffers after a burst of writes); at most every `min_interval` seconds. Not on frees
    alone: while pages are overwritten the pool frees as much as it allocates, and a trim would
    only give back memory the next stores fault in again. The cache's writeback
    worker does the trimming, outside every lock: malloc_trim walks every arena (about 1 ms for
    a few hundred MiB of heap), too slow for the tree lock or a request path.

    `idle` (default mode): also trim once the cache's activity count (stores, loads, discards)
    has stood still for that many seconds after moving since the last trim. Nothing else trims
    after reads: each 1 MiB read leaves freed reply buffers (libfuse's, the reply's bytes, the
    readahead windows) in malloc's free lists, resident until a trim, and a quiet store has
    no use for them. One trim per pause costs about a millisecond.

    `quiet` (swap mode): trim only once the cache's activity count has not moved for that many
    seconds, or `max_wait` seconds after the last trim. A swap-mode trim unlocks and relocks the
    whole server (tens of ms with mmap_lock held for writing: every thread's page faults wait),
    and in a swap storm the memory it gives back is allocated and faulted in again at once;
    unlocking while the kernel is swapping hard is also exactly when a page of ours could be
    reclaimed.
    """

    def __init__(self, threshold: int = 8 << 20, min_interval: float = 0.2, release=None,
                 quiet: float = 0.0, max_wait: float = 30.0, idle: float = 0.0,
                 clock=time.monotonic):
        self.threshold = threshold
        self.min_interval = min_interval
        self.idle = idle
        # swap mode: memory is locked (mlockall), so plain malloc_trim cannot free it;
        # `release` (swap.release_free_memory) unlocks, trims and locks again
        self.release = release
        self.quiet = quiet
        self.max_wait = max_wait
        self._clock = clock
        self._freed = 0
        self._requested = False
        self._peak = 0                  # pool size high-water mark since the last trim
        self._last = clock()
        self._activity = None
        self._active_at = self._last
        self._lock = threading.Lock()

    def freed(self, nbytes: int) -> bool:
        """Count freed bytes (approximate under races); True when the worker should look: the
        pool may have shrunk by `threshold`."""
        self._freed += nbytes
        return self._freed >= self.threshold

    def request(self) -> None:
        """Ask for a trim at the next chance the interval allows."""
        self._requested = True

    def trim(self, force: bool = False, activity: int | None = None, pool_size: int = 0) -> None:
        """Trim if one is due (see the class); `force` trims now. `activity`: a count that
        moves with the cache's work, for `quiet`; `pool_size`: the pool's bytes now."""
        now = self._clock()
        if activity is not None and activity != self._activity:
            self._activity = activity
            self._active_at = now
        self._peak = max(self._peak, pool_size)
        self._freed = 0                 # looked: freed() wakes the worker again only after more
        if not force:
            # idle: activity seen since the last trim (a trim's own clock reading is never
            # later than the activity noticed after it), then none for `idle` seconds
            idle = self.idle and self._active_at > self._last and now - self._active_at >= self.idle
            if not (self._requested or idle or self._peak - pool_size >= self.threshold):
                return
            if now - self._last < self.min_interval:
                return
            if self.quiet and now - self._active_at < self.quiet and \
                    now - self._last < self.max_wait:
                return
        if not self._lock.acquire(blocking=force):    # forced: wait for a trim in progress
            return
        try:
            self._requested = False
            self._peak = pool_size
            self._last = now
            if self.release is not None:
                self.release()
            elif _malloc_trim is not None:
                _malloc_trim(0)
        finally:
            self._lock.release()
