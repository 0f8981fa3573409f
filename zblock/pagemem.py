"""Memory of per-page arrays: small pages under them, and how much of them is resident.

Every layer keeps numpy arrays with one slot per page of the disk (the entry table, the backing's
checksums and flags, the write-behind queue's counts). np.zeros of a large array is an anonymous
mapping the kernel fills a page at a time on first write, so such a table costs memory only where
the disk is used, as zram's table gets memory a page at a time. Two things spoil that, and this
module handles three: calloc may zero reused heap memory by writing it, a huge page is committed
whole by its first write (zeros() gives such arrays a mapping of their own, with small pages),
and `nbytes` says nothing about what is resident (resident_bytes reads it from pagemap).

Invariant: per-page arrays are made by zeros(). Reads of untouched memory map the shared zero
page, which is not counted.

fill_from_file loads such a table from its file (the sidecar, the seal file) without touching
the memory of blocks that hold nothing.

What this module does not do: decide which arrays exist or how big (their owners do), or limit
anything (zblock.store refuses a disk whose tables would not fit in memory).
"""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np

from .errors import BackingError


# Arrays at least this big get a mapping of their own: below it an array is a few pages anyway.
HUGE_ARRAY = 2 << 20

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst): 63 present, 56 exclusively
# mapped; both set is a page of this process's own in RAM.
RESIDENT_HERE = np.uint64(1 << 63 | 1 << 56)
PAGEMAP_CHUNK = 1 << 20                     # entries per read: 8 MiB of pagemap, 4 GiB of table
# Tables on disk (the sidecar's, the seal file's) are written and read in blocks this big, and
# read through a buffer of _READ_STEP.
BLOCK = 4096
_READ_STEP = 1 << 20


def zeros(shape, dtype) -> np.ndarray:
    """np.zeros for a per-page array: a large one gets an anonymous mapping of its own with small
    pages, so it costs memory only where it is written. np.zeros goes through calloc, which may
    hand out freed heap memory and zero it by writing every page (a 64 GiB disk's entry table
    was 112 MiB resident after earlier large arrays were freed); numpy also asks for huge pages
    under large arrays, and a huge page is committed whole by its first write."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes < HUGE_ARRAY:
        return np.zeros(shape, dtype)
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area.madvise(mmap.MADV_NOHUGEPAGE)
    except OSError:
        pass                                # refused: it only costs memory
    return np.frombuffer(area, dtype).reshape(shape)


def resident_bytes(arrays) -> int:
    """Bytes of `arrays` in memory now, page by page from /proc/self/pagemap: a page counts when
    it is present and mapped by this process alone. The shared zero page, which reads of
    untouched memory map, is not. Page by page because the heap can merge a table's mapping with
    other memory, so a mapping's Rss (smaps) can hold far more than the table."""
    ranges: list[list[int]] = []            # the arrays' whole pages, adjacent ones merged
    for a, b in sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays if a.nbytes):
        a, b = a & -mmap.PAGESIZE, -(-b & -mmap.PAGESIZE)
        if ranges and a <= ranges[-1][1]:
            ranges[-1][1] = max(ranges[-1][1], b)
        else:
            ranges.append([a, b])
    pages = 0
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        for lo, hi in ranges:
            for first in range(lo // mmap.PAGESIZE, hi // mmap.PAGESIZE, PAGEMAP_CHUNK):
                count = min(PAGEMAP_CHUNK, hi // mmap.PAGESIZE - first)
                entries = np.frombuffer(os.pread(fd, count * 8, first * 8), np.uint64)
                pages += int(np.count_nonzero(entries & RESIDENT_HERE == RESIDENT_HERE))
    finally:
        os.close(fd)
    return pages * mmap.PAGESIZE


def fill_from_file(fd: int, table: np.ndarray, offset: int, where: str) -> list[tuple[int, int]]:
    """Fill the zeroed per-page `table` from the file `fd` holds it in, from byte `offset` on,
    and return the row ranges (first, end) it wrote; every other row stays zeros. Only the
    file's data extents are read, and only their 4 KiB blocks that hold something are copied
    in: the rest of `table` stays memory the kernel has not given (a new disk's sidecar is one
    hole; a file copied without its holes, or read through the page cache, is data that reads as
    zeros). `table`'s rows must divide 4 KiB. BackingError naming `where` if the file is shorter
    than the table."""
    dst = memoryview(table).cast("B")
    rows_per_block = BLOCK // table.strides[0]
    end = offset + len(dst)
    if os.fstat(fd).st_size < end:
        raise BackingError(f"{where} is truncated")
    scratch = bytearray(_READ_STEP)
    view = memoryview(scratch)
    ranges: list[tuple[int, int]] = []
    pos = offset
    while pos < end:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:      # nothing but holes from here on
                break
            raise
        if pos >= end:
            break
        stop = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        pos = offset + (pos - offset) // BLOCK * BLOCK      # whole blocks
        stop = min(end, offset + -(-(stop - offset) // BLOCK) * BLOCK)
        while pos < stop:
            count = min(len(scratch), stop - pos)
            got = 0
            while got < count:              # one read may return less than asked
                n = os.preadv(fd, [view[got:count]], pos + got)
                if n == 0:
                    raise BackingError(f"{where} is truncated")
                got += n
            blocks = np.frombuffer(scratch, np.uint64, count // 8).reshape(-1, BLOCK // 8)
            used = np.flatnonzero(blocks.any(axis=1))
            base = (pos - offset) // BLOCK      # the table block at `pos`
            for run in np.split(used, np.flatnonzero(np.diff(used) != 1) + 1) if len(used) else ():
                a, b = int(run[0]), int(run[-1]) + 1
                dst[(base + a) * BLOCK:(base + b) * BLOCK] = view[a * BLOCK:b * BLOCK]
                first, last = (base + a) * rows_per_block, (base + b) * rows_per_block
                if ranges and ranges[-1][1] == first:
                    ranges[-1] = (ranges[-1][0], last)
                else:
                    ranges.append((first, last))
            pos += count
    return ranges
