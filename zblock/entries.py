"""The entry table: one slot per page of the disk (zswap's xarray of entries), and the only code
that installs, frees and accounts for entries.

Per page, in numpy arrays: state, compressed length, pool id, fill word, dirty, referenced
(second chance), under_wb (zram ZRAM_UNDER_WB), LRU stamp, generation and last access time
(zram's ac_time, in whole seconds: zblock.accessclock; 0 marks the page idle); `objs`
(ObjectSlots) holds the stored object of a COMP or RAW page. Memory follows the pages in use:
the kernel gives its arrays (zblock.pagemem.zeros) memory on first write, `objs` is made of
chunks created by the first store into them, and nothing writes the entries of pages that hold
nothing. Work that looks for entries (dirty, cached, under writeback) looks only at `live`
chunks, so it is in proportion to the parts of the disk in use, with temporaries of at most
SPAN pages.

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
    * same_filled_pages and stored_incompressible_pages count SAME and RAW entries, disk_pages
      DISK ones;
    * far_pages counts FAR entries and far_bytes their values (far_value_size of each length);
      each pool's far_pages counts its FAR entries; every FAR page lies in a live chunk.

Not here: which pages to store or evict (zblock.cache, zblock.lru), the pools' lifetime
(zblock.pools: a pool that loses its last entry is handed to put_if_dead).
"""

from __future__ import annotations

import sys

import numpy as np

from . import pagemem
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
    """Bytes a far value of an object of `length` bytes takes (an int or an int64 array), with
    `overhead` bytes besides the object (the header, and the seal of an encrypted one)."""
    return length + overhead
