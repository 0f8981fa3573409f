"""Memory of per-page arrays: small pages under them, and how much of them is resident.

Every layer keeps typed memoryviews with one slot per page of the disk (the entry table, the
backing's checksums and flags, the write-behind queue's counts; zblock.vec works on them whole).
A large one is an anonymous mapping the kernel fills a page at a time on first write, so such a
table costs memory only where the disk is used, as zram's table gets memory a page at a time.
Two things would spoil that, and `nbytes` says nothing about what is resident: heap memory may
be reused and zeroed by writing it, and a huge page is committed whole by its first write
(array() gives large arrays a mapping of their own, with small pages); resident_bytes reads
what is resident from pagemap.

Invariant: per-page arrays are made by array(). Reads of untouched memory map the shared zero
page, which is not counted.

fill_from_file loads such a table from its file (the sidecar, the seal file) without touching
the memory of blocks that hold nothing.

What this module does not do: decide which arrays exist or how big (their owners do), or limit
anything (zblock.store refuses a disk whose tables would not fit in memory).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from itertools import compress

from . import vec
from .errors import BackingError


# Arrays at least this big get a mapping of their own, resident only where written: a heap array
# is zeroed by writing it, so a 256 MiB disk's tables were all resident from the start.
OWN_MAPPING = 64 << 10

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst): 63 present, 56 exclusively
# mapped; both set is a page of this process's own in RAM.
RESIDENT_HERE = 1 << 63 | 1 << 56
PAGEMAP_CHUNK = 1 << 20                     # entries per read: 8 MiB of pagemap, 4 GiB of table
# Tables on disk (the sidecar's, the seal file's) are written and read in blocks this big, and
# read through a buffer of _READ_STEP.
BLOCK = 4096
_READ_STEP = 1 << 20


ITEMSIZE = {"B": 1, "H": 2, "I": 4, "Q": 8, "q": 8}


def array(n: int, fmt: str) -> memoryview:
    """A zeroed per-page array of n elements of struct format `fmt` ('B', 'H', 'I', 'Q', 'q'),
    as a writable memoryview. A large one gets an anonymous mapping of its own with small pages,
    so it costs memory only where it is written: the heap may hand out freed memory and zero it
    by writing every page (a 64 GiB disk's entry table was 112 MiB resident after earlier large
    arrays were freed), and a huge page is committed whole by its first write."""
    nbytes = n * ITEMSIZE[fmt]
    if nbytes < OWN_MAPPING:
        return memoryview(bytearray(nbytes)).cast(fmt)
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area.madvise(mmap.MADV_NOHUGEPAGE)
    except OSError:
        pass                                # refused: it only costs memory
    return memoryview(area).cast(fmt)


def address(mv: memoryview) -> int:
    """The address of a writable buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mv)) if mv.nbytes else 0


def resident_bytes(arrays) -> int:
    """Bytes of `arrays` in memory now, page by page from /proc/self/pagemap: a page counts when
    it is present and mapped by this process alone. The shared zero page, which reads of
    untouched memory map, is not. Page by page because the heap can merge a table's mapping with
    other memory, so a mapping's Rss (smaps) can hold far more than the table."""
    ranges: list[list[int]] = []            # the arrays' whole pages, adjacent ones merged
    for a, b in sorted((address(a), address(a) + a.nbytes) for a in arrays if a.nbytes):
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
                entries = memoryview(os.pread(fd, count * 8, first * 8)).cast("Q")
                pages += sum(e & RESIDENT_HERE == RESIDENT_HERE for e in entries)
    finally:
        os.close(fd)
    return pages * mmap.PAGESIZE


def fill_from_file(fd: int, table: memoryview, offset: int, where: str,
                   row_bytes: int) -> list[tuple[int, int]]:
    """Fill the zeroed per-page `table` from the file `fd` holds it in, from byte `offset` on,
    and return the row ranges (first, end) it wrote; every other row stays zeros. Only the
    file's data extents are read, and only their 4 KiB blocks that hold something are copied
    in: the rest of `table` stays memory the kernel has not given (a new disk's sidecar is one
    hole; a file copied without its holes, or read through the page cache, is data that reads as
    zeros). Rows are `row_bytes` long and must divide 4 KiB. BackingError naming `where` if the
    file is shorter than the table."""
    dst = memoryview(table).cast("B")
    rows_per_block = BLOCK // row_bytes
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
            base = (pos - offset) // BLOCK      # the table block at `pos`
            for a, b in _used_runs(view[:count]):
                dst[(base + a) * BLOCK:(base + b) * BLOCK] = view[a * BLOCK:b * BLOCK]
                first, last = (base + a) * rows_per_block, (base + b) * rows_per_block
                if ranges and ranges[-1][1] == first:
                    ranges[-1] = (ranges[-1][0], last)
                else:
                    ranges.append((first, last))
            pos += count
    return ranges


def _used_runs(data: memoryview) -> list[tuple[int, int]]:
    """Runs (first, end) of the 4 KiB blocks of `data` that hold something."""
    zero = bytes(BLOCK)
    return vec.runs(list(compress(range(len(data) // BLOCK),
                                  (data[i:i + BLOCK] != zero for i in range(0, len(data), BLOCK)))))
