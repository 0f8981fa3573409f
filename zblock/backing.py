"""Backing store: the raw disk image, its `.zbmeta` checksum sidecar, and the file lock.

The backing file is a raw image at the same offsets as the FUSE `disk` file (after a clean
unmount it is usable directly with losetup). Beside it, `PATH.zbmeta` holds a header and, per
page, two CRC32C values (durable, latest) with three sentinels: ZERO (reads as zeros), UNCHECKED
(imported without a sidecar) and LOST (reads EIO); zblock.sidecar has the format. In memory the
pairs are the table `_crc`, a flat 'I' array (page p's durable at 2p, latest at 2p + 1) whose
4 KiB blocks are the sidecar's, so a touched block is written straight from the table.
zblock.backing_open opens, creates, locks and reserves the files, loads the table (only the
blocks that hold entries) and settles the pairs a crash left; this module serves I/O on what it
opened, and checks unmounted images (fsck).

A page verifies when its data matches `durable` or `latest`. `durable` is the value as of the
last sync, or of the last completed write since (see write_pages below); `latest` is the value
of the last write started.
A file modified after a clean unmount (mtime differs from the header) keeps its checksums: a
stray write and bit rot look alike and both must read as EIO; the warning (open_state "changed")
says to remove the sidecar if the edit was on purpose.

Crash rules (DESIGN "Data semantics"): a page not written since the last completed sync() reads
exactly; a page written since reads as its synced bytes, as a version written since, or EIO.
Without a crash every page reads exactly, failed writes included. How the ordering gives that:
  write_pages   pair := (what the disk holds now, crc(new)) in memory -- "what it holds" is the
                last completed write, which right after a sync is the durable value -- then
                write the touched sidecar blocks, then the data. The pair covers the page
                whatever part of the write lands. (After two writes since a sync a power cut
                may bring back the synced bytes, which then read as EIO: allowed, and it keeps
                the running case exact with only two values per page.)
  discard       the same as a write of zeros, for the pages whose pair is not (ZERO, ZERO)
                already: pair := (what the disk holds now, ZERO), their sidecar blocks, then
                the punch of the whole range.
  sync          (1) fsync the sidecar: every pair written so far is durable before (2) fsync of
                the data (correctness does not need (1); it narrows the EIO window of pages
                written just before a cut, for one cheap fsync of a small file); (3) collapse
                durable := latest for pages whose writes had completed
                before (2) began and were not rewritten since, write their blocks, fsync the
                sidecar. A power cut anywhere leaves each synced page covered: its pair has been
                (D, D) in every sidecar version written since its last sync.
  sidecar       Versions of one sidecar block are written in the order their snapshots were
                taken (a stripe lock held across snapshot + pwrite): a stale snapshot landing
                late could otherwise drop a synced page's checksum.
  failed write  the page keeps (old, new): both stay valid (what landed is unknown), sync does
                not collapse it, and the next write keeps `old` as its first value, until a
                write of the page succeeds.
The sidecar is written buffered (fsync orders it); the data file bypasses the page cache
(zblock.disk.FileDisk, O_DIRECT on this machine).

Ephemeral mode (swap): no sidecar, CRCs kept in memory only, the file preallocated and its
contents discarded at open; discard only marks pages zero (a punch would give back the space the
preallocation reserved); sync and close write nothing.

Lock protocol. Lock order: _sync_lock -> stripe lock -> _lock.
  _lock        (small, never held across I/O) guards _crc, _unsynced, _inflight and _failed.
               The I/O counters have their own leaf lock (zblock.diskstats).
  _stripes[b % N]  serialises snapshot + pwrite of sidecar block b (held across one 4 KiB
               buffered pwrite: the ordering above needs it).
  _sync_lock   one sync() at a time.
The caller (the cache) serialises operations on the same page; different pages may be read and
written from several threads, and sync() may run while other pages are written.

Not here: opening (zblock.backing_open), the sidecar's format (zblock.sidecar), caching,
compression, byte ranges (zblock.store), retries (the cache keeps a page whose writeback failed).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import threading
import time
from array import array
from dataclasses import dataclass, field
from itertools import compress
from typing import Callable

from . import PAGE_SIZE, vec
from .backing_open import DiskFactory, Opened, human, open_files, stat_backing
from .diskstats import DiskStats
from .errors import BackingError, BackingLocked, OutOfRange
from . import pagemem
from .seal import Sealer
from .sidecar import (ENTRIES_PER_BLOCK, ENTRY_SIZE, FOLD, HEADER_SIZE, LOST, PAGE_RUN,
                      SCAN_ROWS, UNCHECKED, ZERO, ZERO_PAGE_CRC, crc as _crc, fold, meta_path,
                      pack_header, page_crcs, parse_header, row_steps, table_rows, used_rows,
                      verify)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Backing


class Backing:
    """An open backing file. Make one with `Backing.open`."""

    _NSTRIPES = 64

    def __init__(self, opened: Opened):
        self.path = opened.path
        self.size = opened.size
        self.npages = opened.size // PAGE_SIZE
        self.ephemeral = opened.ephemeral
        self.sparse = opened.sparse        # space not reserved: a write may meet ENOSPC
        self.read_only = opened.read_only  # nothing is written: no sidecar header, no sync
        # Pages marked zero are read and checked like any other when the file was changed
        # outside zblock: a never-written page someone wrote into must read EIO, not zeros.
        self.verify_zero = opened.state == "changed"
        self.open_state = opened.state  # new | clean | recovered | imported | changed | ephemeral
        self.io_mode = getattr(opened.data, "mode", type(opened.data).__name__)
        self._lock_fd = opened.lock_fd
        self._data = opened.data
        self._meta = opened.meta
        self._crc = opened.table  # 'I': page p's durable at 2p, latest at 2p + 1
        self.sealer = opened.sealer  # --encrypt: pages are sealed on their way to the file
        self._loaded = opened.loaded  # rows that may be other than (ZERO, ZERO) as opened
        n = self.npages
        # 0/1 flags per page
        self._unsynced = pagemem.array(n, "B")  # written/discarded since the last sync
        self._inflight = pagemem.array(n, "B")  # disk write or punch in progress
        self._failed = pagemem.array(n, "B")  # last write failed: keep both values across sync
        self.arrays = (self._crc, self._unsynced, self._inflight, self._failed)   # table_bytes
        if self.sealer is not None:
            self.arrays += (self.sealer.rows,)
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(self._NSTRIPES)]
        self._sync_lock = threading.Lock()
        self._closed = False
        self.stats = DiskStats(self.path)

    @classmethod
    def open(cls, path: str, size: int | None = None, *, ephemeral: bool = False,
             sparse: bool = False, read_only: bool = False, encrypt: bool = False,
             key: bytes | None = None, disk_factory: DiskFactory | None = None,
             progress: Callable[[str], None] | None = None) -> "Backing":
        """Create (needs `size`) or open the backing file at `path`, locked while open: the
        rules (sizes, space reserved, read-only, encryption, errors) are
        zblock.backing_open.open_files'."""
        opened = open_files(path, size, ephemeral=ephemeral, sparse=sparse, read_only=read_only,
                            encrypt=encrypt, key=key, disk_factory=disk_factory,
                            progress=progress)
        try:
            return cls(opened)
        except BaseException:
            opened.close()
            raise

    # -- helpers -----------------------------------------------------------------------------

    def _check_range(self, start: int, count: int) -> None:
        if self._closed:
            raise BackingError(f"{self.path}: backing is closed")
        if start < 0 or count < 0 or start + count > self.npages:
            raise OutOfRange(f"{self.path}: pages {start}+{count} outside 0..{self.npages}")

    def _put_meta_blocks(self, blocks) -> None:
        """Write sidecar blocks from the table. Each block's snapshot is taken and written under
        its stripe lock, so versions of a block reach the file in snapshot order."""
        for b in blocks:
            with self._stripes[b % self._NSTRIPES]:
                with self._lock:
                    buf = self._crc[2 * b * ENTRIES_PER_BLOCK:2 * (b + 1) * ENTRIES_PER_BLOCK]
                    buf = buf.tobytes()
                self._meta.pwrite(HEADER_SIZE + b * PAGE_SIZE, buf)

    # -- reads -------------------------------------------------------------------------------

    def written_mask(self) -> memoryview:
        """0/1 per page ('B'): the file may hold data for it (not marked zero), as opened. The
        cache starts with these pages on disk and serves the others as zeros without a read."""
        mask = pagemem.array(self.npages, "B")
        if self.verify_zero:
            vec.fill(mask, 0, self.npages, 1)
            return mask
        # Set only over the rows loaded at open: the rest of the mask stays memory not given.
        with self._lock:
            for rows in row_steps(self._loaded, self.npages):
                mask[rows] = used_rows(self._crc, rows.start, rows.stop)
        return mask

    def read_pages(self, start: int, count: int, ahead: int = 0) -> bytes:
        """`count` pages from page `start`, each verified. DataError (EIO) naming the first bad
        page if any does not match its checksums; DiskError on an I/O error. Readahead: up to
        `ahead` pages after them come in the same I/O, as far as they verify; a failure there
        is neither raised nor counted (the caller did not ask for those pages)."""
        n = count + ahead
        self._check_range(start, n)
        if n == 1:
            return self._read_one(start)
        with self._lock:
            pairs = self._crc[2 * start:2 * (start + n)].tolist()
        if self.verify_zero:    # check them like written pages (verify: zeros match ZERO)
            zero = [False] * n
        else:
            zero = [not (d or l) for d, l in zip(pairs[0::2], pairs[1::2])]
        if all(zero):
            return bytes(n * PAGE_SIZE)
        t0 = time.perf_counter_ns()
        try:
            data = self._data.pread(start * PAGE_SIZE, n * PAGE_SIZE)
        except OSError as e:
            if ahead:           # perhaps the pages read ahead: try the caller's alone
                return self.read_pages(start, count)
            raise self.stats.read_error(f"read of pages {start}..{start + n - 1}", e) from None
        waited = (time.perf_counter_ns() - t0) // 1000
        crcs = page_crcs(data, n)
        # Pages marked zero read as zeros whatever the disk holds (in swap mode a discard only
        # marks them); they need no check.
        ok = [v or z for v, z in zip(verify(crcs, pairs), zero)]
        n = _verified(ok, count, start, self.stats)
        if n < len(zero):
            data, crcs, pairs, zero = data[:n * PAGE_SIZE], crcs[:n], pairs[:2 * n], zero[:n]
        if any(zero):
            data = _zero_fill(data, zero)
        if self.sealer is not None:
            data = _unseal(self.sealer, self.stats, start, data, crcs,
                           [d == ZERO or l == ZERO for d, l in zip(pairs[0::2], pairs[1::2])],
                           count)
        self.stats.read(len(data) // PAGE_SIZE, waited)
        return data

    def _read_one(self, i: int) -> bytes:
        """read_pages for a single page, same checks, scalar bookkeeping."""
        self._lock.acquire()        # not `with`: on every 4 KiB read of a page on disk
        try:
            d, l = self._crc[2 * i], self._crc[2 * i + 1]
        finally:
            self._lock.release()
        if d == ZERO and l == ZERO and not self.verify_zero:
            return bytes(PAGE_SIZE)
        t0 = time.perf_counter_ns()
        try:
            data = self._data.pread(i * PAGE_SIZE, PAGE_SIZE)
        except OSError as e:
            raise self.stats.read_error(f"read of page {i}", e) from None
        waited = (time.perf_counter_ns() - t0) // 1000
        c = max(_crc(data), FOLD)
        if not (c == d or c == l or d == UNCHECKED or l == UNCHECKED
                or (c == ZERO_PAGE_CRC and (d == ZERO or l == ZERO))):
            raise self.stats.bad_pages([i], "checksum mismatch")
        if self.sealer is not None:
            data = _unseal(self.sealer, self.stats, i, data, (c,), (d == ZERO or l == ZERO,), 1)
        self.stats.read(1, waited)
        return data

    def unsynced_pages(self) -> list[int]:
        """Pages written or discarded since the last completed sync (a failed sync included),
        ascending."""
        with self._lock:
            return _flagged(self._unsynced)

    # -- writes ------------------------------------------------------------------------------

    def write_pages(self, idxs: list[int], pages) -> None:
        """Write whole pages (any order; contiguous runs go out in one syscall each). `pages`:
        a buffer a page, or one buffer of them all (written as it is where `idxs` is one run).
        DiskError(err) on failure: the pages then read as their old or new bytes."""
        n = len(idxs)
        run = None if isinstance(pages, list) else memoryview(pages).cast("B")
        if run is not None:
            pages = [run[i:i + PAGE_SIZE] for i in range(0, len(run), PAGE_SIZE)]
        if n != len(pages) or sum(map(len, pages)) != n * PAGE_SIZE:
            raise ValueError(f"write_pages: {n} page(s) need {n} buffer(s) of {PAGE_SIZE} bytes")
        if n == 0:
            return
        if n == 1:  # scalar path: no lists for one page
            self._check_range(int(idxs[0]), 1)
            self._write_one(int(idxs[0]), pages[0])
            return
        idx = list(map(int, idxs))
        self._check_range(min(idx), max(idx) - min(idx) + 1)
        if self.sealer is not None:
            pages, ctrs, tags = self._seal(idx, pages)
        crcs = fold(map(_crc, pages))
        if all(map(int.__lt__, idx, idx[1:])):       # ascending
            sidx, spages = idx, pages
            if idx[-1] - idx[0] == n - 1:   # one run: the table's slices, one pwritev
                idx = sidx = range(idx[0], idx[-1] + 1)
                if run is not None and self.sealer is None:
                    spages = [run]
        else:
            order = sorted(range(n), key=idx.__getitem__)
            sidx, spages = [idx[i] for i in order], [pages[i] for i in order]
        with self._lock:
            on_disk = _on_disk(self._crc, self._failed, idx)   # under _lock
            _set_pairs(self._crc, idx, on_disk, crcs)
            vec.scatter(self._inflight, idx, 1)
            vec.scatter(self._unsynced, idx, 1)
        if self.sealer is not None:
            self.sealer.place(idx, on_disk, crcs, ctrs, tags)
        done = 0
        try:
            if not self.ephemeral:
                self._put_meta_blocks(_blocks(sidx))  # pairs first
                if self.sealer is not None:
                    self.sealer.put_blocks(sidx)
            cuts = [] if type(sidx) is range else \
                [i for i in range(1, n) if sidx[i] != sidx[i - 1] + 1]
            t0 = time.perf_counter_ns()
            for a, b in zip([0] + cuts, cuts + [n]):
                self._data.pwritev(sidx[a] * PAGE_SIZE, spages[a:b])   # [run] when one run
                done = b
            waited = (time.perf_counter_ns() - t0) // 1000
        except OSError as e:
            with self._lock:
                vec.scatter(self._failed, sidx[done:], 1)
                vec.scatter(self._inflight, idx, 0)
            raise self.stats.disk_error(f"write of {n - done} page(s) from page {sidx[done]}",
                                        e) from None
        except BaseException:
            with self._lock:
                vec.scatter(self._inflight, idx, 0)
            raise
        with self._lock:
            vec.scatter(self._inflight, idx, 0)
            vec.scatter(self._failed, idx, 0)
        self.stats.wrote(n, len(cuts) + 1, waited)

    def _write_one(self, i: int, data) -> None:
        """write_pages for a single page, same protocol, scalar bookkeeping."""
        if self.sealer is not None:
            (data,), ctrs, tags = self._seal([i], [data])
        c = max(_crc(data), FOLD)
        crc = self._crc
        with self._lock:
            if not self._failed[i]:
                crc[2 * i] = crc[2 * i + 1]
            on_disk = crc[2 * i]
            crc[2 * i + 1] = c
            self._inflight[i] = self._unsynced[i] = 1
        if self.sealer is not None:
            self.sealer.place((i,), (on_disk,), (c,), ctrs, tags)
        try:
            if not self.ephemeral:
                self._put_meta_blocks((i // ENTRIES_PER_BLOCK,))
                if self.sealer is not None:
                    self.sealer.put_blocks((i,))
            t0 = time.perf_counter_ns()
            self._data.pwrite(i * PAGE_SIZE, data)
            waited = (time.perf_counter_ns() - t0) // 1000
        except OSError as e:
            with self._lock:
                self._failed[i] = 1
                self._inflight[i] = 0
            raise self.stats.disk_error(f"write of page {i}", e) from None
        except BaseException:
            with self._lock:
                self._inflight[i] = 0
            raise
        with self._lock:
            self._inflight[i] = self._failed[i] = 0
        self.stats.wrote(1, 1, waited)

    def _seal(self, idxs: list[int], pages: list):
        """sealer.seal, its failure to make the counter's lease durable a DiskError."""
        try:
            return self.sealer.seal(idxs, pages)
        except OSError as e:
            raise self.stats.disk_error("the seal file's counter lease", e) from None

    def discard(self, start: int, count: int) -> None:
        """Drop pages: they read as zeros. Punches the file (except in swap mode, where the
        preallocated space is kept and only the table changes)."""
        self._check_range(start, count)
        if count == 0:
            return
        end = start + count
        crc, inflight, unsynced, failed = self._crc, self._inflight, self._unsynced, self._failed
        with self._lock:
            # Only pairs not already (ZERO, ZERO) change (and a failed page's, whose disk is
            # unknown): writing every pair gave table memory and sidecar writes to pages that
            # never held data, as when mkfs discards a whole disk.
            spans = _changing(crc, failed, start, end)
            for lo, hi, mask in spans:
                if self.ephemeral:
                    vec.fill(crc, 2 * lo, 2 * hi, ZERO)
                    continue
                _discard_pairs(crc, failed, lo, hi)
                _flag(inflight, lo, mask, 1)
                _flag(unsynced, lo, mask, 1)
        if self.ephemeral:
            return
        try:
            self._put_meta_blocks([b for lo, hi, _ in spans        # spans do not share blocks
                                   for b in range(lo // ENTRIES_PER_BLOCK,
                                                  (hi - 1) // ENTRIES_PER_BLOCK + 1)])
            _punch(self._data, start, count, self.sparse)
        except OSError as e:
            with self._lock:
                for lo, _, mask in spans:
                    _flag(failed, lo, mask, 1)
                    _flag(inflight, lo, mask, 0)
            raise self.stats.disk_error(f"discard of pages {start}..{end - 1}", e) from None
        except BaseException:
            with self._lock:
                for lo, _, mask in spans:
                    _flag(inflight, lo, mask, 0)
            raise
        with self._lock:
            for lo, _, mask in spans:
                _flag(inflight, lo, mask, 0)
                _flag(failed, lo, mask, 0)

    def mark_lost(self, pages) -> None:
        """Record that acknowledged data of `pages` never reached the file (a close whose
        write-back failed): they read EIO until written again, and fsck lists them. Writes
        only the sidecar; DiskError if even that fails."""
        idx = sorted(set(map(int, pages)))
        if not idx:
            return
        with self._lock:
            for p in idx:
                self._crc[2 * p] = self._crc[2 * p + 1] = LOST
                self._failed[p] = 0
        if self.ephemeral:
            return
        try:
            self._put_meta_blocks(_blocks(idx))
            self._meta.fsync()
        except OSError as e:
            raise self.stats.disk_error(f"marking {len(idx)} lost page(s) in the sidecar",
                                        e) from None

    # -- durability --------------------------------------------------------------------------

    def sync(self) -> None:
        """Make every page written so far durable (see the module docstring for the order).
        DiskError on failure; the pages then keep both their values."""
        if self._closed:
            raise BackingError(f"{self.path}: backing is closed")
        crc, unsynced, inflight, failed = self._crc, self._unsynced, self._inflight, self._failed
        with self._sync_lock:
            with self._lock:
                cand = [p for p in _flagged(unsynced) if not (inflight[p] or failed[p])]
                snap = [crc[2 * p + 1] for p in cand]
            if self.ephemeral or self.read_only:    # no sidecar to write
                with self._lock:
                    for p, s in zip(cand, snap):
                        crc[2 * p] = s
                        unsynced[p] = 0
                return
            try:
                self._meta.fsync()  # (1) the pairs covering the data about to be made durable
                if self.sealer is not None:
                    self.sealer.fsync()     # ... and the seals to decrypt it
                self._data.fsync()  # (2)
            except OSError as e:
                raise self.stats.disk_error("fsync", e) from None
            with self._lock:  # (3) collapse what (2) covered and nobody rewrote since
                keep = [p for p, s in zip(cand, snap) if crc[2 * p + 1] == s]
                for p in keep:
                    crc[2 * p] = crc[2 * p + 1]
                    unsynced[p] = 0
            try:
                self._put_meta_blocks(_blocks(keep))
                self._meta.fsync()
            except OSError as e:
                raise self.stats.disk_error("sidecar update", e) from None

    def close(self, clean: bool = True) -> None:
        """Release the file. `clean=True` syncs and marks the sidecar clean (an error then
        propagates, still releasing everything); `clean=False` writes nothing (a crash, or a
        caller that has given up). Idempotent."""
        if self._closed:
            return
        try:
            if clean and not (self.ephemeral or self.read_only):
                self.sync()
                st = os.fstat(self._lock_fd)
                self._meta.pwrite(0, pack_header(self.size, True, st.st_mtime_ns, st.st_ino,
                                                 encrypted=self.sealer is not None))
                self._meta.fsync()
        except OSError as e:
            raise self.stats.disk_error("clean close", e) from None
        finally:
            self._closed = True
            for d in (self._meta, self._data, self.sealer):
                if d is not None:
                    try:
                        d.close()
                    except OSError as e:
                        log.warning("%s: close: %s", self.path, e)
            os.close(self._lock_fd)  # releases the flock

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(clean=exc_type is None)


# ---------------------------------------------------------------------------------------------
# helpers of Backing


def _verified(ok: list[bool], count: int, start: int, stats: DiskStats) -> int:
    """How many pages of a read from page `start` to return, given which verified (`ok`): all,
    or the caller's `count` and the verified ones after them. DataError naming the bad pages
    among the caller's."""
    if all(ok):
        return len(ok)
    bad = [start + i for i in range(count) if not ok[i]]
    if bad:
        raise stats.bad_pages(bad, "checksum mismatch")
    return ok.index(False, count)


def _unseal(sealer: Sealer, stats: DiskStats, first: int, data, crcs, maybe_zero,
            count: int) -> bytes:
    """The plaintext of verified ciphertexts of pages from `first`, up to the first whose tag
    does not verify; DataError (EIO, checksum_errors) naming those among the first `count`."""
    plain, bad = sealer.unseal(first, data, crcs, maybe_zero)
    if bad:
        if min(bad) < first + count:
            raise stats.bad_pages([p for p in bad if p < first + count],
                                  "authentication tag mismatch")
        plain = plain[:(min(bad) - first) * PAGE_SIZE]
    return plain


def _zero_fill(data: bytes, zero: list[bool]) -> bytes:
    """`data` (pages) with the pages where `zero` is True replaced by zeros."""
    buf = bytearray(data)
    z = bytes(PAGE_SIZE)
    for i in compress(range(len(zero)), zero):
        o = i * PAGE_SIZE
        if buf[o:o + PAGE_SIZE] != z:
            buf[o:o + PAGE_SIZE] = z
    return bytes(buf)


def _on_disk(crc: memoryview, failed: memoryview, pages) -> list[int]:
    """The value of what the disk holds for `pages` now, barring a crash: latest when the last
    write completed (it equals durable right after a sync), durable when it failed (what landed
    is unknown; durable at least is covered)."""
    if type(pages) is range and 1 not in bytes(failed[pages.start:pages.stop]):
        return crc[2 * pages.start + 1:2 * pages.stop:2].tolist()
    return [crc[2 * p] if failed[p] else crc[2 * p + 1] for p in pages]


def _set_pairs(crc: memoryview, pages, durable, latest) -> None:
    """The pairs of `pages` := (durable, latest), two lists of values; a run's by two slice
    assignments."""
    if type(pages) is range:
        crc[2 * pages.start:2 * pages.stop:2] = array("I", durable)
        crc[2 * pages.start + 1:2 * pages.stop:2] = array("I", latest)
        return
    for p, d, l in zip(pages, durable, latest):
        crc[2 * p] = d
        crc[2 * p + 1] = l


def _changing(crc: memoryview, failed: memoryview, start: int,
              end: int) -> list[tuple[int, int, bytes]]:
    """The pages of start .. end whose pair is not (ZERO, ZERO) or whose last write failed, as
    spans (lo, hi, 0/1 mask of them in lo .. hi) over the runs of sidecar blocks that hold
    them; found in C, a step of SCAN_ROWS at a time."""
    spans = []
    lo = start
    while lo < end:
        hi = min(end, (lo // SCAN_ROWS + 1) * SCAN_ROWS)    # blocks do not cross steps
        mask = used_rows(crc, lo, hi)
        bad = bytes(failed[lo:hi])
        if 1 in bad:
            mask = vec.mask_or(mask, bad)
        blocks = []
        i = mask.find(1)
        while i >= 0:
            blocks.append((lo + i) // ENTRIES_PER_BLOCK)
            i = mask.find(1, (blocks[-1] + 1) * ENTRIES_PER_BLOCK - lo)
        for a, b in vec.runs(blocks):
            a, b = max(lo, a * ENTRIES_PER_BLOCK), min(hi, b * ENTRIES_PER_BLOCK)
            spans.append((a, b, mask[a - lo:b - lo]))
        lo = hi
    return spans


def _discard_pairs(crc: memoryview, failed: memoryview, lo: int, hi: int) -> None:
    """Pairs lo .. hi := (what the disk holds (_on_disk), ZERO), for a whole span in C:
    the pairs in it that do not change are (ZERO, ZERO) and not failed, and stay so."""
    held = [(p, crc[2 * p]) for p in _flagged(failed, lo, hi)]
    crc[2 * lo:2 * hi:2] = crc[2 * lo + 1:2 * hi:2]
    for p, d in held:
        crc[2 * p] = d
    crc[2 * lo + 1:2 * hi:2] = array("I", bytes(4 * (hi - lo)))    # ZERO


def _blocks(pages) -> list[int]:
    """The sidecar blocks holding the pairs of `pages`, ascending."""
    return sorted({p // ENTRIES_PER_BLOCK for p in pages})


def _flagged(flags: memoryview, start: int = 0, end: int | None = None) -> list[int]:
    """The pages in start .. end whose 0/1 flag is set, ascending: a step of SCAN_ROWS at a
    time (no temporary the disk's size)."""
    end = len(flags) if end is None else end
    out: list[int] = []
    for lo in range(start, end, SCAN_ROWS):
        out += vec.positions(flags[lo:min(lo + SCAN_ROWS, end)], lo)
    return out


def _flag(flags: memoryview, lo: int, mask: bytes, value: int) -> None:
    """Set the 0/1 flags of the pages from `lo` where the 0/1 `mask` is 1 to `value`."""
    old = bytes(flags[lo:lo + len(mask)])
    flags[lo:lo + len(mask)] = vec.mask_or(old, mask) if value else \
        vec.mask_and(old, vec.mask_not(mask))


def _punch(disk, start: int, count: int, sparse: bool) -> None:
    """Zero pages start .. start+count on `disk`. The space stays reserved unless the file is
    `sparse`: a punch alone would give it back, and a later write there could meet ENOSPC."""
    offset, length = start * PAGE_SIZE, count * PAGE_SIZE
    try:
        if sparse:
            disk.punch(offset, length)
        else:
            try:
                disk.zero_range(offset, length)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                disk.punch(offset, length)
                disk.prealloc(offset, length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):  # no hole punching here
            raise
        zeros = bytes(PAGE_SIZE)
        for o in range(start, start + count, 256):
            k = min(256, start + count - o)
            disk.pwritev(o * PAGE_SIZE, [zeros] * k)


# ---------------------------------------------------------------------------------------------
# fsck


# fsck exit codes, as e2fsck's: scripts can tell a clean image from one that needs action
FSCK_CLEAN = 0       # closed cleanly, every page verified
FSCK_PROBLEMS = 1    # readable, but not closed cleanly or with pages written since the last sync
FSCK_DAMAGE = 4      # bad or lost pages, or a sidecar that cannot be used: some pages read EIO
FSCK_USAGE = 8       # not checked: missing, not a file, in use


@dataclass
class FsckReport:
    """What `fsck` found."""

    path: str
    size: int = 0
    npages: int = 0
    version: int | None = None
    closed_cleanly: bool = False  # the last mount ended with a clean close
    checked_pages: int = 0  # pages read and compared with their checksums
    zero_pages: int = 0  # marked zero (never written or discarded)
    unchecked_pages: int = 0  # no checksum to compare with
    inflight_pages: int = 0  # two checksums (written since the last sync); either may match
    bad_pages: list[int] = field(default_factory=list)  # data matches neither checksum
    lost_pages: list[int] = field(default_factory=list)  # write-back failed at close
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == FSCK_CLEAN

    @property
    def exit_code(self) -> int:
        if self.errors or self.bad_pages or self.lost_pages:
            return FSCK_DAMAGE
        if not self.closed_cleanly or self.inflight_pages or self.notes:
            return FSCK_PROBLEMS
        return FSCK_CLEAN

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exit_code"] = self.exit_code
        return d

    def summary(self) -> str:
        state = "closed cleanly" if self.closed_cleanly else "NOT closed cleanly"
        lines = [f"{self.path}: {human(self.size)}, {self.npages} pages, {state}"]
        lines.append(f"  {self.checked_pages} checked, {self.zero_pages} never written or "
                     f"discarded, {self.unchecked_pages} without checksum, "
                     f"{self.inflight_pages} written since the last sync")
        for label, pages in (("bad (data matches no checksum)", self.bad_pages),
                             ("lost (write-back failed at unmount)", self.lost_pages)):
            if pages:
                shown = ", ".join(map(str, pages[:20]))
                more = f" (+{len(pages) - 20} more)" if len(pages) > 20 else ""
                lines.append(f"  {len(pages)} {label}, they read EIO: {shown}{more}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  error: {e}" for e in self.errors]
        verdict = {FSCK_CLEAN: "clean", FSCK_PROBLEMS: "problems found",
                   FSCK_DAMAGE: "damaged: some pages read EIO until rewritten"}[self.exit_code]
        lines.append(f"{verdict} (exit {self.exit_code})")
        return "\n".join(lines)


def fsck(path: str, key: bytes | None = None) -> FsckReport:
    """Check an unmounted backing file: sidecar header, size, and every page against its
    checksums (zero-marked pages must read as zeros), and for an encrypted image with its `key`
    every page's authentication tag. BackingError if the file is missing or not a file, or the
    key is wrong; BackingLocked if it is in use. Reads through the page cache and drops it."""
    path = os.path.abspath(os.fspath(path))
    st = stat_backing(path)
    if st is None:
        raise BackingError(f"{path} does not exist")
    rep = FsckReport(path=path, size=st.st_size, npages=st.st_size // PAGE_SIZE)
    sealer = None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise BackingError(f"{path}: cannot open: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackingLocked(f"{path} is in use (mounted?)") from None
        if st.st_size % PAGE_SIZE:
            rep.errors.append(f"size {st.st_size} is not a multiple of {PAGE_SIZE}")
            return rep
        mpath = meta_path(path)
        try:
            with open(mpath, "rb") as f:
                raw_head = f.read(HEADER_SIZE)
                head = parse_header(raw_head, mpath)
                rep.version, rep.closed_cleanly = head.version, head.clean
                rows = table_rows(rep.npages)
                raw = f.read(rows * ENTRY_SIZE)
        except FileNotFoundError:
            rep.errors.append(f"no sidecar {mpath}: pages cannot be checked")
            return rep
        except BackingError as e:
            rep.errors.append(str(e))
            return rep
        if head.size != st.st_size:
            rep.errors.append(f"sidecar is for {head.size} bytes, file has {st.st_size}")
            return rep
        if head.encrypted and key is None:
            rep.notes.append("encrypted: the pages' authentication tags were not checked "
                             "(give --key-file)")
        elif head.encrypted:
            sealer = Sealer.open(path, st.st_size, key)     # a wrong key raises
        elif key is not None:
            rep.notes.append("not encrypted: --key-file is not used")
        if len(raw) != rows * ENTRY_SIZE:
            rep.errors.append("sidecar is truncated")
            return rep
        table = memoryview(raw).cast("I")
        if head.clean and st.st_mtime_ns != head.mtime_ns:
            rep.notes.append("file modified since its last clean unmount (mtime); if that was "
                             "on purpose, remove the sidecar to import the image unchecked")
        if not head.clean:
            rep.notes.append("not closed cleanly (crash?): pages written since the last sync "
                             "may read as their old bytes or EIO")
        for start in range(0, rep.npages, PAGE_RUN):
            count = min(PAGE_RUN, rep.npages - start)
            pairs = table[2 * start:2 * (start + count)].tolist()
            if head.version == 1:
                pairs = [FOLD if v == 2 else v for v in pairs]
            durable, latest = pairs[0::2], pairs[1::2]
            rep.zero_pages += sum(not (d or l) for d, l in zip(durable, latest))
            rep.unchecked_pages += sum(d == UNCHECKED or l == UNCHECKED
                                       for d, l in zip(durable, latest))
            rep.inflight_pages += sum(map(int.__ne__, durable, latest))
            lost = [d == LOST and l == LOST for d, l in zip(durable, latest)]
            rep.lost_pages += vec.positions(lost, start)
            data = os.pread(fd, count * PAGE_SIZE, start * PAGE_SIZE)
            if len(data) < count * PAGE_SIZE:
                data += bytes(count * PAGE_SIZE - len(data))
            os.posix_fadvise(fd, start * PAGE_SIZE, count * PAGE_SIZE, os.POSIX_FADV_DONTNEED)
            crcs = page_crcs(data, count)
            ok = verify(crcs, pairs)
            if sealer is not None:
                _, bad = sealer.unseal(start, data, crcs, [d == ZERO or l == ZERO
                                                           for d, l in zip(durable, latest)])
                for p in bad:
                    ok[p - start] = False
            # lost pages are listed as lost, not as bad
            rep.bad_pages += [start + i for i in range(count) if not (ok[i] or lost[i])]
        rep.checked_pages = rep.npages - rep.unchecked_pages - len(rep.lost_pages)
        return rep
    finally:
        if sealer is not None:
            sealer.close()
        os.close(fd)
