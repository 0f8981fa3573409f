"""What a store request's pages become: zswap_store()'s per-page checks, for a whole request.

Every page of a write request is one of
    SAME  one 8-byte word repeated (zswap 4.14-6.9 same-filled pages): kept as that word
    COMP  compressed below a page: kept as the compressed stream
    RAW   did not compress below a page (or the compressor failed) and the policy stores such
          pages as they are (zswap 6.18): kept as a copy of the page
    NONE  did not compress below a page and the policy rejects such pages: sent to disk
A `Scan` holds the result per page: objs (the stream, the copy, or None), states (bytes),
lengths (16-bit; a page's length for RAW), fills (64-bit, the page's first word for every page)
and `failed`, how many pages the compressor failed on. states, lengths and fills are byte
buffers or typed memoryviews/arrays: indexing gives ints.

The checks are done here once, in Python and the compressor's batch call; zblock._lz4pages does
the same checks and lz4 in one C call with the GIL released (`Compressor.scan_pages`), and
tests/test_compressors.py holds the two to the same results.

Not here: where the results go (zblock.entries), which compressor or context runs them
(zblock.acomp).
"""

from __future__ import annotations

import errno
from array import array
from typing import Callable, NamedTuple, Sequence

from . import PAGE_SIZE

NONE, SAME, COMP, RAW = 0, 1, 2, 3
WORDS = PAGE_SIZE // 8


class Scan(NamedTuple):
    objs: list
    states: bytes | bytearray
    lengths: Sequence[int]  # 16-bit
    fills: Sequence[int]    # 64-bit
    failed: int             # compressor failures (stored raw, counted as reject_compress_fail)


ZERO_PAGE = bytes(PAGE_SIZE)


def filled_page(fill: int) -> bytes:
    """The page a same-filled entry stands for (the shared zero page for fill 0, the common one)."""
    return ZERO_PAGE if fill == 0 else int(fill).to_bytes(8, "little") * WORDS


def classify(mv: memoryview, n: int, detect_same: bool) -> tuple[bytearray, list[int], array]:
    """The host's half of the checks for n pages of `mv` (format 'B'): states (SAME or COMP per
    page), the pages to compress, and fills (each page's first word)."""
    words = mv[:n * PAGE_SIZE].cast("Q")
    fills = array("Q", words[::WORDS])
    states = bytearray((COMP,)) * n
    if detect_same:
        for i in range(n):
            # first word == last word rules out nearly every other page before the full compare
            if fills[i] == words[i * WORDS + WORDS - 1]:
                at = i * PAGE_SIZE
                if mv[at + 8:at + PAGE_SIZE].tobytes() == mv[at:at + PAGE_SIZE - 8].tobytes():
                    states[i] = SAME            # each word equals the one after it
    todo = [i for i in range(n) if states[i] == COMP] if detect_same else list(range(n))
    return states, todo, fills


def compress_each(comp, pages: Sequence) -> list:
    """Each page compressed: bytes shorter than a page, -ENOSPC (did not fit: zswap's "compress
    poor" rule) or -EINVAL (the compressor failed on it)."""
    try:
        res = comp.compress_many(pages)             # one library loop
    except Exception:
        res = []
        for p in pages:                             # find the page that failed
            try:
                res.append(comp.compress(p))
            except Exception:
                res.append(-errno.EINVAL)
    return [c if type(c) is int or len(c) < PAGE_SIZE else -errno.ENOSPC for c in res]


def scan_pages(mv: memoryview, n: int, compress: Callable[[list], list], detect_same: bool,
               raw_poor: bool) -> Scan:
    """The checks for n pages of `mv`; `compress` maps a list of pages to compress_each()'s
    results (a compressor's, or an engine's)."""
    mv = memoryview(mv).cast("B")
    states, todo, fills = classify(mv, n, detect_same)
    results = compress([mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in todo]) if todo else []
    return assemble(mv, n, states, todo, results, fills, raw_poor)


def assemble(mv: memoryview, n: int, states: bytearray, todo: list, results: list,
             fills: Sequence[int], raw_poor: bool) -> Scan:
    """A Scan from the compression results of pages `todo` (the others are SAME already)."""
    objs: list = [None] * n
    lengths = array("H", bytes(2 * n))
    failed = 0
    for i, r in zip(todo, results):
        if type(r) is bytes:
            objs[i] = r
            lengths[i] = len(r)
            continue
        if r == -errno.ENOSPC and not raw_poor:
            states[i] = NONE
            continue
        if r != -errno.ENOSPC:
            failed += 1                             # 6.18 stores a page it failed on as-is
        states[i] = RAW
        objs[i] = bytes(mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
        lengths[i] = PAGE_SIZE
    return Scan(objs, states, lengths, fills, failed)


def from_c(result: tuple) -> Scan:
    """zblock._lz4pages.scan_pages' (objs, states, lengths, fills) buffers as a Scan."""
    objs, states, lengths, fills = result
    return Scan(objs, states, memoryview(lengths).cast("H"), memoryview(fills).cast("Q"), 0)


def concat(scans: list[Scan]) -> Scan:
    """The scans of consecutive chunks of one request, as one."""
    if len(scans) == 1:
        return scans[0]
    return Scan([o for s in scans for o in s.objs], b"".join(s.states for s in scans),
                array("H", b"".join(s.lengths for s in scans)),
                array("Q", b"".join(s.fills for s in scans)), sum(s.failed for s in scans))
