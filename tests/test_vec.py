"""zblock.vec against plain Python loops (and numpy, where it is the reference)."""

import random

import numpy as np

from zblock import pagemem, vec


def test_masks_and_positions_match_numpy():
    rng = random.Random(7)
    for n in (0, 1, 31, 4096, 70000):
        buf = pagemem.array(n, "B")
        for i in range(n):
            buf[i] = rng.choice((0, 0, 0, 1, 2, 3, 5))
        ref = np.frombuffer(buf, np.uint8)
        a, b = n // 5, n - n // 7
        assert vec.nonzero(buf, a, b) == (np.flatnonzero(ref[a:b]) + a).tolist()
        want = np.flatnonzero(np.isin(ref[a:b], (2, 3))) + a
        assert vec.positions(vec.mask_in(buf, (2, 3), a, b), a) == want.tolist()
        assert vec.count(buf, 5, a, b) == int(np.count_nonzero(ref[a:b] == 5))
        m1, m2 = vec.mask_in(buf, (1, 2)), vec.mask_nonzero(buf)
        in12 = np.isin(ref, (1, 2))
        assert list(vec.mask_and(m1, m2)) == (in12 & (ref != 0)).astype(int).tolist()
        m125 = vec.mask_or(m1, vec.mask_in(buf, (5,)))
        assert list(m125) == np.isin(ref, (1, 2, 5)).astype(int).tolist()
        assert list(vec.mask_not(m1)) == (~in12).astype(int).tolist()


def test_fill_gather_scatter_put_on_each_format():
    for fmt, big in (("B", 255), ("H", 65535), ("I", 2**32 - 1), ("Q", 2**64 - 1), ("q", -5)):
        mv = pagemem.array(100, fmt)
        vec.fill(mv, 10, 20, big)
        assert mv.tolist() == [0] * 10 + [big] * 10 + [0] * 80
        vec.scatter(mv, [1, 3], 1)
        vec.scatter(mv, range(50, 53), 2)
        vec.put(mv, range(60, 62), [7, 8])
        vec.put(mv, [90, 95], [9, 9])
        assert vec.gather(mv, [1, 3, 50, 52, 60, 61, 90, 95, 15]) == [1, 1, 2, 2, 7, 8, 9, 9, big]


def test_nonzero_items_of_wide_formats():
    for fmt in ("H", "I", "Q", "q"):
        mv = pagemem.array(40, fmt)
        for i, v in ((0, 1), (5, 256), (6, 1 << 15), (39, 7)):
            mv[i] = v
        want = [int(i in (5, 6, 39)) for i in range(2, 40)]
        assert list(vec.mask_nonzero_items(mv, 2, 40)) == want


def test_mask_below_matches_a_loop():
    rng = random.Random(3)
    for fmt, bits in (("H", 16), ("I", 32), ("Q", 64), ("q", 64)):
        top = 1 << (bits - 1)
        mv = pagemem.array(300, fmt)
        for i in range(300):
            mv[i] = rng.choice((0, 1, top - 1, rng.randrange(top), rng.randrange(50)))
        for limit in (0, 1, 25, rng.randrange(top), top - 1, top):
            want = [int(mv[i] < limit) for i in range(7, 290)]
            assert list(vec.mask_below(mv, 7, 290, limit)) == want, (fmt, limit)
    assert vec.mask_below(mv, 5, 5, 3) == b""


def test_add_to_run():
    for fmt in ("H", "I", "Q"):
        mv = pagemem.array(10, fmt)
        vec.fill(mv, 0, 10, 5)
        vec.add_to_run(mv, 2, 6, 1)
        vec.add_to_run(mv, 4, 9, -3)
        vec.add_to_run(mv, 3, 3, 9)
        assert mv.tolist() == [5, 5, 6, 6, 3, 3, 2, 2, 2, 5]


def test_runs():
    assert vec.runs([]) == []
    assert vec.runs([3]) == [(3, 4)]
    assert vec.runs([1, 2, 3, 7, 9, 10]) == [(1, 4), (7, 8), (9, 11)]


def test_large_arrays_are_mappings_of_their_own():
    mv = pagemem.array(pagemem.OWN_MAPPING, "Q")
    assert mv.nbytes == 8 * pagemem.OWN_MAPPING and mv.format == "Q"
    assert pagemem.resident_bytes([mv]) == 0
    vec.fill(mv, 0, 512, 1)             # one page written
    assert pagemem.resident_bytes([mv]) == 4096


def test_mask_equal_matches_a_loop():
    rng = random.Random(4)
    for fmt, bits in (("B", 8), ("H", 16), ("I", 32), ("Q", 64), ("q", 64)):
        lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if fmt == "q" else (0, 1 << bits)
        mv = pagemem.array(300, fmt)
        for i in range(300):
            mv[i] = rng.choice((0, 1, 257 % hi, lo, hi - 1, rng.randrange(lo, hi)))
        for value in (0, 1, 257 % hi, lo, hi - 1, mv[100]):
            want = [int(mv[i] == value) for i in range(7, 290)]
            assert list(vec.mask_equal(mv, 7, 290, value)) == want, (fmt, value)
    assert vec.mask_equal(mv, 5, 5, 3) == b""


def test_zero_where_matches_a_loop_and_writes_no_page_that_stays_zero():
    rng = random.Random(5)
    for fmt in ("B", "H", "I", "Q"):
        mv = pagemem.array(3000, fmt)
        for i in range(3000):
            mv[i] = rng.choice((0, 1, 1 << (8 * mv.itemsize) - 1))
        mask = bytes(rng.randrange(2) for _ in range(2990 - 9))
        want = [0 if 9 <= i < 2990 and mask[i - 9] else mv[i] for i in range(3000)]
        vec.zero_where(mv, 9, 2990, mask)
        assert mv.tolist() == want, fmt
    mv = pagemem.array(pagemem.OWN_MAPPING, "I")    # resident only where written
    mv[1500] = 7                                    # its second page
    vec.zero_where(mv, 100, 4000, b"\x01" * 3900)
    assert mv[1500] == 0 and pagemem.resident_bytes([mv]) == 4096
    vec.zero_where(mv, 0, 5, b"\x00" * 5)
    assert pagemem.resident_bytes([mv]) == 4096


def test_sum_where_matches_a_loop():
    rng = random.Random(6)
    for fmt in ("B", "H", "I", "Q"):
        mv = pagemem.array(500, fmt)
        for i in range(500):
            mv[i] = rng.choice((0, 1, rng.randrange(1 << (8 * mv.itemsize))))
        mask = bytes(rng.randrange(2) for _ in range(480))
        assert vec.sum_where(mv, 11, 491, mask) == sum(mv[11 + i] for i in range(480) if mask[i])
        assert vec.sum_where(mv, 11, 491, bytes(480)) == 0
