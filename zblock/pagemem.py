"""Memory of per-page arrays: small pages under them, and how much of them is resident.

Every layer keeps numpy arrays with one slot per page of the disk (the entry table, the backing's
checksums and flags, the write-behind queue's counts). np.zeros of a large array is an anonymous
mapping the kernel fills a page at a time on first write, so such a table costs memory only where
the disk is used, as zram's table gets memory a page at a time. Two things spoil that, and this
module handles both: a huge page is committed whole by its first write (no_huge_pages), and
`nbytes` says nothing about what is resident (resident_bytes reads it from /proc/self/pagemap).

Invariant: no_huge_pages runs on an array before anything writes it (a page already committed
stays committed). Reads of untouched memory map the shared zero page, which is not counted.

What this module does not do: decide which arrays exist or how big (their owners do), or limit
anything (zblock.store refuses a disk whose tables would not fit in memory).
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from .libc import libc

# Arrays at least this big get small pages: numpy asks for huge pages under large arrays
# (MADV_HUGEPAGE), and below this an array is a few pages anyway.
HUGE_ARRAY = 2 << 20

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst): 63 present, 56 exclusively
# mapped; both set is a page of this process's own in RAM.
RESIDENT_HERE = np.uint64(1 << 63 | 1 << 56)
PAGEMAP_CHUNK = 1 << 20                     # entries per read: 8 MiB of pagemap, 4 GiB of table


def no_huge_pages(arrays) -> None:
    """Small pages under per-page arrays, asked for before anything writes them: a huge page is
    committed whole by its first write, so metadata spread over a disk (ext4's) would make
    nearly all of a table resident. A refusal only costs memory."""
    for a in arrays:
        if a.nbytes >= HUGE_ARRAY:
            lo = -(-a.ctypes.data & -mmap.PAGESIZE)
            hi = (a.ctypes.data + a.nbytes) & -mmap.PAGESIZE
            libc.madvise(lo, hi - lo, mmap.MADV_NOHUGEPAGE)


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
