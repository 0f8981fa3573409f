"""zblock.lru's walk from the cold end against a plain sort of the whole entry table, on a table
big enough that its snapshot takes only the pages below an estimated stamp."""

import random
from array import array

import pytest

from zblock import lru
from zblock.config import Config
from zblock.entries import EntryTable
from zblock.pools import PoolRegistry
from zblock.scan import COMP, Scan


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(lru, "SNAPSHOT_PAGES", 64)     # the estimated-stamp path at 40k pages
    registry = PoolRegistry(Config())
    yield EntryTable(1 << 16, registry), registry.current
    registry.close()


def store(table, pool, pages: list[int]) -> None:
    """A store of compressed pages at `pages` (one install: one stamp)."""
    n = len(pages)
    scan = Scan([b"z" * 100] * n, bytes((COMP,)) * n, array("H", (100,)) * n,
                array("Q", bytes(8 * n)), 0)
    table.install(pages, scan, pool)


def naive_coldest(table, k: int) -> list[int]:
    lru_pages = [p for p in range(table.npages)
                 if table.state[p] == COMP and not table.under_wb[p]]
    return sorted(lru_pages, key=lambda p: (table.stamp[p], p))[:k]


def test_coldest_is_the_sorted_cold_end(table):
    t, pool = table
    rng = random.Random(5)
    pages = list(range(t.npages))
    rng.shuffle(pages)
    for lo in range(0, 40000, 100):             # 400 stores of 100 scattered pages
        store(t, pool, sorted(pages[lo:lo + 100]))
    for k in (1, 64, 500, 3000):
        assert lru.coldest(t, k) == naive_coldest(t, k)
    # the cold end changes: some of it stored again (warmer now), some under writeback
    store(t, pool, naive_coldest(t, 150)[::3])
    busy = naive_coldest(t, 40)[5:15]
    for p in busy:
        t.under_wb[p] = 1
    assert lru.coldest(t, 200) == naive_coldest(t, 200)
    # a writeback that did not happen gives its pages their place back
    for p in busy:
        t.under_wb[p] = 0
    assert lru.coldest(t, 200) == naive_coldest(t, 200)
    # pages freed, and the snapshot run out: the next one is taken
    t.discard(0, 1 << 15)
    assert lru.coldest(t, 5000) == naive_coldest(t, 5000)


def test_second_chance_rotates_only_pages_colder_than_a_victim(table):
    t, pool = table
    for p in range(300):
        store(t, pool, [p])
    for p in range(1, 300):
        t.referenced[p] = 1
    victims, _ = lru.select_victims(t, 5)
    assert victims == [0]                       # the one unreferenced page
    assert all(t.referenced[p] for p in range(1, 300))      # none colder: nothing rotated
    t.free([0])                                 # written back
    t.set_disk([0])
    victims, _ = lru.select_victims(t, 5)       # all referenced: each has had its chance
    assert victims == [1, 2, 3, 4, 5]
