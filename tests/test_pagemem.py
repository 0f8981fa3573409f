"""zblock.pagemem: resident bytes of per-page arrays, counted page by page."""

import mmap

import numpy as np

from zblock.pagemem import no_huge_pages, resident_bytes

PS = mmap.PAGESIZE


def test_resident_bytes_counts_written_pages_only():
    """Untouched and only-read pages cost nothing (the shared zero page); each written page
    counts once, wherever the heap put the array and whatever else shares its mapping."""
    table = np.zeros(64 << 20, np.uint8)
    other = np.zeros(16 << 20, np.uint8)     # written whole: must not count toward `table`
    no_huge_pages((table,))
    other[:] = 1
    assert resident_bytes([table]) <= 2 * PS            # malloc's header page at each end
    assert table.sum() == 0                              # reads map the zero page
    assert resident_bytes([table]) <= 2 * PS
    table[PS * 100:PS * 164:PS] = 1                      # 64 pages, one byte each
    assert 64 * PS <= resident_bytes([table]) <= 66 * PS
    assert 64 * PS <= resident_bytes([table, table[:PS]]) <= 66 * PS   # overlaps counted once
    assert resident_bytes([]) == 0
    assert type(resident_bytes([table])) is int             # stats are JSON
