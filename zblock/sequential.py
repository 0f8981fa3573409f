"""Sequential cutoff (bcache's `sequential_cutoff`): once a run of writes to consecutive pages
passes `sequential_cutoff` bytes, the rest of it goes to the backing file uncompressed (sealed
with --encrypt), not into the pool.

Why: a bulk load (an image restored with dd, a backup written once) fills the pool with pages
nobody reads soon, pushing out the ones that are, and compressing it costs more CPU than writing
it to the disk does. Durable `dd conv=fsync` through the pool is CPU-bound at a fraction of the
disk's speed (docs/performance.md).

A stream is found as bcache finds one: a store that starts on the page where a recent one ended
continues it, so interleaved streams are told apart. The last STREAMS streams are remembered; the
oldest is forgotten first. The write-behind queue's two workers may store two consecutive
requests the other way round: a store that ends where a stream starts joins it too.

Only stores of whole pages at consecutive page numbers are seen (Cache.store_pages with a first
page): requests and their parts, and a 4 KiB write stored on its own. The write-behind queue
stores 4 KiB writes that arrive together as one batch of page numbers, which is not seen, so a
stream of 4 KiB writes is counted only in part. Persistent mode only: swap pages are written
once and read back soon, what the pool is for.

Lock protocol: `_lock` guards `_streams`; it is a leaf (nothing else is taken under it).
"""

from __future__ import annotations

import collections
import threading

from . import PAGE_SHIFT

STREAMS = 16


class SequentialCutoff:
    """Which stores bypass the pool: those that carry a stream of consecutive pages past the
    cutoff. `config.sequential_cutoff` is read on every call (a param: 0 turns it off)."""

    def __init__(self, config):
        self.config = config
        # end page -> (first page, pages stored): first page is where it started
        self._streams: collections.OrderedDict[int, tuple[int, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def bypass(self, first: int, n: int) -> bool:
        """Note a store of pages first .. first+n; True if it goes to disk, not into the pool."""
        cutoff = self.config.sequential_cutoff
        if not cutoff:
            return False
        with self._lock:
            streams = self._streams
            start, pages = streams.pop(first, (first, 0))
            pages += n
            end = first + n
            for later_end, (later_start, later_pages) in streams.items():
                if later_start == end:          # its next store, stored first
                    del streams[later_end]
                    end, pages = later_end, pages + later_pages
                    break
            streams.pop(end, None)              # another stream ends there: this one is newer
            streams[end] = (start, pages)
            if len(streams) > STREAMS:
                streams.popitem(last=False)
        return pages << PAGE_SHIFT > cutoff
