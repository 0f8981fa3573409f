"""LRU with second chance over the entry table: which cached pages to write back next.

Entries carry an LRU stamp (the store's sequence number) and a `referenced` bit set by loads,
like zswap's LRU and its `referenced` flag: a page read since it was stored is passed over once
(its bit cleared, its stamp moved to the tail) before it can be written back.

Not here: the writeback itself (zblock.writeback). Caller holds the cache's tree lock.
"""

from __future__ import annotations

import numpy as np

from .entries import EntryTable


def select_victims(table: EntryTable, want: int) -> tuple[np.ndarray, np.ndarray]:
    """The `want` coldest cached pages not read since they were stored, marked under writeback;
    referenced pages colder than them get their second chance in the same pass. Returns
    (pages in ascending order, their generations).

    One pass in stamp order over the coldest k candidates (k grows until enough unreferenced
    ones are found): rotating referenced pages one scan at a time held the tree lock for over a
    minute with half a million referenced pages."""
    lru = table.find(lambda s: table.cached(s) & ~table.under_wb[s])
    if not len(lru):
        return lru, lru
    stamp, referenced = table.stamp, table.referenced
    k = min(len(lru), max(4 * want, 1024))
    while True:
        cand = lru if k >= len(lru) else lru[np.argpartition(stamp[lru], k - 1)[:k]]
        cand = cand[np.argsort(stamp[cand], kind="stable")]
        ref = referenced[cand]
        unref = np.flatnonzero(~ref)
        if len(unref) >= want or k >= len(lru):
            break
        k = min(len(lru), k * 4)
    if not len(unref):                      # all referenced: each has had its chance now
        referenced[cand] = False
        victims = cand[:want]
    else:
        cut = int(unref[min(want, len(unref)) - 1]) + 1
        victims = cand[:cut][~ref[:cut]]
        second = cand[:cut][ref[:cut]]
        if len(second):
            referenced[second] = False
            stamp[second] = table.seq
            table.seq += 1
    victims = np.sort(victims)
    table.under_wb[victims] = True
    return victims, table.gen[victims].copy()
