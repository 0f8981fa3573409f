"""The entry table: one slot per page of the disk (zswap's xarray of entries), and the only code
that installs, frees and accounts for entries.

Per page, in typed memoryviews (zblock.pagemem.array; zblock.vec works on them whole): state,
compressed length, pool id, fill word, dirty, referenced (second chance), under_wb (zram
ZRAM_UNDER_WB), LRU stamp, generation and last access time (zram's ac_time, in whole seconds:
zblock.accessclock; 0 marks the page idle); `objs` (ObjectSlots) holds the stored object of a
COMP or RAW page. Memory follows the pages in use: the kernel gives its arrays memory on first
write, `objs` is made of chunks created by the first store into them, and nothing writes the
entries of pages that hold nothing. Work that looks for entries (dirty, cached, under writeback)
looks only at `live` chunks, so it is in proportion to the parts of the disk in use, with
temporaries of at most SPAN pages.

Page states:
    NONE  never written or discarded: reads as zeros, nothing on disk
    SAME  same-filled page: a fill value, no pool memory, not on the LRU (zswap 4.14-6.9)
    COMP  compressed object in a pool, on the LRU
    RAW   incompressible page stored as-is in a pool, on the LRU (zswap 6.18)
    DISK  not cached: the backing file holds it; `fill` counts its reads (promotion)
`fill` of a COMP or RAW page is 0, or INCOMPRESSIBLE once recompression could not shrink it.
    FAR   its object is in the far tier (zblock.farpages) under version `fill`; `length` and
          `pool_id` stay, and the pool lives on while far pages use it (Pool.far_pages)
A cached or far page (SAME/COMP/RAW/FAR) is `dirty` until the backing file holds the same bytes
durably.

Dedup (`dedup`, fixed at mount): COMP and RAW pages of equal content in one pool hold one
bytes object (zblock.dedup: the index, the sharing counts, its invariants).

Invariants (each method keeps them; the caller holds the cache's tree lock for every call):
    * gen[p] changes whenever page p's bytes or its place in the file change (slow work
      re-validates against it); a move to the far tier keeps it (to_far);
    * a page has an object in `objs` exactly when it is COMP or RAW;
    * every SAME, COMP or RAW page lies in a chunk marked `live` (a live chunk may hold none);
    * pool_total_size == sum of charge(length) over the distinct objects of COMP and RAW
      entries (over the entries themselves without dedup) == sum of the pools' total_size;
      each pool's stored_pages counts its COMP and RAW entries;
    * with dedup, zblock.dedup's (the index, dedup_pages, dedup_saved_bytes);
    * compr_data_size == sum of length over COMP and RAW entries;
    * same_filled_pages and stored_incompressible_pages count SAME and RAW entries, disk_pages
      DISK ones;
    * far_pages counts FAR entries and far_bytes their values (far_value_size of each length);
      each pool's far_pages counts its FAR entries; every FAR page lies in a live chunk.

Not here: which pages to store or evict (zblock.cache, zblock.lru), the pools' lifetime
(zblock.pools: a pool that loses its last entry is handed to put_if_dead).
"""

from __future__ import annotations

import math
import sys
from array import array

from . import pagemem, vec
from .accessclock import AccessClock
from .dedup import DedupIndex
from .pool import Pool, charge
from .scan import COMP, NONE, RAW, SAME, Scan

DISK = 4
FAR = 5
NSTATES = FAR + 1
INCOMPRESSIBLE = 1          # `fill` of a cached page no secondary algorithm shrank (zram's flag)
FAR_HEADER = 24             # zblock.far.HEADER.size: a far value is the header and the object


def far_value_size(length, overhead: int = FAR_HEADER):
    """Bytes a far value of an object of `length` bytes takes, with `overhead` bytes besides
    the object (the header, and the seal of an encrypted one)."""
    return length + overhead


