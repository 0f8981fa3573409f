"""Whole-array work on per-page arrays without numpy: importing numpy cost an idle server 14.9
MiB of its 35 (docs/performance.md), more than the rest of zblock together.

The arrays are typed memoryviews (zblock.pagemem.array): 'B' for states, bytes and 0/1 flags,
'H', 'I', 'Q' and 'q' for lengths, checksums, fills and stamps. One element is read or written
by indexing, which gives and takes Python ints. The loops over whole ranges run in C through
what the standard library already has: `bytes.count` and `bytes.translate` over a byte array,
`bytes.find` to turn a 0/1 mask into positions a run at a time, and big-int arithmetic to
combine masks a machine word at a time.

Conventions: a set of pages is a list of ints, or a `range` for a run; a mask is a `bytes` of
0 and 1, one per position.
"""

from __future__ import annotations

import mmap
import sys
from array import array
from itertools import groupby

_ONES = {}                              # n -> b"\x01" * n, for mask_not


def _byte_table(values) -> bytes:
    """A translate() table: 1 for each byte in `values`, 0 for the others."""
    return bytes(1 if v in values else 0 for v in range(256))


_TABLES: dict[frozenset, bytes] = {}
_NONZERO = bytes([0] + [1] * 255)


def mask_in(buf, values, start: int = 0, end: int | None = None) -> bytes:
    """0/1 per byte of buf[start:end]: 1 where the byte is one of `values` (ints)."""
    key = frozenset(values)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = _byte_table(key)
    return bytes(buf[start:end]).translate(table)


def mask_nonzero(buf, start: int = 0, end: int | None = None) -> bytes:
    """0/1 per byte of buf[start:end]: 1 where the byte is not 0."""
    return bytes(buf[start:end]).translate(_NONZERO)


def mask_nonzero_items(mv: memoryview, start: int = 0, end: int | None = None) -> bytes:
    """0/1 per element of mv[start:end], any format: 1 where the element is not 0."""
    size = mv.itemsize
    nonzero = mask_nonzero(mv[start:end].cast("B"))
    if size == 1:
        return nonzero
    # OR each element's bytes into its first byte, a machine word at a time
    x = _to_int(nonzero)
    shift = 8
    while shift < 8 * size:
        x |= x >> shift
        shift *= 2
    return x.to_bytes(len(nonzero), "little")[::size]


def mask_below(mv: memoryview, start: int, end: int, limit: int) -> bytes:
    """0/1 per element of mv[start:end] ('H', 'I', 'Q' or 'q'): 1 where it is below `limit`.
    Elements and `limit` must be below 2**(bits - 1): each lane's top bit then holds the
    comparison after one big-int subtraction (no borrow crosses a lane)."""
    size = mv.itemsize
    n = end - start
    if n <= 0:
        return b""
    top = 1 << (8 * size - 1)
    tops = int.from_bytes(top.to_bytes(size, "little") * n, "little")
    limits = int.from_bytes(limit.to_bytes(size, "little") * n, "little")
    diff = (int.from_bytes(mv[start:end].cast("B"), "little") | tops) - limits
    return diff.to_bytes(n * size, "little")[size - 1::size].translate(_TOP_CLEAR)


_TOP_CLEAR = bytes(int(b < 0x80) for b in range(256))


_EQUAL: dict[int, bytes] = {}          # byte value -> translate() table: 1 for it, 0 otherwise


def mask_equal(mv: memoryview, start: int, end: int, value: int) -> bytes:
    """0/1 per element of mv[start:end], any format: 1 where it equals `value`. Valid for any
    element (mask_below is not, near the top of the range): each byte of the elements is
    compared by translate() with that byte of `value`, and the answers are ANDed."""
    size = mv.itemsize
    n = end - start
    if n <= 0:
        return b""
    raw = bytes(mv[start:end].cast("B"))
    want = value.to_bytes(size, sys.byteorder, signed=mv.format.islower())
    equal = -1
    for k in range(size):
        table = _EQUAL.get(want[k])
        if table is None:
            table = _EQUAL[want[k]] = _byte_table((want[k],))
        equal &= _to_int(raw[k::size].translate(table))
    return equal.to_bytes(n, "little")


def positions(mask, offset: int = 0) -> list[int]:
    """The positions (plus `offset`) where a 0/1 mask is 1, found a run at a time by
    bytes.find: a sparse mask or one of long runs costs next to nothing per position."""
    mask = bytes(mask)
    out: list[int] = []
    i = mask.find(1)
    while i >= 0:
        j = mask.find(0, i)
        j = len(mask) if j < 0 else j
        out += range(offset + i, offset + j)
        i = mask.find(1, j)
    return out


def nonzero(buf, start: int = 0, end: int | None = None) -> list[int]:
    """The indices in start .. end of a byte array whose byte is not 0."""
    return positions(mask_nonzero(buf, start, end), start)


def count(buf, value: int, start: int = 0, end: int | None = None) -> int:
    """How many bytes of buf[start:end] equal `value`."""
    return bytes(buf[start:end]).count(value)


def _to_int(mask: bytes) -> int:
    return int.from_bytes(mask, "little")


