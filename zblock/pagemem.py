"""Memory of per-page arrays: small pages under them, and how much of them is resident.

Every layer keeps numpy arrays with one slot per page of the disk (the entry table, the backing's
checksums and flags, the write-behind queue's counts). np.zeros of a large array is an anonymous
mapping the kernel fills a page at a time on first write, so such a table costs memory only where
the disk is used, as zram's table gets memory a page at a time. Two things spoil that, and this
module handles both: a huge page is committed whole by its first write (no_huge_pages), and
`nbytes` says nothing about what is resident (resident_bytes reads it from /proc/self/smaps).

Invariant: no_huge_pages runs on an array before anything writes it (a page already committed
stays committed). Reads of untouched memory map the shared zero page, which smaps does not count.

What this module does not do: decide which arrays exist or how big (their owners do), or limit
anything (zblock.store refuses a disk whose tables would not fit in memory).
"""

from __future__ import annotations

import mmap

from .libc import libc

# Arrays at least this big get small pages: numpy asks for huge pages under large arrays
# (MADV_HUGEPAGE), and below this an array is a few pages anyway.
HUGE_ARRAY = 2 << 20


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
    """Bytes of `arrays` in memory now: the Rss (/proc/self/smaps) of each mapping that lies
    within the arrays' pages. An array's part of a mapping that also holds other data (a small
    array on the heap) counts as resident, so this errs high by at most those parts' size."""
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays if a.nbytes)
    pages: list[list[int]] = []             # the arrays' whole pages, adjacent ones merged
    for a, b in spans:
        a, b = a & -mmap.PAGESIZE, -(-b & -mmap.PAGESIZE)
        if pages and a <= pages[-1][1]:
            pages[-1][1] = max(pages[-1][1], b)
        else:
            pages.append([a, b])
    total = lo = hi = 0
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef":       # a mapping: "start-end perms ..."
                start, _, end = line[:line.index(" ")].partition("-")
                lo, hi = int(start, 16), int(end, 16)
            elif line.startswith("Rss:") and any(a < hi and lo < b for a, b in pages):
                if any(a <= lo and hi <= b for a, b in pages):
                    total += int(line.split()[1]) << 10
                else:
                    total += sum(max(min(b, hi) - max(a, lo), 0) for a, b in spans)
    return total