# ObjectSlots keeps chunks of OBJ_CHUNK slots, each None until a page in it is cached: one flat
# list cost 8 bytes a page up front (2 GiB for an empty 1 TiB disk).
OBJ_SHIFT = 12
OBJ_CHUNK = 1 << OBJ_SHIFT
OBJ_MASK = OBJ_CHUNK - 1
# Scans of the table (spans()) take at most this many pages at a time: their temporaries stay
# at a few MiB however large the disk.
SPAN = 1 << 20


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
    """The entries of `npages` pages, and the gauges they add up to."""

    def __init__(self, npages: int, registry, on_disk: np.ndarray | None = None,
                 dedup: bool = False):
        self.npages = npages
        self.registry = registry            # zblock.pools.PoolRegistry: put_if_dead, pools
        self.dedup = DedupIndex(self) if dedup else None
        self.state = pagemem.zeros(npages, np.uint8)
        self.length = pagemem.zeros(npages, np.uint16)
        self.pool_id = pagemem.zeros(npages, np.uint8)
        self.fill = pagemem.zeros(npages, np.uint64)
        self.dirty = pagemem.zeros(npages, np.bool_)
        self.referenced = pagemem.zeros(npages, np.bool_)
        self.under_wb = pagemem.zeros(npages, np.bool_)
        self.stamp = pagemem.zeros(npages, np.int64)
        self.gen = pagemem.zeros(npages, np.uint32)
        self.atime = pagemem.zeros(npages, np.uint32)
        nchunks = (npages + OBJ_MASK) >> OBJ_SHIFT
        # per chunk of OBJ_CHUNK pages: set by the first install into it, cleared by a discard
        # that leaves it without entries
        self.live = pagemem.zeros(nchunks, np.bool_)
        self.arrays = (self.state, self.length, self.pool_id, self.fill, self.dirty,
                       self.referenced, self.under_wb, self.stamp, self.gen, self.atime, self.live)
        self.disk_pages = 0
        if on_disk is not None:
            self.state[on_disk] = DISK
            self.disk_pages = int(np.count_nonzero(on_disk)) if on_disk.dtype == np.bool_ \
                else len(on_disk)
        self.objs = ObjectSlots(npages)
        self.obj, self.objs_range = self.objs.get, self.objs.range    # the objects' readers
        # The same memory as memoryviews, for the one-page paths: indexing one with a Python int
        # takes half the time of a numpy scalar access and gives Python ints back.
        self.st = memoryview(self.state)
        self.ln = memoryview(self.length)
        self.pid = memoryview(self.pool_id)
        self.fl = memoryview(self.fill)
        self.dt = memoryview(self.dirty)
        self.ref = memoryview(self.referenced)
        self.uwb = memoryview(self.under_wb)
        self.stp = memoryview(self.stamp)
        self.gn = memoryview(self.gen)
        self.at = memoryview(self.atime)
        self.clock = AccessClock()          # `clock.tick`: the access time to record now
        self.lv = memoryview(self.live)
        self.seq = 1                        # next LRU stamp
        # zswap stores entries referenced (second chance before their first writeback); zblock's
        # `evict` policy sets the bit on loads only (Cache keeps this in step with the policy)
        self.referenced_on_store = False
        self.same_filled_pages = 0
        self.stored_incompressible_pages = 0
        self.pool_total_size = 0
        self.mem_used_max = 0
        self.far_pages = 0
        self.far_bytes = 0
        self.dedup_pages = 0
        self.dedup_saved_bytes = 0
        self.far_overhead = FAR_HEADER      # bytes of a far value besides its object
        self.on_freed = None                # called with the bytes a free gave back (trimmer)
        self.on_far_freed = None            # called with (pages, versions) of far copies freed

    # ---- install and free -----------------------------------------------------------------

    def install(self, where, scan: Scan, pool: Pool) -> int:
        """A store's scanned pages into the table, replacing their old entries: at pages
        where, where+1 .. (an int) or at the page numbers in `where` (an int64 array). Pages
        scanned NONE are left as they are (they go to disk). Returns how many went in."""
        states = scan.states
        if len(states) == 1:
            return self._install_one(where if type(where) is int else int(where[0]), scan, pool)
        by_state = np.bincount(states, minlength=NSTATES).tolist()
        sel = np.flatnonzero(states != NONE) if by_state[NONE] else None
        if type(where) is int:
            pages = np.arange(where, where + len(states)) if sel is not None else \
                slice(where, where + len(states))
        else:
            pages = where
        if sel is not None:
            pages = pages[sel]
            states, lengths, fills = states[sel], scan.lengths[sel], scan.fills[sel]
            objs = [scan.objs[i] for i in sel.tolist()]
        else:
            lengths, fills, objs = scan.lengths, scan.fills, scan.objs
        n = len(states)
        if not n:
            return 0
        self.free(pages)
        if type(pages) is slice:
            self.live[pages.start >> OBJ_SHIFT:((pages.stop - 1) >> OBJ_SHIFT) + 1] = True
        else:
            self.live[pages >> OBJ_SHIFT] = True
        self.state[pages] = states
        self.length[pages] = lengths
        self.fill[pages] = np.where(states == SAME, fills, 0) if by_state[SAME] else 0
        self.pool_id[pages] = pool.id
        self.dirty[pages] = True
        self.stamp[pages] = self.seq
        self.referenced[pages] = self.referenced_on_store
        self.atime[pages] = self.clock.tick
        self.seq += 1
        saved = self.dedup_saved_bytes
        if self.dedup is not None:
            objs = [o if o is None else self.dedup.share(pool, o) for o in objs]
        if type(pages) is slice:
            self.objs.set_run(pages.start, objs, n)
        else:
            for p, o in zip(pages.tolist(), objs):
                if o is not None:
                    self.objs.set(p, o)
        ncached = by_state[COMP] + by_state[RAW]
        size = 0
        if ncached:
            held = lengths if ncached == n else lengths[states >= COMP]
            size = int(charge(held.astype(np.int64)).sum())
        size -= self.dedup_saved_bytes - saved     # objects shared with pages already held
        self._account(pool, ncached, size, by_state[SAME], by_state[RAW])
        return n

    def _install_one(self, page: int, scan: Scan, pool: Pool) -> int:
        """install() for one page with scalar code (a numpy call costs 1-6 us)."""
        state = int(scan.states[0])
        if state == NONE:
            return 0
        self.free_one(page)
        self.lv[page >> OBJ_SHIFT] = True
        length = int(scan.lengths[0])
        self.st[page] = state
        self.ln[page] = length
        self.fl[page] = int(scan.fills[0]) if state == SAME else 0
        self.pid[page] = pool.id
        self.dt[page] = True
        self.stp[page] = self.seq
        self.ref[page] = self.referenced_on_store
        self.at[page] = self.clock.tick
        self.seq += 1
        obj = scan.objs[0]
        if self.dedup is not None and obj is not None:
            held = self.dedup.share(pool, obj)
            shared, obj = held is not obj, held
        else:
            shared = False
        self.objs.set(page, obj)
        cached = state >= COMP
        self._account(pool, int(cached), charge(length) if cached and not shared else 0,
                      int(not cached), int(state == RAW))
        return 1

    def _account(self, pool: Pool, ncached: int, size: int, nsame: int, nraw: int) -> None:
        pool.stored_pages += ncached
        pool.total_size += size
        self.pool_total_size += size
        self.same_filled_pages += nsame
        self.stored_incompressible_pages += nraw
        if self.pool_total_size > self.mem_used_max:
            self.mem_used_max = self.pool_total_size

    def free(self, pages) -> None:
        """Drop the entries of `pages` (a slice or an index array) and their accounting; their
        state is the caller's to set (NONE, DISK or a new entry)."""
        st = self.state[pages]
        # pages per state, in one numpy call: most frees find no cached, same-filled or far page
        by_state = np.bincount(st, minlength=NSTATES).tolist()
        if by_state[COMP] or by_state[RAW]:
            cached = (st == COMP) | (st == RAW)
            cpages = (np.flatnonzero(cached) + pages.start) if type(pages) is slice \
                else pages[cached]
            ids = self.pool_id[cpages]
            sizes = charge(self.length[cpages].astype(np.int64))
            if self.dedup is not None:      # an object other pages still share keeps its charge
                pools = self.registry.pools
                kept = [self.dedup.unshare(pools[i], self.obj(p))
                        for p, i in zip(cpages.tolist(), ids.tolist())]
                sizes[np.array(kept, bool)] = 0
            freed = int(sizes.sum())
            if (ids == ids[0]).all():       # one pool, as nearly always
                self._unaccount(self.registry.pools[int(ids[0])], len(ids), freed)
            else:
                counts = np.bincount(ids, minlength=len(self.registry.pools))
                per_pool = np.bincount(ids, weights=sizes, minlength=len(self.registry.pools))
                for pid in np.flatnonzero(counts).tolist():
                    self._unaccount(self.registry.pools[pid], int(counts[pid]), int(per_pool[pid]))
            self.pool_total_size -= freed
            self.stored_incompressible_pages -= by_state[RAW]
            if self.on_freed is not None:
                self.on_freed(freed)
            if type(pages) is slice:
                self.objs.set_run(pages.start, None, pages.stop - pages.start)
            else:
                for p in cpages.tolist():
                    self.objs.set(p, None)
        self.same_filled_pages -= by_state[SAME]
        self.disk_pages -= by_state[DISK]
        if by_state[FAR]:
            far = st == FAR
            fpages = (np.flatnonzero(far) + pages.start) if type(pages) is slice else pages[far]
            self._drop_far(fpages)
        self.gen[pages] += 1
        self.dirty[pages] = False
        self.referenced[pages] = False
        self.under_wb[pages] = False

    def free_one(self, page: int) -> None:
        """free() for one page with scalar code."""
        st = self.st[page]
        if st == COMP or st == RAW:
            pool = self.registry.pools[self.pid[page]]
            shared = self.dedup is not None and self.dedup.unshare(pool, self.obj(page))
            size = 0 if shared else charge(self.ln[page])
            self._unaccount(pool, 1, size)
            self.pool_total_size -= size
            if st == RAW:
                self.stored_incompressible_pages -= 1
            if self.on_freed is not None:
                self.on_freed(size)
            self.objs.set(page, None)
        elif st == SAME:
            self.same_filled_pages -= 1
        elif st == FAR:
            self._drop_far(np.array([page], np.int64))
        elif st == DISK:
            self.disk_pages -= 1
        self.gn[page] = (self.gn[page] + 1) & 0xFFFFFFFF       # wraps as the uint32 array does
        self.dt[page] = False
        self.ref[page] = False
        self.uwb[page] = False

    def recompressed(self, pages: np.ndarray, scan: Scan, pool: Pool) -> int:
        """Cached pages whose objects a secondary algorithm made smaller: their new objects
        into `pool`; dirty bit, LRU place, access time and generation stay (same bytes).
        Returns the bytes of pool memory saved."""
        before = self.pool_total_size
        keep = (self.dirty[pages].copy(), self.referenced[pages].copy(), self.stamp[pages].copy(),
                self.atime[pages].copy(), self.gen[pages].copy())
        self.install(pages, scan, pool)
        (self.dirty[pages], self.referenced[pages], self.stamp[pages], self.atime[pages],
         self.gen[pages]) = keep
        return before - self.pool_total_size

    def set_disk(self, pages) -> None:
        """Freed pages (see free(): a slice or an index array) that the backing file now holds."""
        self.state[pages] = DISK
        self.fill[pages] = 0                # reads since it went to disk
        self.disk_pages += pages.stop - pages.start if type(pages) is slice else len(pages)

    # ---- access times -----------------------------------------------------------------------

    def mark_idle(self, older_than: float | None = None) -> int:
        """zram's `idle` write: mark every cached page idle (None), or those not accessed for
        `older_than` seconds. Returns how many pages are idle now."""
        cutoff = None if older_than is None else self.clock.tick - older_than
        n = 0
        for s in self.spans():
            held = self.holds_data(s)
            if cutoff is None:
                self.atime[s][held] = 0
            else:
                self.atime[s][held & (self.atime[s] <= cutoff)] = 0
            n += int(np.count_nonzero(held & (self.atime[s] == 0)))
        return n

    def idle(self, pages) -> np.ndarray:
        """Bool per page: cached (SAME, COMP or RAW) and not accessed since marked idle."""
        return self.holds_data(pages) & (self.atime[pages] == 0)

    def holds_data(self, pages) -> np.ndarray:
        """Bool per page: SAME, COMP or RAW (the pages zram's idle and writeback look at)."""
        st = self.state[pages]
        return (st == SAME) | (st == COMP) | (st == RAW)

    def to_far(self, pages: np.ndarray, versions: np.ndarray) -> None:
        """Cached pages (COMP or RAW) whose objects the far tier now holds under `versions`:
        their pool memory is given back; their length, pool, dirty bit and generation stay (the
        page's bytes did not change: a flush that wrote them may still mark them clean)."""
        if not len(pages):
            return
        ids = self.pool_id[pages]
        for pid in np.unique(ids).tolist():
            self.registry.pools[pid].far_pages += int(np.count_nonzero(ids == pid))
        dirty, gen = self.dirty[pages].copy(), self.gen[pages].copy()
        self.free(pages)                    # the pools live on: far_pages refers to them
        self.state[pages] = FAR
        self.fill[pages] = versions
        self.dirty[pages] = dirty
        self.gen[pages] = gen
        self.stamp[pages] = np.arange(self.seq, self.seq + len(pages))
        self.seq += len(pages)
        self.far_pages += len(pages)
        self.far_bytes += int(far_value_size(self.length[pages].astype(np.int64),
                                             self.far_overhead).sum())

    def _drop_far(self, pages: np.ndarray) -> None:
        """Far entries of `pages` leave the table: their pools' references and the far gauges
        go, and on_far_freed queues their copies for deletion."""
        ids = self.pool_id[pages]
        for pid in np.unique(ids).tolist():
            pool = self.registry.pools[pid]
            pool.far_pages -= int(np.count_nonzero(ids == pid))
            self.registry.put_if_dead(pool)
        self.far_pages -= len(pages)
        self.far_bytes -= int(far_value_size(self.length[pages].astype(np.int64),
                                             self.far_overhead).sum())
        if self.on_far_freed is not None:
            self.on_far_freed(pages, self.fill[pages].copy())

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
        used = np.flatnonzero(self.state[start:end])
        if len(used):
            span = slice(start + int(used[0]), start + int(used[-1]) + 1)
            self.free(span)
            self.state[span] = NONE
        for c in range(start >> OBJ_SHIFT, ((end - 1) >> OBJ_SHIFT) + 1):
            if not self.lv[c]:
                continue
            lo, hi = c << OBJ_SHIFT, min((c + 1) << OBJ_SHIFT, self.npages)
            if lo < start or hi > end:      # a chunk the discard covers in part: look at it
                st = self.state[lo:hi]
                if ((st != NONE) & (st != DISK)).any():
                    continue
            self.live[c] = False
            self.objs.drop(c)

    # ---- queries --------------------------------------------------------------------------

    def cached(self, pages) -> np.ndarray:
        """Bool per page: COMP or RAW (on the LRU, holding pool memory)."""
        st = self.state[pages]
        return (st == COMP) | (st == RAW)

    def spans(self):
        """Slices of at most SPAN pages that together cover every live chunk, ascending: every
        SAME, COMP and RAW page, so every dirty, referenced or under_wb one, lies in them."""
        live = np.flatnonzero(self.live)
        if not len(live):
            return
        cuts = np.flatnonzero(np.diff(live) != 1) + 1
        for run in np.split(live, cuts):
            lo = int(run[0]) << OBJ_SHIFT
            hi = min((int(run[-1]) + 1) << OBJ_SHIFT, self.npages)
            for a in range(lo, hi, SPAN):
                yield slice(a, min(a + SPAN, hi))

    def find(self, pred) -> np.ndarray:
        """The pages (int64, ascending) where `pred(span)`, a bool array for the pages of a
        slice from spans(), is True. `pred` must be False wherever a page has no entry."""
        found = [np.flatnonzero(pred(s)) + s.start for s in self.spans()]
        if not found:
            return np.zeros(0, np.int64)
        return found[0] if len(found) == 1 else np.concatenate(found)

    def count(self, pred) -> int:
        """How many pages find(pred) would return, without listing them."""
        return sum(int(np.count_nonzero(pred(s))) for s in self.spans())

    def stored_pages(self) -> int:
        return sum(p.stored_pages for p in self.registry.live()) + self.same_filled_pages

    def objs_bytes(self) -> int:
        """Memory `objs` holds for its slots now: the list of chunks and the chunks that exist,
        and with dedup the pools' indexes (not the objects: they are the pool's)."""
        index = sum(sys.getsizeof(p.objects) + sys.getsizeof(p.sharers)
                    for p in self.registry.live()) if self.dedup is not None else 0
        return self.objs.nbytes() + index
