"""Loads of pages that live on the backing file, one read a run, with readahead along
sequential runs (the kernel's swap readahead, done in the server).

Swap-in asks for clusters of 8 pages one after another, and an O_DIRECT read costs nearly as
much for 8 pages as for 64 (docs/performance.md). So when a load that needs the disk starts
where one of the last STREAMS such loads ended, its last run of on-disk pages, if it reaches the
load's end, is read as a window of WINDOW pages (as far as they are on disk), and the pages after
the load are kept for the loads that follow. Random loads never start where another ended, so
they read only what they ask for.

Kept pages are served only while their entries are those they were read with: each is kept
with its generation, taken under its page lock in the same hold as the read (every write of
the file holds the page locks, and every change of an entry changes its generation), and
compared again under the page locks and the tree lock before use. Promotion counts a kept page
when it is served, not when it is read ahead.

Bounded: at most STREAMS windows of at most WINDOW pages are kept, the oldest dropped first.
A discard drops the windows it touches (their bytes are plaintext, even with --encrypt).

A failure in the pages read ahead is not the load's: Backing.read_pages returns the pages
before it, and neither raises nor counts it.

Lock protocol: a run is read under its page locks (one hold, ascending stripes; a widened one
never wraps past the last stripe: a read-modify-write loads its page with that stripe held), the
tree lock taken inside for the states and generations. `_lock` guards `_kept`, `_ends` and the
counters; it is a leaf (nothing is taken while it is held).
"""

from __future__ import annotations

import collections
import threading

from . import PAGE_SIZE, handoff
from .entries import DISK

WINDOW = 64         # pages a widened read asks for (256 KiB)
STREAMS = 4         # sequential readers told apart, and windows kept


class DiskReader:
    """`load(start, disk, parts)` for Cache.load_pages, `read(first, count)` for one run."""

    def __init__(self, cache, window: int = WINDOW, streams: int = STREAMS):
        self._cache = cache
        self._window = window
        self._lock = threading.Lock()
        # first page of a window -> (generations of its pages, their bytes)
        self._kept: collections.OrderedDict[int, tuple[list[int], memoryview]] = \
            collections.OrderedDict()
        self._streams = streams
        self._ends: collections.deque[int] = collections.deque(maxlen=streams)
        self.readahead_pages = 0        # pages read ahead of a request
        self.readahead_hits = 0         # pages served from them (one served twice counts twice)

    def load(self, start: int, n: int, disk: list[int], parts: list) -> None:
        """Fill parts[i] for the on-disk pages at indices `disk` (ascending) of a load of pages
        start .. start+n: one read a run of consecutive pages, the last run widened if the load
        continues an earlier one. A page cached again or discarded since the caller looked is
        loaded as it is now."""
        runs, first = [], disk[0]
        for prev, i in zip(disk, disk[1:]):
            if i != prev + 1:
                runs.append((first, prev + 1))
                first = i
        runs.append((first, disk[-1] + 1))
        widen = self.continues(start, n) and runs[-1][1] == n
        for a, b in runs:
            data = self.read(start + a, b - a, widen and b == n)
            if data is None:
                data = self._cache.load_pages(start + a, b - a)
            mv = memoryview(data)
            for k in range(b - a):
                parts[a + k] = mv[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]

    def continues(self, start: int, n: int) -> bool:
        """Note a load of pages start .. start+n that reads from disk: True if it starts where
        one of the last STREAMS such loads ended."""
        self._lock.acquire()        # not `with`: on every 4 KiB read of a page on disk
        try:
            sequential = start in self._ends
            if sequential:
                self._ends.remove(start)
            self._ends.append(start + n)
            return sequential
        finally:
            self._lock.release()

    def read(self, first: int, count: int, widen: bool = False):
        """The bytes of pages first .. first+count (bytes, or a memoryview of a window), or None
        if one of them is no longer on disk. `widen`: read up to a window ahead and keep it."""
        cache, table = self._cache, self._cache.table
        span = self._span(first, count) if widen else count
        with cache.page_locks.hold_range(first, span):
            cache.tree_lock.acquire()   # not `with`, and no generator: a 4 KiB read's path
            try:
                states = table.state[first:first + span].tolist()
                if states[:count].count(DISK) != count:
                    return None
                gens = table.gen[first:first + span].tolist()
            finally:
                cache.tree_lock.release()
            data = self._take(first, gens[:count])
            if data is None:
                ahead = count
                while ahead < span and states[ahead] == DISK:
                    ahead += 1
                handoff.blocking()
                data = cache.backing.read_pages(first, count, ahead - count)
                got = len(data) // PAGE_SIZE    # fewer than `ahead` if one ahead failed
                if got > count:
                    data = memoryview(data)
                    self._keep(first + count, gens[count:got], data[count * PAGE_SIZE:])
                    data = data[:count * PAGE_SIZE]
            cache.promotion.disk_reads(first, gens[:count], data)
        return bytes(data) if count == 1 and type(data) is not bytes else data

    def counters(self) -> dict:
        with self._lock:
            return {"bd_readahead_pages": self.readahead_pages,
                    "bd_readahead_hits": self.readahead_hits}

    def _span(self, first: int, count: int) -> int:
        """How many pages from `first` a widened read locks and reads: `count` if it is a
        window's size already or kept, else a window that ends before the page locks' stripes
        wrap around (a read-modify-write holds the stripe of `first` already, and a nested hold
        may only add higher stripes)."""
        if count >= self._window:
            return count
        with self._lock:
            if self._find(first, count) is not None:
                return count
        return max(count, min(self._window, self._cache.npages - first,
                              self._cache.page_locks.pages_before_wrap(first)))

    def _find(self, first: int, count: int):
        """(window start, its entry) of a kept window holding pages first .. first+count."""
        for start, entry in self._kept.items():
            if start <= first and first + count <= start + len(entry[0]):
                return start, entry
        return None

    def _take(self, first: int, gens: list[int]):
        """Kept bytes of pages first .. first+len(gens) if their generations are `gens`."""
        if not self._kept:      # random reads keep nothing; a window kept meanwhile is missed,
            return None         # which costs a read, not a wrong answer
        with self._lock:
            found = self._find(first, len(gens))
            if found is None:
                return None
            start, (kept_gens, data) = found
            off = first - start
            if kept_gens[off:off + len(gens)] != gens:
                del self._kept[start]       # changed since it was read: drop the window
                return None
            if off + len(gens) == len(kept_gens):
                del self._kept[start]       # its last pages: the reader has moved on
            self.readahead_hits += len(gens)
            return data[off * PAGE_SIZE:(off + len(gens)) * PAGE_SIZE]

    def forget(self, start: int, n: int) -> None:
        """Drop the windows holding any of pages start .. start+n (discarded)."""
        with self._lock:
            for first in [f for f, (gens, _) in self._kept.items()
                          if f < start + n and start < f + len(gens)]:
                del self._kept[first]

    def _keep(self, first: int, gens: list[int], data: memoryview) -> None:
        with self._lock:
            self._kept.pop(first, None)
            self._kept[first] = (gens, data)
            while len(self._kept) > self._streams:
                self._kept.popitem(last=False)
            self.readahead_pages += len(gens)