# ObjectSlots keeps chunks of OBJ_CHUNK slots, each None until a page in it is cached: one flat
# list cost 8 bytes a page up front (2 GiB for an empty 1 TiB disk).
OBJ_SHIFT = 12
OBJ_CHUNK = 1 << OBJ_SHIFT
OBJ_MASK = OBJ_CHUNK - 1
# Scans of the table (spans()) take at most this many pages at a time: their temporaries stay
# at a few MiB however large the disk.
SPAN = 1 << 20
_ONE_IS_DISK = bytes([NONE, DISK] + [NONE] * 254)     # translate() table: a 0/1 mask to states


class ObjectSlots:
    """The stored object of each page (None unless it is COMP or RAW), in chunks of OBJ_CHUNK
    slots that exist once an object went into them. Guarded by the cache's tree lock."""

    def __init__(self, npages: int):
        self.chunks: list[list | None] = [None] * ((npages + OBJ_MASK) >> OBJ_SHIFT)

    def get(self, page: int):
        chunk = self.chunks[page >> OBJ_SHIFT]
        return None if chunk is None else chunk[page & OBJ_MASK]

    def range(self, start: int, end: int) -> list:
        """A new list of the objects of pages start .. end."""
        c0, c1 = start >> OBJ_SHIFT, (end - 1) >> OBJ_SHIFT
        if c0 == c1:                        # a request within one chunk: nearly always
            chunk = self.chunks[c0]
            return [None] * (end - start) if chunk is None else \
                chunk[start & OBJ_MASK:(end - 1 & OBJ_MASK) + 1]
        return [self.get(p) for p in range(start, end)]

    def set(self, page: int, obj) -> None:
        chunk = self.chunks[page >> OBJ_SHIFT]
        if chunk is None:
            if obj is None:
                return
            chunk = self.chunks[page >> OBJ_SHIFT] = [None] * OBJ_CHUNK
        chunk[page & OBJ_MASK] = obj

    def set_run(self, first: int, objs: list | None, n: int) -> None:
        """The objects of pages first .. first+n: `objs`, or None for each (objs None), by one
        slice assignment per chunk. A chunk is not made for Nones only."""
        if objs is not None and len(objs) != n:    # a short list would shift the slots after it
            raise ValueError(f"set_run: {len(objs)} objects for {n} pages")
        page, end = first, first + n
        while page < end:
            c = page >> OBJ_SHIFT
            stop = min(end, (c + 1) << OBJ_SHIFT)
            part = None if objs is None else objs[page - first:stop - first]
            chunk = self.chunks[c]
            if chunk is None and part is not None and part.count(None) < len(part):
                chunk = self.chunks[c] = [None] * OBJ_CHUNK
            if chunk is not None:
                at = page & OBJ_MASK
                chunk[at:at + stop - page] = [None] * (stop - page) if part is None else part
            page = stop

    def drop(self, chunk: int) -> None:
        """Give back a chunk that holds no object."""
        self.chunks[chunk] = None

    def nbytes(self) -> int:
        """Memory of the slots: the list of chunks and the chunks that exist."""
        return sys.getsizeof(self.chunks) + sum(map(sys.getsizeof, filter(None, self.chunks)))


