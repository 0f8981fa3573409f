"""Backing store: the raw disk image, its `.zbmeta` checksum sidecar, and the file lock.

The backing file is a raw image at the same offsets as the FUSE `disk` file (after a clean
unmount it is usable directly with losetup). Beside it, `PATH.zbmeta` holds a header and, per
page, two CRC32C values (durable, latest) with three sentinels: ZERO (reads as zeros), UNCHECKED
(imported without a sidecar) and LOST (reads EIO); zblock.sidecar has the format. In memory the
pairs are the numpy table `_crc`, whose 4 KiB blocks are the sidecar's, so a touched block is
written straight from the table. zblock.backing_open opens, creates, locks and reserves the
files, loads the table (only the blocks that hold entries) and settles the pairs a crash left;
this module serves I/O on what it opened, and checks unmounted images (fsck).

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
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import PAGE_SIZE
from .backing_open import DiskFactory, Opened, human, open_files, stat_backing
from .diskstats import DiskStats
from .errors import BackingError, BackingLocked, OutOfRange
from . import pagemem
from .seal import Sealer
from .sidecar import (ENTRIES_PER_BLOCK, ENTRY_SIZE, FOLD, HEADER_SIZE, LOST, PAGE_RUN,
                      UNCHECKED, ZERO, ZERO_PAGE_CRC, crc as _crc, fold, meta_path, pack_header,
                      page_crcs, parse_header, row_steps, table_rows, verify)

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
        self._crc = opened.table  # (rows, 2) uint32: durable, latest
        self.sealer = opened.sealer  # --encrypt: pages are sealed on their way to the file
        self._loaded = opened.loaded  # rows that may be other than (ZERO, ZERO) as opened
        n = self.npages
        self._unsynced = pagemem.zeros(n, bool)  # written/discarded since the last sync
        self._inflight = pagemem.zeros(n, bool)  # disk write or punch in progress
        self._failed = pagemem.zeros(n, bool)  # last write failed: keep both values across sync
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

    def _on_disk(self, pages) -> np.ndarray:
        """Caller holds _lock. The value of what the disk holds for `pages` now, barring a
        crash: latest when the last write completed (it equals durable right after a sync),
        durable when it failed (what landed is unknown; durable at least is covered)."""
        return np.where(self._failed[pages], self._crc[pages, 0], self._crc[pages, 1])

    def _put_meta_blocks(self, blocks) -> None:
        """Write sidecar blocks from the table. Each block's snapshot is taken and written under
        its stripe lock, so versions of a block reach the file in snapshot order."""
        for b in blocks:
            b = int(b)
            with self._stripes[b % self._NSTRIPES]:
                with self._lock:
                    buf = self._crc[b * ENTRIES_PER_BLOCK:(b + 1) * ENTRIES_PER_BLOCK].tobytes()
                self._meta.pwrite(HEADER_SIZE + b * PAGE_SIZE, buf)

    # -- reads -------------------------------------------------------------------------------

    def written_mask(self) -> np.ndarray:
        """Bool per page: the file may hold data for it (not marked zero), as opened. The
        cache starts with these pages on disk and serves the others as zeros without a read."""
        if self.verify_zero:
            return np.ones(self.npages, bool)
        # Set only where True, from each pair read as one uint64 (0 is (ZERO, ZERO)), over the
        # rows loaded at open: comparing each value built temporaries of 3 bytes a page.
        mask = np.zeros(self.npages, bool)
        pairs = self._crc.view(np.uint64)[:, 0]
        with self._lock:
            for rows in row_steps(self._loaded, self.npages):
                mask[np.flatnonzero(pairs[rows]) + rows.start] = True
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
            pair = self._crc[start:start + n].copy()
        zero = (pair[:, 0] == ZERO) & (pair[:, 1] == ZERO)
        if self.verify_zero:
            zero[:] = False     # check them like written pages (_verify: zeros match ZERO)
        if zero.all():
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
        n = _verified(verify(crcs, pair) | zero, count, start, self.stats)
        if n < len(zero):
            data, crcs, pair, zero = data[:n * PAGE_SIZE], crcs[:n], pair[:n], zero[:n]
        if zero.any():
            data = _zero_fill(data, zero)
        if self.sealer is not None:
            data = _unseal(self.sealer, self.stats, start, data, crcs,
                           (pair == ZERO).any(axis=1) | zero, count)
        self.stats.read(len(data) // PAGE_SIZE, waited)
        return data

    def _read_one(self, i: int) -> bytes:
        """read_pages for a single page, same checks, scalar bookkeeping."""
        self._lock.acquire()        # not `with`: on every 4 KiB read of a page on disk
        try:
            d, l = self._crc[i].tolist()
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

    def unsynced_pages(self) -> np.ndarray:
        """Pages written or discarded since the last completed sync (a failed sync included)."""
        with self._lock:
            return np.flatnonzero(self._unsynced)

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
        if n == 1:  # scalar path: numpy's per-call overhead dominates one page
            self._check_range(int(idxs[0]), 1)
            self._write_one(int(idxs[0]), pages[0])
            return
        if type(idxs) is range and idxs.step == 1:
            idx = np.arange(idxs.start, idxs.stop, dtype=np.int64)
        else:
            idx = np.fromiter(idxs, np.int64, n)
        self._check_range(int(idx.min()), int(idx.max() - idx.min()) + 1)
        if self.sealer is not None:
            pages, ctrs, tags = self._seal(idx.tolist(), pages)
        crcs = fold(np.fromiter(map(_crc, pages), np.uint32, n))
        if run is not None and self.sealer is None and (np.diff(idx) == 1).all():
            sidx, spages = idx, [run]
        elif not (np.diff(idx) > 0).all():
            order = np.argsort(idx, kind="stable")
            sidx = idx[order]
            spages = [pages[i] for i in order.tolist()]
        else:
            sidx, spages = idx, pages
        with self._lock:
            on_disk = self._on_disk(idx)
            self._crc[idx, 0] = on_disk
            self._crc[idx, 1] = crcs
            self._inflight[idx] = True
            self._unsynced[idx] = True
        if self.sealer is not None:
            self.sealer.place(idx, on_disk, crcs, ctrs, tags)
        done = 0
        try:
            if not self.ephemeral:
                self._put_meta_blocks(np.unique(sidx // ENTRIES_PER_BLOCK))  # pairs first
                if self.sealer is not None:
                    self.sealer.put_blocks(sidx)
            cuts = (np.flatnonzero(np.diff(sidx) != 1) + 1).tolist()
            t0 = time.perf_counter_ns()
            for a, b in zip([0] + cuts, cuts + [n]):
                self._data.pwritev(int(sidx[a]) * PAGE_SIZE, spages[a:b])   # [run] when one run
                done = b
            waited = (time.perf_counter_ns() - t0) // 1000
        except OSError as e:
            with self._lock:
                self._failed[sidx[done:]] = True
                self._inflight[idx] = False
            raise self.stats.disk_error(f"write of {n - done} page(s) from page {int(sidx[done])}", e) from None
        except BaseException:
            with self._lock:
                self._inflight[idx] = False
            raise
        with self._lock:
            self._inflight[idx] = False
            self._failed[idx] = False
        self.stats.wrote(n, len(cuts) + 1, waited)

    def _write_one(self, i: int, data) -> None:
        """write_pages for a single page, same protocol, scalar bookkeeping."""
        if self.sealer is not None:
            (data,), ctrs, tags = self._seal([i], [data])
        c = max(_crc(data), FOLD)
        crc = self._crc
        with self._lock:
            if not self._failed[i]:
                crc[i, 0] = crc[i, 1]
            on_disk = int(crc[i, 0])
            crc[i, 1] = c
            self._inflight[i] = True
            self._unsynced[i] = True
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
                self._failed[i] = True
                self._inflight[i] = False
            raise self.stats.disk_error(f"write of page {i}", e) from None
        except BaseException:
            with self._lock:
                self._inflight[i] = False
            raise
        with self._lock:
            self._inflight[i] = False
            self._failed[i] = False
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
        with self._lock:
            # Only pairs not already (ZERO, ZERO) change (and a failed page's, whose disk is
            # unknown): writing every pair gave table memory and sidecar writes to pages that
            # never held data, as when mkfs discards a whole disk.
            pairs = self._crc.view(np.uint64)[start:end, 0]
            idx = np.flatnonzero((pairs != 0) | self._failed[start:end]) + start
            if self.ephemeral:
                self._crc[idx] = ZERO
                return
            self._crc[idx, 0] = self._on_disk(idx)
            self._crc[idx, 1] = ZERO
            self._inflight[idx] = True
            self._unsynced[idx] = True
        try:
            self._put_meta_blocks(np.unique(idx // ENTRIES_PER_BLOCK))
            _punch(self._data, start, count, self.sparse)
        except OSError as e:
            with self._lock:
                self._failed[idx] = True
                self._inflight[idx] = False
            raise self.stats.disk_error(f"discard of pages {start}..{end - 1}", e) from None
        except BaseException:
            with self._lock:
                self._inflight[idx] = False
            raise
        with self._lock:
            self._inflight[idx] = False
            self._failed[idx] = False

    def mark_lost(self, pages) -> None:
        """Record that acknowledged data of `pages` never reached the file (a close whose
        write-back failed): they read EIO until written again, and fsck lists them. Writes
        only the sidecar; DiskError if even that fails."""
        idx = np.unique(np.asarray(pages, np.int64))
        if not len(idx):
            return
        with self._lock:
            self._crc[idx] = LOST
            self._failed[idx] = False
        if self.ephemeral:
            return
        try:
            self._put_meta_blocks(np.unique(idx // ENTRIES_PER_BLOCK))
            self._meta.fsync()
        except OSError as e:
            raise self.stats.disk_error(f"marking {len(idx)} lost page(s) in the sidecar", e) from None

    # -- durability --------------------------------------------------------------------------

    def sync(self) -> None:
        """Make every page written so far durable (see the module docstring for the order).
        DiskError on failure; the pages then keep both their values."""
        if self._closed:
            raise BackingError(f"{self.path}: backing is closed")
        with self._sync_lock:
            with self._lock:
                # the unsynced pages first: three full-size temporaries cost 768 MiB at 1 TiB
                cand = np.flatnonzero(self._unsynced)
                cand = cand[~self._inflight[cand] & ~self._failed[cand]]
                snap = self._crc[cand, 1].copy()
            if self.ephemeral or self.read_only:    # no sidecar to write
                with self._lock:
                    self._crc[cand, 0] = snap
                    self._unsynced[cand] = False
                return
            try:
                self._meta.fsync()  # (1) the pairs covering the data about to be made durable
                if self.sealer is not None:
                    self.sealer.fsync()     # ... and the seals to decrypt it
                self._data.fsync()  # (2)
            except OSError as e:
                raise self.stats.disk_error("fsync", e) from None
            with self._lock:  # (3) collapse what (2) covered and nobody rewrote since
                still = self._crc[cand, 1] == snap
                keep = cand[still]
                self._crc[keep, 0] = snap[still]
                self._unsynced[keep] = False
            try:
                self._put_meta_blocks(np.unique(keep // ENTRIES_PER_BLOCK))
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


def _verified(ok: np.ndarray, count: int, start: int, stats: DiskStats) -> int:
    """How many pages of a read from page `start` to return, given which verified (`ok`): all,
    or the caller's `count` and the verified ones after them. DataError naming the bad pages
    among the caller's."""
    if ok.all():
        return len(ok)
    if not ok[:count].all():
        raise stats.bad_pages((np.flatnonzero(~ok[:count]) + start).tolist(), "checksum mismatch")
    return count + int(np.argmin(ok[count:]))


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


