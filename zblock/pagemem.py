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

What this module does not do: decide which arrays exist or how big (their owners do), or limit
anything (zblock.store refuses a disk whose tables would not fit in memory).
"""

from __future__ import annotations

import mmap
import os

import numpy as np


# Arrays at least this big get a mapping of their own: below it an array is a few pages anyway.
HUGE_ARRAY = 2 << 20

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst): 63 present, 56 exclusively
# mapped; both set is a page of this process's own in RAM.
RESIDENT_HERE = np.uint64(1 << 63 | 1 << 56)
PAGEMAP_CHUNK = 1 << 20                     # entries per read: 8 MiB of pagemap, 4 GiB of table


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