class EntryTable:
    """The entries of `npages` pages, and the gauges they add up to.

    A set of pages is a `range` (a run: whole-slice work) or a list of page numbers."""

    def __init__(self, npages: int, registry, on_disk=None, dedup: bool = False):
        self.npages = npages
        self.registry = registry            # zblock.pools.PoolRegistry: put_if_dead, pools
        self.dedup = DedupIndex(self) if dedup else None
        self.state = pagemem.array(npages, "B")
        self.length = pagemem.array(npages, "H")
        self.pool_id = pagemem.array(npages, "B")
        self.fill = pagemem.array(npages, "Q")
        self.dirty = pagemem.array(npages, "B")
        self.referenced = pagemem.array(npages, "B")
        self.under_wb = pagemem.array(npages, "B")
        self.stamp = pagemem.array(npages, "q")
        self.gen = pagemem.array(npages, "I")
        self.atime = pagemem.array(npages, "I")
        nchunks = (npages + OBJ_MASK) >> OBJ_SHIFT
        # per chunk of OBJ_CHUNK pages: set by the first install into it, cleared by a discard
        # that leaves it without entries
        self.live = pagemem.array(nchunks, "B")
        self.arrays = (self.state, self.length, self.pool_id, self.fill, self.dirty,
                       self.referenced, self.under_wb, self.stamp, self.gen, self.atime, self.live)
        self.disk_pages = 0
        if on_disk is not None:             # 0/1 per page: the backing file may hold it
            self._mark_on_disk(on_disk)
        self.objs = ObjectSlots(npages)
        self.obj, self.objs_range = self.objs.get, self.objs.range    # the objects' readers
        self.clock = AccessClock()          # `clock.tick`: the access time to record now
        self.seq = 1                        # next LRU stamp
        self.lru_snapshot = None            # zblock.lru's view of the LRU's cold end
        # zswap stores entries referenced (second chance before their first writeback); zblock's
        # `evict` policy sets the bit on loads only (Cache keeps this in step with the policy)
        self.referenced_on_store = False
        self.same_filled_pages = 0
        self.stored_incompressible_pages = 0
        self.pool_total_size = 0
        self.compr_data_size = 0
        self.mem_used_max = 0
        self.far_pages = 0
        self.far_bytes = 0
        self.dedup_pages = 0
        self.dedup_saved_bytes = 0
        self.far_overhead = FAR_HEADER      # bytes of a far value besides its object
        self.on_freed = None                # called with the bytes a free gave back (trimmer)
        self.on_far_freed = None            # called with (pages, versions) of far copies freed

    def _mark_on_disk(self, on_disk) -> None:
        """DISK for the pages whose byte of `on_disk` is 1, a SPAN at a time: the parts of the
        table with no such page are not written (they cost no memory)."""
        for lo in range(0, self.npages, SPAN):
            hi = min(lo + SPAN, self.npages)
            mask = bytes(on_disk[lo:hi])
            n = mask.count(1)
            if n:
                self.state[lo:hi] = mask.translate(_ONE_IS_DISK)
                self.disk_pages += n

    # ---- install and free -----------------------------------------------------------------

    def install(self, where, scan: Scan, pool: Pool) -> int:
        """A store's scanned pages into the table, replacing their old entries: at pages
        where, where+1 .. (an int) or at the pages in `where` (a list). Pages scanned NONE are
        left as they are (they go to disk). Returns how many went in."""
        states, lengths, fills, objs = scan.states, scan.lengths, scan.fills, scan.objs
        n = len(states)
        if not n:
            return 0
        # a run is written by slices; one page is cheaper as a list (no slice objects)
        pages = (range(where, where + n) if n > 1 else [where]) if type(where) is int else where
        if NONE in states:
            keep = [i for i in range(n) if states[i] != NONE]
            pages = [pages[i] for i in keep]
            states = bytes(states[i] for i in keep)
            lengths = array("H", [lengths[i] for i in keep])
            fills = array("Q", [fills[i] for i in keep])
            objs = [objs[i] for i in keep]
            n = len(keep)
            if not n:
                return 0
        self.free(pages)
        live = self.live
        if type(pages) is range:
            vec.fill(live, pages.start >> OBJ_SHIFT, ((pages.stop - 1) >> OBJ_SHIFT) + 1, 1)
        else:
            for c in {p >> OBJ_SHIFT for p in pages}:
                live[c] = 1
        nsame = states.count(SAME)
        vec.put(self.state, pages, states)
        vec.put(self.length, pages, lengths)
        if nsame:
            vec.put(self.fill, pages, [f if s == SAME else 0 for s, f in zip(states, fills)])
        else:
            vec.scatter(self.fill, pages, 0)
        vec.scatter(self.pool_id, pages, pool.id)
        vec.scatter(self.dirty, pages, 1)
        vec.scatter(self.stamp, pages, self.seq)
        if self.referenced_on_store:        # free() cleared the bit
            vec.scatter(self.referenced, pages, 1)
        vec.scatter(self.atime, pages, self.clock.tick)
        self.seq += 1
        saved = self.dedup_saved_bytes
        if self.dedup is not None:
            objs = [o if o is None else self.dedup.share(pool, o) for o in objs]
        if type(pages) is range:
            self.objs.set_run(pages.start, objs, n)
        else:
            for p, o in zip(pages, objs):
                if o is not None:
                    self.objs.set(p, o)
        nraw = states.count(RAW)
        ncached = n - nsame
        held = lengths if ncached == n else [ln for s, ln in zip(states, lengths) if s >= COMP]
        size = sum(map(charge, held))
        self.compr_data_size += sum(held)
        size -= self.dedup_saved_bytes - saved     # objects shared with pages already held
        self._account(pool, ncached, size, nsame, nraw)
        return n

    def _account(self, pool: Pool, ncached: int, size: int, nsame: int, nraw: int) -> None:
        pool.stored_pages += ncached
        pool.total_size += size
        self.pool_total_size += size
        self.same_filled_pages += nsame
        self.stored_incompressible_pages += nraw
        if self.pool_total_size > self.mem_used_max:
            self.mem_used_max = self.pool_total_size

    def free(self, pages) -> None:
        """Drop the entries of `pages` (a range or a list) and their accounting; their state
        is the caller's to set (NONE, DISK or a new entry)."""
        if type(pages) is range:
            st = bytes(self.state[pages.start:pages.stop])
        else:
            st = bytes(map(self.state.__getitem__, pages))
        if st.count(COMP) or st.count(RAW):
            cpages = _pick(pages, vec.mask_in(st, (COMP, RAW)))
            self._free_cached(cpages, st.count(RAW))
            if type(pages) is range:
                self.objs.set_run(pages.start, None, len(pages))
            else:
                for p in cpages:
                    self.objs.set(p, None)
        self.same_filled_pages -= st.count(SAME)
        self.disk_pages -= st.count(DISK)
        if st.count(FAR):
            self._drop_far(_pick(pages, vec.mask_in(st, (FAR,))))
        _next_gen(self.gen, pages)
        vec.scatter(self.dirty, pages, 0)
        vec.scatter(self.referenced, pages, 0)
        vec.scatter(self.under_wb, pages, 0)

    def _free_cached(self, cpages: list, nraw: int) -> None:
        """free()'s accounting for the COMP and RAW pages `cpages`."""
        ids = vec.gather(self.pool_id, cpages)
        lengths = vec.gather(self.length, cpages)
        self.compr_data_size -= sum(lengths)
        sizes = list(map(charge, lengths))
        pools = self.registry.pools
        if self.dedup is not None:          # an object other pages still share keeps its charge
            sizes = [0 if self.dedup.unshare(pools[i], self.obj(p)) else size
                     for p, i, size in zip(cpages, ids, sizes)]
        freed = sum(sizes)
        if ids.count(ids[0]) == len(ids):   # one pool, as nearly always
            self._unaccount(pools[ids[0]], len(ids), freed)
        else:
            per_pool: dict[int, list[int]] = {}
            for i, size in zip(ids, sizes):
                counted = per_pool.setdefault(i, [0, 0])
                counted[0] += 1
                counted[1] += size
            for i, (count, size) in sorted(per_pool.items()):
                self._unaccount(pools[i], count, size)
        self.pool_total_size -= freed
        self.stored_incompressible_pages -= nraw
        if self.on_freed is not None:
            self.on_freed(freed)

    def recompressed(self, pages: list, scan: Scan, pool: Pool) -> int:
        """Cached pages whose objects a secondary algorithm made smaller: their new objects
        into `pool`; dirty bit, LRU place, access time and generation stay (same bytes).
        Returns the bytes of pool memory saved."""
        before = self.pool_total_size
        kept = [(a, vec.gather(a, pages))
                for a in (self.dirty, self.referenced, self.stamp, self.atime, self.gen)]
        self.install(pages, scan, pool)
        for a, values in kept:
            vec.put(a, pages, values)
        return before - self.pool_total_size

    def set_disk(self, pages) -> None:
        """Freed pages (see free(): a range or a list) that the backing file now holds."""
        vec.scatter(self.state, pages, DISK)
        vec.scatter(self.fill, pages, 0)    # reads since it went to disk
        self.disk_pages += len(pages)

    # ---- access times -----------------------------------------------------------------------

    def mark_idle(self, older_than: float | None = None) -> int:
        """zram's `idle` write: mark every cached page idle (None), or those not accessed for
        `older_than` seconds. Returns how many pages are idle now."""
        # atime <= tick - older_than, for whole-second times: atime below `limit`. mask_below
        # needs the times below 2**31: ticks count seconds since the clock started.
        limit = None if older_than is None else math.floor(self.clock.tick - older_than) + 1
        n = 0
        for s in self.spans():
            if limit is None:
                marked = self.holds_data(s)
            elif limit > 0:                 # idle ones (time 0) are among those below it
                marked = vec.mask_and(self.holds_data(s),
                                      vec.mask_below(self.atime, s.start, s.stop, limit))
            else:                           # no page is that old: the idle ones stay idle
                marked = self.idle(s)
            vec.zero_where(self.atime, s.start, s.stop, marked)
            n += marked.count(1)
        return n

    def idle(self, pages: slice) -> bytes:
        """0/1 per page of a slice: cached (SAME, COMP or RAW) and not accessed since marked
        idle."""
        accessed = vec.mask_nonzero_items(self.atime, pages.start, pages.stop)
        return vec.mask_and(self.holds_data(pages), vec.mask_not(accessed))

    def holds_data(self, pages: slice) -> bytes:
        """0/1 per page of a slice: SAME, COMP or RAW (the pages zram's idle and writeback look
        at)."""
        return vec.mask_in(self.state, (SAME, COMP, RAW), pages.start, pages.stop)

    def to_far(self, pages: list, versions: list) -> None:
        """Cached pages (COMP or RAW) whose objects the far tier now holds under `versions`:
        their pool memory is given back; their length, pool, dirty bit and generation stay (the
        page's bytes did not change: a flush that wrote them may still mark them clean)."""
        if not len(pages):
            return
        ids = vec.gather(self.pool_id, pages)
        for pid in set(ids):
            self.registry.pools[pid].far_pages += ids.count(pid)
        dirty, gen = vec.gather(self.dirty, pages), vec.gather(self.gen, pages)
        self.free(pages)                    # the pools live on: far_pages refers to them
        vec.scatter(self.state, pages, FAR)
        vec.put(self.fill, pages, versions)
        vec.put(self.dirty, pages, dirty)
        vec.put(self.gen, pages, gen)
        vec.put(self.stamp, pages, range(self.seq, self.seq + len(pages)))
        self.seq += len(pages)
        self.far_pages += len(pages)
        self.far_bytes += sum(far_value_size(ln, self.far_overhead)
                              for ln in vec.gather(self.length, pages))

    def _drop_far(self, pages: list) -> None:
        """Far entries of `pages` leave the table: their pools' references and the far gauges
        go, and on_far_freed queues their copies for deletion."""
        ids = vec.gather(self.pool_id, pages)
        for pid in set(ids):
            pool = self.registry.pools[pid]
            pool.far_pages -= ids.count(pid)
            self.registry.put_if_dead(pool)
        self.far_pages -= len(pages)
        self.far_bytes -= sum(far_value_size(ln, self.far_overhead)
                              for ln in vec.gather(self.length, pages))
        if self.on_far_freed is not None:
            self.on_far_freed(pages, vec.gather(self.fill, pages))

    def _unaccount(self, pool: Pool, count: int, size: int) -> None:
        pool.stored_pages -= count
        pool.total_size -= size
        self.registry.put_if_dead(pool)

    def discard(self, start: int, end: int) -> None:
        """Pages start .. end read as zeros (NONE), their entries freed. Only the span of pages
        that are not NONE is written: writing every entry gave table memory to pages that never
        held data, as when mkfs discards a whole disk. Chunks left without entries are given
        back (their `objs` chunk and `live` mark)."""
        if end <= start:
            return
        for lo in range(start, end, SPAN):          # temporaries of SPAN bytes at most
            used = bytes(self.state[lo:min(lo + SPAN, end)])
            first = len(used) - len(used.lstrip(b"\0"))
            if first < len(used):
                span = range(lo + first, lo + len(used.rstrip(b"\0")))
                self.free(span)
                vec.fill(self.state, span.start, span.stop, NONE)
        for c in range(start >> OBJ_SHIFT, ((end - 1) >> OBJ_SHIFT) + 1):
            if not self.live[c]:
                continue
            lo, hi = c << OBJ_SHIFT, min((c + 1) << OBJ_SHIFT, self.npages)
            if lo < start or hi > end:      # a chunk the discard covers in part: look at it
                st = bytes(self.state[lo:hi])
                if st.count(NONE) + st.count(DISK) < len(st):
                    continue
            self.live[c] = 0
            self.objs.drop(c)

    # ---- queries --------------------------------------------------------------------------

    def cached(self, pages: slice) -> bytes:
        """0/1 per page of a slice: COMP or RAW (on the LRU, holding pool memory)."""
        return vec.mask_in(self.state, (COMP, RAW), pages.start, pages.stop)

    def spans(self):
        """Slices of at most SPAN pages that together cover every live chunk, ascending: every
        SAME, COMP and RAW page, so every dirty, referenced or under_wb one, lies in them."""
        for first, end in vec.runs(vec.nonzero(self.live)):
            lo = first << OBJ_SHIFT
            hi = min(end << OBJ_SHIFT, self.npages)
            for a in range(lo, hi, SPAN):
                yield slice(a, min(a + SPAN, hi))

    def find(self, pred) -> list[int]:
        """The pages (ascending) where `pred(span)`, a 0/1 mask for the pages of a slice from
        spans(), is 1. `pred` must be 0 wherever a page has no entry."""
        found: list[int] = []
        for s in self.spans():
            found += vec.positions(pred(s), s.start)
        return found

    def unchanged(self, pages: list[int], gens: list[int]) -> list[int]:
        """The pages whose generation is still the one in `gens` (taken with them earlier)."""
        gen = self.gen
        return [p for p, g in zip(pages, gens) if gen[p] == g]

    def count(self, pred) -> int:
        """How many pages find(pred) would return, without listing them."""
        return sum(bytes(pred(s)).count(1) for s in self.spans())

    def stored_pages(self) -> int:
        return sum(p.stored_pages for p in self.registry.live()) + self.same_filled_pages

    def objs_bytes(self) -> int:
        """Memory `objs` holds for its slots now: the list of chunks and the chunks that exist,
        and with dedup the pools' indexes (not the objects: they are the pool's)."""
        index = sum(sys.getsizeof(p.objects) + sys.getsizeof(p.sharers)
                    for p in self.registry.live()) if self.dedup is not None else 0
        return self.objs.nbytes() + index


def _pick(pages, mask) -> list[int]:
    """The pages of `pages` (a range or a list) where the 0/1 `mask` is 1."""
    if type(pages) is range:
        return vec.positions(mask, pages.start)
    return [pages[i] for i in vec.positions(mask)]


def _next_gen(gen: memoryview, pages) -> None:
    """gen[p] += 1 for each page, wrapping at 2**32 as the kernel's counters do."""
    if type(pages) is range and \
            b"\xff\xff\xff\xff" not in gen[pages.start:pages.stop].tobytes():
        vec.add_to_run(gen, pages.start, pages.stop, 1)     # no generation is about to wrap
        return
    for p in pages:
        gen[p] = (gen[p] + 1) & 0xFFFFFFFF
