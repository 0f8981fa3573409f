"""LRU with second chance over the entry table: which cached pages to write back next.

Entries carry an LRU stamp (the store's sequence number) and a `referenced` bit, like zswap's
LRU and its `referenced` flag: a referenced page is passed over once (its bit cleared, its stamp
moved to the tail) before it can be written back. Two ways to pick:
    select_victims   zblock's `evict` policy: the bit is set by loads; as many victims as asked.
    walk_like_zswap  the `zswap` policy: the bit is set by stores, as in zswap_store(), and the
                     walk is shrink_worker's (mm/zswap.c, 6.18): shrink_memcg() looks at one
                     entry a call, and the worker gives up at the MAX_RECLAIM_RETRIES-th call
                     that wrote nothing back.

Both walk the LRU from its cold end through a snapshot of the coldest pages in stamp order
(`LruSnapshot`, kept on the table): an entry of it is used only while the page is still cached,
not under writeback, and has the stamp it had at the snapshot. Pages stored later are warmer
than every page in it, so it stays the LRU's cold end until it runs out; then the next one is
taken. Sorting a whole large cache on every writeback batch cost more than the writes.

Not here: the writeback itself (zblock.writeback). Caller holds the cache's tree lock.
"""

from __future__ import annotations

from array import array

from . import vec
from .entries import EntryTable
from .scan import COMP, RAW

MAX_RECLAIM_RETRIES = 16        # failed shrink_memcg() calls before shrink_worker() gives up
SNAPSHOT_PAGES = 1 << 16        # pages a snapshot takes at least: 1 MiB of arrays
SAMPLE = 1024                   # pages whose stamps estimate where the cold end stops


class LruSnapshot:
    """The coldest cached pages at one moment, coldest first, with their stamps then; `at` is
    where the walk stands (every entry before it has left the LRU for good)."""

    def __init__(self, pages: list[int], stamps: list[int]):
        self.pages = array("q", pages)
        self.stamps = array("q", stamps)
        self.at = 0


def _gone(table: EntryTable, page: int, stamp: int) -> bool:
    """The entry left the LRU for good: freed, written back, stored again or rotated."""
    return table.stamp[page] != stamp or table.state[page] not in (COMP, RAW)


def _take_snapshot(table: EntryTable, k: int) -> LruSnapshot:
    """The max(k, SNAPSHOT_PAGES) coldest cached pages (under writeback too: one whose write
    does not happen is on the LRU again, at its place)."""
    pages = coldest_where(table, table.cached, max(k, SNAPSHOT_PAGES))
    table.lru_snapshot = LruSnapshot(pages, vec.gather(table.stamp, pages))
    return table.lru_snapshot


def coldest_where(table: EntryTable, pred, k: int) -> list[int]:
    """The k pages (fewer if there are fewer) where pred(span), a 0/1 mask as for table.find,
    with the lowest stamps, coldest first (ties in page order). In a large set only the pages
    below a stamp estimated from a sample are listed and sorted: sorting a million in Python
    took 0.5 s. Stamps stay below 2**63 (mask_below)."""
    spans = list(table.spans())
    total = sum(s.stop - s.start for s in spans)
    step = max(total // (SAMPLE * 16), 1)     # enough probes for SAMPLE hits at 1/16 of pages
    n, stamps = 0, []
    for s in spans:                         # count them, and sample their stamps
        mask = pred(s)
        n += mask.count(1)
        stamps += vec.gather(table.stamp, [s.start + i * step for i in vec.positions(mask[::step])])
    pages = None
    if n > 2 * k and stamps:
        stamps.sort()
        limit = stamps[min(int(2 * k / n * len(stamps)), len(stamps) - 1)] + 1
        pages = table.find(lambda s: vec.mask_and(
            pred(s), vec.mask_below(table.stamp, s.start, s.stop, limit)))
        if len(pages) < k:                  # the sample put it too low
            pages = None
    if pages is None:
        pages = table.find(pred)
    pages.sort(key=table.stamp.__getitem__)
    del pages[k:]
    return pages


def coldest(table: EntryTable, k: int) -> list[int]:
    """Up to k pages from the LRU's cold end (cached, not under writeback), coldest first; fewer
    only if the LRU holds fewer."""
    snap = table.lru_snapshot
    under_wb = table.under_wb
    for fresh in (snap is None, True):
        if fresh:
            snap = _take_snapshot(table, k)
        pages, stamps = snap.pages, snap.stamps
        while snap.at < len(pages) and _gone(table, pages[snap.at], stamps[snap.at]):
            snap.at += 1
        found = []
        for i in range(snap.at, len(pages)):
            p = pages[i]
            if not under_wb[p] and not _gone(table, p, stamps[i]):
                found.append(p)
                if len(found) == k:
                    return found
        if fresh:
            break                           # as many as the LRU holds
    return found


def select_victims(table: EntryTable, want: int) -> tuple[list[int], list[int]]:
    """The `want` coldest cached pages not read since they were stored, marked under writeback;
    referenced pages colder than them get their second chance in the same pass. Returns
    (pages in ascending order, their generations).

    One pass in stamp order over the coldest k candidates (k grows until enough unreferenced
    ones are found): rotating referenced pages one scan at a time held the tree lock for over a
    minute with half a million referenced pages."""
    referenced = table.referenced
    k = max(4 * want, 1024)
    while True:
        cand = coldest(table, k)
        ref = vec.gather(referenced, cand)
        unreferenced = len(cand) - sum(ref)
        if unreferenced >= want or len(cand) < k:
            break
        k *= 4
    if not cand:
        return [], []
    if not unreferenced:                    # all referenced: each has had its chance now
        vec.scatter(referenced, cand, 0)
        victims = cand[:want]
    else:
        victims, second = [], []
        colder = 0                          # referenced pages colder than the last victim
        for p, r in zip(cand, ref):
            if r:
                second.append(p)
            else:
                victims.append(p)
                colder = len(second)
                if len(victims) == want:
                    break
        del second[colder:]
        if second:
            vec.scatter(referenced, second, 0)
            vec.scatter(table.stamp, second, table.seq)
            table.seq += 1
    victims.sort()
    vec.scatter(table.under_wb, victims, 1)
    return victims, vec.gather(table.gen, victims)


def walk_like_zswap(table: EntryTable, want: int, retries: int) -> tuple[list[int], list[int], int]:
    """shrink_worker()'s walk from the cold end, one entry per shrink_memcg() call: a referenced
    entry is rotated to the tail with its bit cleared (shrink_memcg_cb's LRU_ROTATE) and counts
    as a failure, an unreferenced one becomes a victim. Stops at `want` victims or at the
    `retries`-th failure. Returns (victims in ascending order, marked under writeback; their
    generations; failures)."""
    # the walk ends within want + retries entries: each is a victim or a failure
    cand = coldest(table, want + retries)
    victims, rotated = [], []
    for p in cand:
        if table.referenced[p]:
            rotated.append(p)
            if len(rotated) >= retries:
                break
        else:
            victims.append(p)
            if len(victims) >= want:
                break
    if rotated:
        vec.scatter(table.referenced, rotated, 0)
        vec.put(table.stamp, rotated, range(table.seq, table.seq + len(rotated)))
        table.seq += len(rotated)
    victims.sort()
    vec.scatter(table.under_wb, victims, 1)
    return victims, vec.gather(table.gen, victims), len(rotated)