def mask_and(a: bytes, b: bytes) -> bytes:
    return (_to_int(a) & _to_int(b)).to_bytes(len(a), "little")


def mask_or(a: bytes, b: bytes) -> bytes:
    return (_to_int(a) | _to_int(b)).to_bytes(len(a), "little")


def mask_not(a: bytes) -> bytes:
    ones = _ONES.get(len(a))
    if ones is None:
        ones = b"\x01" * len(a)
        if len(a) <= 4096:
            _ONES[len(a)] = ones
    return (_to_int(a) ^ _to_int(ones)).to_bytes(len(a), "little")


def fill(mv: memoryview, start: int, end: int, value: int) -> None:
    """mv[start:end] = value, for a typed memoryview. Zeros are not written over zeros: a
    written page of a large array is memory the kernel must give it (zblock.pagemem)."""
    n = end - start
    if n <= 0:
        return
    if not value:
        raw = mv[start:end].cast("B").tobytes()
        if raw.count(0) == len(raw):
            return
    if mv.format == "B":
        mv[start:end] = bytes((value,)) * n if value else bytes(n)
    else:
        mv[start:end] = array(mv.format, (value,)) * n


# translate() tables from a 0/1 mask to a byte mask: 0xFF where it is 1, or where it is 0
_FF_WHERE_ONE = bytes([0, 0xFF] + [0] * 254)
_FF_WHERE_ZERO = bytes([0xFF, 0] + [0] * 254)


def _lanes(mask: bytes, size: int, table: bytes) -> int:
    """Each byte of a 0/1 mask as an element of `size` bytes, all 0 or all 0xFF by `table`,
    as one big int (to AND an array's bytes with)."""
    out = bytearray(len(mask) * size)
    lanes = bytes(mask).translate(table)
    for k in range(size):
        out[k::size] = lanes
    return int.from_bytes(out, "little")


def sum_where(mv: memoryview, start: int, end: int, mask: bytes) -> int:
    """The sum of mv[start + i] where mask[i] is 1 (an unsigned format)."""
    n = end - start
    if n <= 0 or mask.find(1) < 0:
        return 0
    size = mv.itemsize
    kept = int.from_bytes(mv[start:end].cast("B"), "little") & _lanes(mask, size, _FF_WHERE_ONE)
    return sum(memoryview(kept.to_bytes(n * size, "little")).cast(mv.format))


def zero_where(mv: memoryview, start: int, end: int, mask: bytes) -> None:
    """mv[start + i] = 0 where mask[i] is 1, any format, as one big-int AND over their bytes.
    Only the memory pages (counted from mv's first byte: a pagemem array starts on one) whose
    bytes change are written: zeros are not written over zeros (see fill)."""
    n = end - start
    if n <= 0 or mask.find(1) < 0:
        return
    size = mv.itemsize
    raw = mv[start:end].cast("B")
    old = bytes(raw)
    new = (int.from_bytes(old, "little") & _lanes(mask, size, _FF_WHERE_ZERO)).to_bytes(
        n * size, "little")
    # the page boundaries within raw, counted from mv's first byte
    cuts = range(-(start * size) % mmap.PAGESIZE or mmap.PAGESIZE, len(old), mmap.PAGESIZE)
    for a, b in zip([0, *cuts], [*cuts, len(old)]):
        if new[a:b] != old[a:b]:
            raw[a:b] = new[a:b]


def add_to_run(mv: memoryview, start: int, end: int, delta: int) -> None:
    """mv[i] += delta for start <= i < end, as one big-int addition over their bytes. The caller
    makes sure no element leaves its range: a carry or borrow would reach its neighbour."""
    n = end - start
    if n <= 0:
        return
    size = mv.itemsize
    raw = mv[start:end].cast("B")
    ones = int.from_bytes((1).to_bytes(size, sys.byteorder) * n, sys.byteorder)
    raw[:] = (int.from_bytes(raw, sys.byteorder) + delta * ones).to_bytes(n * size, sys.byteorder)


def gather(mv, index) -> list[int]:
    """[mv[i] for i in index], as ints."""
    return list(map(mv.__getitem__, index))


def scatter(mv: memoryview, index, value: int) -> None:
    """mv[i] = value for each i in index (a range is one slice assignment). Zeros are not
    written over zeros (see fill)."""
    if type(index) is range and index.step == 1:
        fill(mv, index.start, index.stop, value)
    elif value:
        for i in index:
            mv[i] = value
    else:
        for i in index:
            if mv[i]:
                mv[i] = 0


def put(mv: memoryview, index, values) -> None:
    """mv[i] = v for each pair of index and values (a range is one slice assignment)."""
    if type(index) is range and index.step == 1:
        mv[index.start:index.stop] = values if isinstance(
            values, (bytes, bytearray, array, memoryview)) else array(mv.format, values)
        return
    for i, v in zip(index, values):
        mv[i] = v


def runs(pages) -> list[tuple[int, int]]:
    """Ascending distinct pages as runs of consecutive ones: [(first, end), ...]."""
    out = []
    for _, group in groupby(enumerate(pages), lambda iv: iv[1] - iv[0]):
        group = list(group)
        out.append((group[0][1], group[-1][1] + 1))
    return out