def _zero_fill(data: bytes, zero: np.ndarray) -> bytes:
    """`data` (pages) with the pages where `zero` is True replaced by zeros."""
    idx = np.flatnonzero(zero)
    buf = bytearray(data)
    z = bytes(PAGE_SIZE)
    for i in idx.tolist():
        o = i * PAGE_SIZE
        if buf[o:o + PAGE_SIZE] != z:
            buf[o:o + PAGE_SIZE] = z
    return bytes(buf)


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
        table = np.frombuffer(raw, "<u4").reshape(rows, 2)[:rep.npages]
        if head.version == 1:
            table = np.where(table == 2, FOLD, table).astype(np.uint32)
        if head.clean and st.st_mtime_ns != head.mtime_ns:
            rep.notes.append("file modified since its last clean unmount (mtime); if that was "
                             "on purpose, remove the sidecar to import the image unchecked")
        if not head.clean:
            rep.notes.append("not closed cleanly (crash?): pages written since the last sync "
                             "may read as their old bytes or EIO")
        d, l = table[:, 0], table[:, 1]
        rep.zero_pages = int(((d == ZERO) & (l == ZERO)).sum())
        rep.unchecked_pages = int(((d == UNCHECKED) | (l == UNCHECKED)).sum())
        rep.inflight_pages = int((d != l).sum())
        lost = (d == LOST) & (l == LOST)
        rep.lost_pages = np.flatnonzero(lost).tolist()
        for start in range(0, rep.npages, PAGE_RUN):
            count = min(PAGE_RUN, rep.npages - start)
            data = os.pread(fd, count * PAGE_SIZE, start * PAGE_SIZE)
            if len(data) < count * PAGE_SIZE:
                data += bytes(count * PAGE_SIZE - len(data))
            os.posix_fadvise(fd, start * PAGE_SIZE, count * PAGE_SIZE, os.POSIX_FADV_DONTNEED)
            crcs = page_crcs(data, count)
            pair = table[start:start + count]
            ok = verify(crcs, pair)
            if sealer is not None:
                _, bad = sealer.unseal(start, data, crcs, (pair == ZERO).any(axis=1))
                ok[np.asarray(bad, np.int64) - start] = False
            ok |= lost[start:start + count]     # listed as lost, not as bad
            rep.bad_pages += (np.flatnonzero(~ok) + start).tolist()
        rep.checked_pages = rep.npages - rep.unchecked_pages - len(rep.lost_pages)
        return rep
    finally:
        if sealer is not None:
            sealer.close()
        os.close(fd)
