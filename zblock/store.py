"""The store: byte ranges over the page cache and the backing file, with block-device semantics.

Turns any offset and length into whole-page operations on the cache. Partial pages are
read-modify-write under the page's lock, so concurrent writers to different bytes of one page do
not lose each other's bytes; a whole-page store needs no page lock (the cache installs it
atomically and writeback re-validates). Requests are cut into 1 MiB pieces: the largest the
kernel sends, and the batch the acomp layer spreads across the cores.

What it does not do: FUSE (fuse_ops.py), policy (cache.py), files (backing.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import psutil

from . import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE
from .backing import Backing
from .cache import Cache
from .config import (PARAMS, RECOMPRESS_TYPES, SWAP_NO_CUTOFF, WRITEBACK_TYPES, Config,
                     parse_algorithm)
from .errors import ConfigError, OutOfRange
from .far import FarTier, instance_id
from .pool import Trimmer
from .readahead import Readahead
from .seal import ROW_BYTES, read_key_file
from .staging import WriteBehind

log = logging.getLogger(__name__)

CHUNK_PAGES = 256
# Whole-page writes wait in a write-behind queue of at most this many bytes (counting those
# being stored), so the next FUSE request is received while two are stored (staging.py): one
# 1 MiB request waiting beside the workers' two. 0 stores synchronously.
WRITE_BEHIND_BYTES = 3 << 20
# Writes of 2 pages up to this size are stored at once: waking the worker costs more than it
# overlaps. Single pages are queued as well, but stored in batches (WriteBehind.put_page).
WRITE_BEHIND_MIN = 64 << 10
# swap mode: give freed memory back only after this many seconds without cache activity
SWAP_TRIM_QUIET = 2.0
# Memory of the per-page tables once every page of the disk is used, checked against the
# machine's memory at open: the entry table 31 bytes and its object slot 8, the backing's checksum
# pair and flags 11, the write-behind queue's count and flag 3.
TABLE_BYTES_PER_PAGE = 53
SEAL_BYTES_PER_PAGE = ROW_BYTES     # --encrypt: each page's two seal slots (zblock.seal)
# Params whose change makes a new current pool (zswap: a new compressor is a new pool).
# Write-only files under params/ (zram's attributes of that kind): reading one shows what it takes.
ACTIONS = {
    "idle": "write `all` to mark every cached page idle, or SECONDS to mark those not read or "
            "written for that long; an access clears the mark (stats: idle_pages)",
    "writeback": "write " + ", ".join(WRITEBACK_TYPES) + ": write those cached pages to the backing "
                 "file now, within writeback_limit (stats: writeback_progress, written_back_on_demand)",
    "recompress": "write `type=idle|huge|huge_idle [threshold=BYTES] [algo=NAME]`: compress those "
                  "cached pages again with algo, or recomp_algorithm in priority order, and keep "
                  "the smaller (stats: recompressed_pages, recompress_saved_bytes)",
    "compact": "write 1: give the pool's free memory back to the system now (stats: "
               "compact_freed_bytes)",
}

POOL_PARAMS = {"compressor", "zstd_level", "accelerator", "hw_queues", "hw_depth", "hw_latency_us",
               "hw_throughput_mbps", "hw_mode", "hw_batch", "hw_fault_rate", "hw_seed", "contexts"}


def check_table_fits(size: int, memory_total: int | None = None, encrypt: bool = False) -> None:
    """ConfigError unless the per-page tables of a disk of `size` bytes, every page used, fit in
    `memory_total` bytes (default: this machine's memory)."""
    total = psutil.virtual_memory().total if memory_total is None else memory_total
    per_page = TABLE_BYTES_PER_PAGE + (SEAL_BYTES_PER_PAGE if encrypt else 0)
    need = (size >> PAGE_SHIFT) * per_page
    if need > total:
        raise ConfigError(f"a disk of {_size_text(size)} needs up to {_size_text(need)} of memory "
                          f"for its page tables ({per_page} bytes a page once every "
                          f"page is used), more than this machine's {_size_text(total)}")


def _size_text(n: int) -> str:
    return f"{n / (1 << 40):.1f} TiB" if n >= 1 << 40 else f"{n / (1 << 30):.1f} GiB"


def _release_nothing() -> int:
    """A swap-mode store's release without the daemon's: memory stays as it is (0 bytes)."""
    return 0


class Store:
    """A disk of `size` bytes: read, write, discard, fsync, close. Thread-safe."""

    def __init__(self, backing, config: Config, *, memory_pressure=None, engine_factory=None,
                 write_behind: int = WRITE_BEHIND_BYTES, release_memory=None):
        """`release_memory()` (swap mode; the daemon's zblock.memory.release_free_memory) gives
        back memory the pool freed although mlockall holds it; None releases nothing."""
        self.backing = backing
        self.config = config
        self.size = backing.size
        self.npages = self.size >> PAGE_SHIFT
        on_disk = backing.written_mask()
        far = None
        if config.far:
            far = FarTier.connect(config.far, instance_id(backing.path),
                                  replicas=config.far_replicas, timeout=config.far_timeout,
                                  auth_file=config.far_auth_file or None,
                                  tls_ca=config.far_tls_ca, tls_cert=config.far_tls_cert,
                                  tls_key=config.far_tls_key, sealer=backing.sealer)
        try:
            self.cache = Cache(self.npages, config, backing, on_disk=on_disk,
                               memory_pressure=memory_pressure, engine_factory=engine_factory,
                               far=far)
        except BaseException:
            if far is not None:
                far.close()
            raise
        if config.swap:
            # after a burst of swap, give the locked memory the pool freed back (not per page:
            # the unlock-trim-relock costs tens of ms; not during the burst: see Trimmer.quiet)
            self.cache.trimmer = Trimmer(threshold=max(config.pool_limit // 4, 8 << 20),
                                         min_interval=5.0, release=release_memory or _release_nothing,
                                         quiet=SWAP_TRIM_QUIET)
        # When the queue runs empty its request buffers are free heap: have them trimmed, within
        # the trimmer's interval. (In swap mode a trim unlocks and relocks the whole server and
        # the queue runs empty between most swap-out bursts: forcing one each time doubled the
        # swap benchmark's wall time, 24.5 s against 47.3 s.)
        self.staging = WriteBehind(self.cache.store_pages, self.npages, write_behind,
                                   on_idle=self.cache.request_trim,
                                   store_scattered=self.cache.store_pages) \
            if write_behind else None
        self.readahead = Readahead(self.cache, self.npages)
        self._param_lock = threading.Lock()
        self._closed = False
        self._proc = psutil.Process()
        self.compact_freed_bytes = 0

    @classmethod
    def open(cls, backing_path: str, size: int | None, config: Config, *, disk_factory=None,
             progress=None, memory_total: int | None = None, **kw) -> "Store":
        """Open or create the disk. ConfigError, before any file is made, if its tables would
        not fit in `memory_total` bytes (default: this machine's memory) once every page is
        used: they are outside pool_limit, so the OOM killer, not a message, would stop them."""
        disk_size = size
        if size is None:
            try:
                disk_size = os.stat(backing_path).st_size
            except OSError:
                pass                # Backing.open says what is wrong
        if isinstance(disk_size, int) and disk_size > 0:
            check_table_fits(disk_size, memory_total, config.encrypt)
        key = read_key_file(config.key_file) if config.key_file else None
        backing = Backing.open(backing_path, size, ephemeral=config.swap, sparse=config.sparse,
                               read_only=config.read_only, encrypt=config.encrypt, key=key,
                               disk_factory=disk_factory, progress=progress)
        try:
            return cls(backing, config, **kw)
        except BaseException:
            backing.close(clean=False)
            raise

    # =========================================================================================
    # I/O

    def read(self, offset: int, length: int) -> bytes:
        if length == PAGE_SIZE and not offset & PAGE_MASK and 0 <= offset < self.size:
            # one aligned page (random 4 KiB I/O): every layer below costs per call
            page = offset >> PAGE_SHIFT
            if self.staging:
                self.staging.wait_range(page, 1)
            return self.cache.load_page(page)
        if offset < 0 or length < 0:
            raise OutOfRange(f"read at {offset} of {length} bytes")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        p0, p1 = offset >> PAGE_SHIFT, (end + PAGE_MASK) >> PAGE_SHIFT
        if self.staging:
            self.staging.wait_range(p0, p1 - p0)
        parts = []
        for lo in range(p0, p1, CHUNK_PAGES):
            parts.append(self.readahead.load(lo, min(CHUNK_PAGES, p1 - lo)))
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        skip = offset - (p0 << PAGE_SHIFT)
        if skip == 0 and len(data) == end - offset:
            return data
        return bytes(memoryview(data)[skip:skip + end - offset])

    def write(self, offset: int, data) -> int:
        if (type(data) is bytes and len(data) == PAGE_SIZE and not offset & PAGE_MASK
                and 0 <= offset < self.size):
            # one aligned page, the fast path (see read): queued, and stored with the 4 KiB
            # writes around it in one batch (WriteBehind.put_page)
            self.cache.check_worker()
            page = offset >> PAGE_SHIFT
            if self.staging:
                self.staging.put_page(page, data)
            else:
                self.cache.store_pages(page, data)
            return PAGE_SIZE
        mv = memoryview(data).cast("B")
        n = len(mv)
        if offset < 0 or offset + n > self.size:
            raise OutOfRange(f"write of {n} bytes at {offset} goes past the end of the disk "
                             f"({self.size} bytes)")
        self.cache.check_worker()
        pos, end = offset, offset + n
        # head: partial first page
        if pos & PAGE_MASK:
            stop = min(end, (pos | PAGE_MASK) + 1)
            self._write_partial(pos, mv[:stop - pos])
            pos = stop
        # middle: whole pages, 1 MiB at a time
        full_end = end & ~PAGE_MASK
        while pos < full_end:
            stop = min(full_end, pos + CHUNK_PAGES * PAGE_SIZE)
            chunk = mv[pos - offset:stop - offset]
            page = pos >> PAGE_SHIFT
            if self.staging and len(chunk) >= WRITE_BEHIND_MIN:
                # the queue keeps a reference: copy unless the caller's buffer is immutable
                if not chunk.readonly:
                    chunk = bytes(chunk)
                self.staging.put(page, chunk)
            else:
                if self.staging:        # after any queued write of the same pages
                    self.staging.wait_range(page, len(chunk) >> PAGE_SHIFT, forget_failed=True)
                self.cache.store_pages(page, chunk)
            pos = stop
        # tail: partial last page
        if pos < end:
            self._write_partial(pos, mv[pos - offset:])
        return n

    def _write_partial(self, pos: int, piece: memoryview) -> None:
        """Read-modify-write of part of one page under that page's lock. A whole-page store
        takes no page lock, so one that lands between our read and our store makes us start
        again (the cache checks the entry's generation): either order, never a mix."""
        page = pos >> PAGE_SHIFT
        at = pos & PAGE_MASK
        while True:
            if self.staging:
                self.staging.wait_range(page, 1)
            self.cache.limits.wait_for_space()     # never wait for the worker holding a page lock
            with self.cache.page_locks.hold((page,)):
                gen = self.cache.page_gen(page)
                buf = bytearray(self.cache.load_pages(page, 1))
                buf[at:at + len(piece)] = piece
                if self.cache.store_pages(page, buf, expect_gen=gen, may_wait=False):
                    return

    def discard(self, offset: int, length: int) -> None:
        """Drop whole pages, zero partial ones (punch-hole / zero-range / blkdiscard)."""
        if offset < 0 or length < 0:
            raise OutOfRange(f"discard at {offset} of {length} bytes")
        end = min(offset + length, self.size)
        if offset >= end:
            return
        first_full = (offset + PAGE_MASK) & ~PAGE_MASK
        last_full = end & ~PAGE_MASK
        if first_full >= last_full:
            self._write_partial_zeros(offset, end)
            return
        if offset < first_full:
            self._write_partial_zeros(offset, first_full)
        p0, p1 = first_full >> PAGE_SHIFT, last_full >> PAGE_SHIFT
        if self.staging:
            self.staging.wait_range(p0, p1 - p0, forget_failed=True)
        for lo in range(p0, p1, 1 << 18):      # 1 GiB of pages per step bounds the arrays touched
            self.cache.invalidate_pages(lo, min(1 << 18, p1 - lo))
        if last_full < end:
            self._write_partial_zeros(last_full, end)

    def _write_partial_zeros(self, start: int, end: int) -> None:
        while start < end:
            stop = min(end, (start | PAGE_MASK) + 1)
            self._write_partial(start, memoryview(bytes(stop - start)))
            start = stop

    def fsync(self) -> None:
        self.cache.check_worker()
        if self.staging:
            self.staging.drain()
        self.cache.flush()

    def close(self) -> None:
        """Write everything back (swap mode: nothing, the data belongs to a swap area that is
        gone), mark the backing file clean and release it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        swap = self.config.swap
        errors: list[BaseException] = []
        # each step runs whatever the one before it did: a failed queued write must not keep
        # the cache's dirty pages from being written back
        self.readahead.close()
        if self.staging:
            try:
                self.staging.close()
            except BaseException as e:
                errors.append(e)
        try:
            self.cache.close(write_back=not swap)
        except BaseException as e:
            errors.append(e)
        if errors and not swap:
            self._mark_lost()
        try:
            self.backing.close(clean=not errors and not swap)
        finally:
            if errors:
                raise errors[0]

    def _mark_lost(self) -> None:
        """After a failed write-back at close: the acknowledged pages that did not reach the
        file must read EIO at the next mount, never zeros or older bytes."""
        lost = self.cache.dirty_pages()
        failed = self.staging.failed_pages() if self.staging else []
        if failed:
            lost = sorted(set(lost).union(failed))
        if not len(lost):
            return
        try:
            self.backing.mark_lost(lost)
        except BaseException as e:
            log.critical("%d page(s) did not reach %s and could not be marked lost either (%s): "
                         "after a remount they may read old bytes", len(lost), self.backing.path, e)
            return
        log.critical("%d page(s) did not reach %s (first: page %d): they read EIO after the next "
                     "mount until written again; `zblock fsck %s` lists them", len(lost),
                     self.backing.path, int(lost[0]), self.backing.path)

    # =========================================================================================
    # params and stats

    def param_names(self) -> list[str]:
        """Every param (those fixed at mount read-only, see param_writable) and action."""
        return list(PARAMS) + list(ACTIONS)

    @staticmethod
    def param_writable(name: str) -> bool:
        return name in ACTIONS or PARAMS[name].runtime

    def get_param(self, name: str) -> str:
        if name in ACTIONS:
            return ACTIONS[name]
        if name not in PARAMS:
            raise ConfigError(f"unknown parameter {name!r}")
        return self.config.get(name)

    def set_param(self, name: str, text: str) -> None:
        if name in ACTIONS:
            self._act(name, text.strip())
            return
        param = PARAMS.get(name)
        if param is None or not param.runtime:
            raise ConfigError(f"{name!r} is not a run-time parameter")
        value = param.parse(text)        # ConfigError leaves everything unchanged
        if name == "sequential_cutoff" and value and self.config.swap:
            raise ConfigError(SWAP_NO_CUTOFF)
        with self._param_lock, self.cache.tree_lock:
            setattr(self.config, name, value)
            self.cache.limits.params_changed(name)
        if name in POOL_PARAMS:
            if self.staging:
                self.staging.settle()       # writes acknowledged before the change use the old pool
            self.cache.switch_pool()

    def _act(self, name: str, text: str) -> None:
        """A write to an action file (zram's write-only attributes): idle, writeback, compact."""
        if self.staging:
            self.staging.settle()       # writes acknowledged before the action count in it
        if name == "idle":
            if text == "all":
                self.cache.mark_idle()
                return
            try:
                seconds = float(text)
            except ValueError:
                seconds = -1.0
            if not seconds >= 0 or seconds == float("inf"):
                raise ConfigError(f"idle: {text!r} is not `all` or a number of seconds")
            self.cache.mark_idle(seconds)
        elif name == "writeback":
            if text not in WRITEBACK_TYPES:
                raise ConfigError(f"writeback: {text!r} is not one of {', '.join(WRITEBACK_TYPES)}")
            self.cache.on_demand.writeback_now(text)
        elif name == "recompress":
            args = dict(kv.partition("=")[::2] for kv in text.split())
            kind = args.pop("type", "")
            threshold = args.pop("threshold", "0")
            algo = args.pop("algo", None)
            if kind not in RECOMPRESS_TYPES or args or not threshold.isdigit():
                raise ConfigError(f"recompress: {text!r}: want type={'|'.join(RECOMPRESS_TYPES)} "
                                  "[threshold=BYTES] [algo=NAME]")
            if algo:
                parse_algorithm(algo)
            self.cache.on_demand.recompress(kind, int(threshold), algo)
        elif name == "compact":
            before = self._proc.memory_info().rss
            self.cache.compact()
            self.compact_freed_bytes = max(before - self._proc.memory_info().rss, 0)

    def stats(self) -> dict:
        if self.staging:
            self.staging.settle()
        d = {"schema": 1}
        d.update(self.cache.snapshot())
        disk = self.backing.stats
        for key in ("bd_reads", "bd_writes", "bd_read_ios", "bd_write_ios", "bd_read_us",
                    "bd_write_us", "io_errors"):
            d[key] = getattr(disk, key)
        d["checksum_errors"] = disk.checksum_errors + d["far_checksum_errors"]
        d["sparse"] = self.backing.sparse
        sealer = self.backing.sealer
        d["seal_backend"] = sealer.backend if sealer is not None else "none"
        d["disk_size"] = self.size
        d["swap"] = self.config.swap
        d["pool_limit"] = self.config.pool_limit
        d["process_rss_bytes"] = self._proc.memory_info().rss
        d["compact_freed_bytes"] = self.compact_freed_bytes
        d["table_bytes"] = self.cache.table_bytes(
            [*self.backing.arrays, *(self.staging.arrays if self.staging else ())])
        d["time"] = time.time()
        return d
