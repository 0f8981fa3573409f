"""Dedup (`dedup`, fixed at mount): COMP and RAW pages of equal content in one pool hold the one
same bytes object.

Each pool indexes its objects (`Pool.objects`, every object it holds mapped to itself) and
counts the sharers of objects held by more than one page (`Pool.sharers`). The key is the object
itself: the dict hashes it (CPython's keyed SipHash, cached in the bytes object) and compares the
bytes in full on a hash match, so pages share only equal objects, and an equal object in one
pool decompresses to an equal page. Identical pages compress to identical objects within a pool
(one algorithm and level), so hashing the compressed object finds them at a fraction of the
page's bytes. A sharer that goes (overwrite, discard, writeback, far tier, recompression) drops
one reference: copy-on-write needs nothing more, since a store always installs a new object and
objects are never changed in place.

Invariants (with the entry table's, zblock.entries): each pool's `objects` holds exactly the
distinct objects of its COMP and RAW entries, and `sharers` the number of entries holding each
object held by more than one; the table's dedup_pages counts the entries beyond the first of
each object and dedup_saved_bytes their charge (what pool_total_size would hold more without
sharing).

Lock protocol: the cache's tree lock for every call but prepare(), which needs none.
"""

from __future__ import annotations

import collections

from .pool import Pool, charge
from .scan import COMP, RAW, Scan


class DedupIndex:
    """The sharing of one entry table's objects (zblock.entries calls it on install and free)."""

    def __init__(self, table):
        self.table = table

    def share(self, pool: Pool, obj: bytes) -> bytes:
        """The object a new entry of `pool` holds for `obj`: an equal object the pool holds
        already (one more sharer: counted, not charged again), or `obj` itself, indexed."""
        held = pool.objects.setdefault(obj, obj)
        if held is not obj:
            pool.sharers[held] = pool.sharers.get(held, 1) + 1
            self.table.dedup_pages += 1
            self.table.dedup_saved_bytes += charge(len(held))
        return held

    def unshare(self, pool: Pool, obj: bytes) -> bool:
        """An entry of `pool` no longer holds `obj`. True if other entries still do (its memory
        stays); False if it was the last, and the object leaves the index."""
        n = pool.sharers.get(obj)
        if n is None:
            del pool.objects[obj]
            return False
        if n == 2:
            del pool.sharers[obj]
        else:
            pool.sharers[obj] = n - 1
        self.table.dedup_pages -= 1
        self.table.dedup_saved_bytes -= charge(len(obj))
        return True

    def whole_shares(self, pages: list) -> list[bool]:
        """Per page of `pages`: it is not cached, or its object is its own, or every entry
        sharing it is among `pages`. Recompression moves a shared object only with all its
        sharers: one that left alone would add its new object to the pool and save nothing."""
        table = self.table
        objs = {p: table.obj(p) for p in pages if table.state[p] in (COMP, RAW)}
        among = collections.Counter(map(id, objs.values()))
        pools = table.registry.pools
        return [p not in objs or
                pools[table.pool_id[p]].sharers.get(objs[p], 1) == among[id(objs[p])]
                for p in pages]

    @staticmethod
    def prepare(scan: Scan) -> None:
        """Without the tree lock: hash the scan's objects now (a bytes object keeps its hash),
        so that an install under the lock only looks them up."""
        for o in scan.objs:
            if o is not None:
                hash(o)
