"""zblock.pagemem: per-page arrays that cost memory only where written, and their resident bytes."""

import mmap

import numpy as np

from zblock.pagemem import resident_bytes, zeros

PS = mmap.PAGESIZE


def test_zeros_costs_nothing_even_where_calloc_would_reuse_heap():
    """After a large array was freed, malloc serves the next ones from the heap, and calloc
    zeroes reused heap memory by writing it: np.zeros is then resident whole. zeros() is not."""
    freed = np.ones(24 << 20, np.uint8)     # mmapped, then freed: malloc's mmap threshold rises
    del freed
    freed = np.ones(16 << 20, np.uint8)     # from the heap now, and freed there
    del freed
    table = zeros(16 << 20, np.uint8)
    assert resident_bytes([table]) == 0
    assert zeros((3, 2), np.uint32).tolist() == [[0, 0]] * 3          # small: plain np.zeros


def test_resident_bytes_counts_written_pages_only():
    """Untouched and only-read pages cost nothing (the shared zero page); each written page
    counts once, with small pages under the array."""
    table = zeros(64 << 20, np.uint8)
    other = np.zeros(16 << 20, np.uint8)     # written whole: must not count toward `table`
    other[:] = 1
    assert resident_bytes([table]) == 0
    assert table.sum() == 0                              # reads map the zero page
    assert resident_bytes([table]) == 0
    table[PS * 100:PS * 164:PS] = 1                      # 64 pages, one byte each
    assert resident_bytes([table]) == 64 * PS
    assert resident_bytes([table, table[:PS]]) == 64 * PS    # overlaps counted once
    assert resident_bytes([]) == 0
    assert type(resident_bytes([table])) is int             # stats are JSON
