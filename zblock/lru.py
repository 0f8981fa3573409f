"""LRU with second chance over the entry table: which cached pages to write back next.

Entries carry an LRU stamp (the store's sequence number) and a `referenced` bit, like zswap's
LRU and its `referenced` flag: a referenced page is passed over once (its bit cleared, its stamp
moved to the tail) before it can be written back. Two ways to pick:
    select_victims   zblock's `evict` policy: the bit is set by loads; as many victims as asked.
    walk_like_zswap  the `zswap` policy: the bit is set by stores, as in zswap_store(), and the
                     walk is shrink_worker's (mm/zswap.c, 6.18): shrink_memcg() looks at one
                     entry a call, and the worker gives up at the MAX_RECLAIM_RETRIES-th call
                     that wrote nothing back.

Not here: the writeback itself (zblock.writeback). Caller holds the cache's tree lock.
"""

from __future__ import annotations

import numpy as np

from .entries import EntryTable

MAX_RECLAIM_RETRIES = 16        # failed shrink_memcg() calls before shrink_worker() gives up


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


def walk_like_zswap(table: EntryTable, want: int, retries: int) -> tuple[np.ndarray, np.ndarray, int]:
    """shrink_worker()'s walk from the cold end, one entry per shrink_memcg() call: a referenced
    entry is rotated to the tail with its bit cleared (shrink_memcg_cb's LRU_ROTATE) and counts
    as a failure, an unreferenced one becomes a victim. Stops at `want` victims or at the
    `retries`-th failure. Returns (victims in ascending order, marked under writeback; their
    generations; failures)."""
    lru = table.find(lambda s: table.cached(s) & ~table.under_wb[s])
    if not len(lru):
        return lru, lru, 0
    stamp, referenced = table.stamp, table.referenced
    # the walk ends within want + retries entries: each is a victim or a failure
    k = min(len(lru), want + retries)
    cand = lru if k >= len(lru) else lru[np.argpartition(stamp[lru], k - 1)[:k]]
    cand = cand[np.argsort(stamp[cand], kind="stable")]
    ref = referenced[cand]
    failures = np.cumsum(ref)
    done = np.flatnonzero((np.cumsum(~ref) >= want) | (failures >= retries))
    last = int(done[0]) if len(done) else len(cand) - 1
    walked, ref = cand[:last + 1], ref[:last + 1]
    victims, rotated = np.sort(walked[~ref]), walked[ref]
    if len(rotated):
        referenced[rotated] = False
        stamp[rotated] = np.arange(table.seq, table.seq + len(rotated))
        table.seq += len(rotated)
    table.under_wb[victims] = True
    return victims, table.gen[victims].copy(), int(failures[last])
