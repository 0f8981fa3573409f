"""zblock.pagemem: per-page arrays that cost memory only where written, and their resident bytes."""

import mmap

import numpy as np

from zblock.pagemem import array, resident_bytes

PS = mmap.PAGESIZE


def test_zeros_costs_nothing_even_where_calloc_would_reuse_heap():
    """After a large array was freed, malloc serves the next ones from the heap, and calloc
    zeroes reused heap memory by writing it: np.zeros is then resident whole. array() is not."""
    freed = np.ones(24 << 20, np.uint8)     # mmapped, then freed: malloc's mmap threshold rises
    del freed
    freed = np.ones(16 << 20, np.uint8)     # from the heap now, and freed there
    del freed
    table = array(16 << 20, "B")
    assert resident_bytes([table]) == 0
    small = array(6, "I")                                       # small: on the heap
    assert small.tolist() == [0] * 6 and small.format == "I" and not small.readonly


def test_resident_bytes_counts_written_pages_only():
    """Untouched and only-read pages cost nothing (the shared zero page); each written page
    counts once, with small pages under the array."""
    mv = array(64 << 20, "B")
    table = np.asarray(mv)
    other = np.zeros(16 << 20, np.uint8)     # written whole: must not count toward `table`
    other[:] = 1
    assert resident_bytes([mv]) == 0
    assert table.sum() == 0                              # reads map the zero page
    assert resident_bytes([mv]) == 0
    table[PS * 100:PS * 164:PS] = 1                      # 64 pages, one byte each
    assert resident_bytes([mv]) == 64 * PS
    assert resident_bytes([mv, mv[:PS]]) == 64 * PS      # overlaps counted once
    assert resident_bytes([]) == 0
    assert type(resident_bytes([mv])) is int             # stats are JSON
