"""The `.zbmeta` checksum sidecar's format: its header, its entry values and its per-page table.

Beside a backing file, `PATH.zbmeta` holds

    block 0      header: magic, version, page size, size, flags (bit 0: clean shutdown, bit 1:
                 the pages are encrypted, see zblock.seal; an encrypted image's header says
                 version 3, which zblock before encryption refuses, so it never serves the
                 ciphertext as data),
                 entry size, and at clean shutdown the data file's mtime_ns and inode; crc32c
    block 1...   per page two uint32 values, (durable, latest), little-endian, 512 pages per
                 4 KiB block, exactly the in-memory table (zblock.backing's flat 'I' array,
                 npages rounded up to 512 rows), so a touched block is written straight from it.

Entry values: CRC32C of the page, "folded" so that 0, 1 and 2 stay free as sentinels:
    ZERO (0)       the page reads as zeros without touching the disk (never written, discarded)
    UNCHECKED (1)  the content predates the sidecar (a raw image imported without one):
                   accepted as it is until written
    LOST (2)       acknowledged data that never reached the file (a clean close whose write-back
                   failed): never matches, so the page reads EIO until it is written again
Version 1 sidecars kept only 0 and 1 free (crc 0 and 1 folded to 2 and 3); they are converted
at open (2 -> 3 is exact: both stand for "crc 0..3" under the version 2 fold).
A page verifies when its data matches `durable` or `latest` (verify()).

Invariant: a row of zeros is (ZERO, ZERO), so a hole in the file reads as entries of pages that
were never written: a new sidecar is one hole, and readers may skip holes.

What this module does not do: open, lock, read or write files (zblock.backing_open at open,
zblock.backing afterwards), or say what a pair means for a read after a crash (zblock.backing).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import crc32c as _crc32c

from . import PAGE_SIZE, vec
from .errors import BackingError

META_SUFFIX = ".zbmeta"
META_MAGIC = b"ZBLKMETA"
META_VERSION = 2
ENCRYPTED_VERSION = 3       # version 2's format, FLAG_ENCRYPTED set
HEADER_SIZE = 4096
ENTRY_SIZE = 8  # two uint32: durable, latest
ENTRIES_PER_BLOCK = PAGE_SIZE // ENTRY_SIZE  # 512
FLAG_CLEAN = 1
FLAG_ENCRYPTED = 2
# magic, version, page_size, size, flags, entry_size, data_mtime_ns, data_ino; then crc32c
HEADER = struct.Struct("<8sIIQIIqQ")

ZERO = 0
UNCHECKED = 1
LOST = 2
FOLD = 3  # the smallest value a page's checksum takes: 0..2 are the sentinels
crc = _crc32c.crc32c

# Pages read at a time to check them against the table (fsck, settling pairs at open).
PAGE_RUN = 256
# Scans of the table take this many rows at a time: no temporary the table's size.
SCAN_ROWS = 1 << 20


def fold(crcs) -> list[int]:
    """The entry values of checksums `crcs` (ints): the sentinels are kept free (crcs 0..3 then
    share one value: negligible strength lost)."""
    return [c if c >= FOLD else FOLD for c in crcs]


ZERO_PAGE_CRC = fold([crc(bytes(PAGE_SIZE))])[0]


def meta_path(path: str) -> str:
    return path + META_SUFFIX


def table_rows(npages: int) -> int:
    return -(-npages // ENTRIES_PER_BLOCK) * ENTRIES_PER_BLOCK


def row_steps(ranges, npages: int):
    """Slices of at most SCAN_ROWS rows over `ranges` ((first, end) rows), clipped to the
    disk's `npages` rows."""
    for first, end in ranges:
        end = min(end, npages)
        for lo in range(first, end, SCAN_ROWS):
            yield slice(lo, min(lo + SCAN_ROWS, end))


def page_crcs(data, count: int) -> list[int]:
    """The entry values of the `count` pages in the buffer `data`."""
    mv = memoryview(data)
    return fold(crc(mv[o:o + PAGE_SIZE]) for o in range(0, count * PAGE_SIZE, PAGE_SIZE))


def verify(crcs, pairs) -> list[bool]:
    """Per page: the data (entry value in `crcs`) matches one of its two values, `pairs` being
    the pages' rows flat, (durable, latest) each (ZERO means the zero page)."""
    return [c == d or c == l or d == UNCHECKED or l == UNCHECKED
            or (c == ZERO_PAGE_CRC and (d == ZERO or l == ZERO))
            for c, d, l in zip(crcs, pairs[0::2], pairs[1::2])]


# Scans of rows lo .. hi of the table (a flat 'I' memoryview, row r at 2r and 2r + 1), a step of
# at most SCAN_ROWS rows at a time, in C: a 0/1 mask per row.

def used_rows(table: memoryview, lo: int, hi: int) -> bytes:
    """1 where the row is not (ZERO, ZERO)."""
    raw = bytes(memoryview(table).cast("B")[lo * ENTRY_SIZE:hi * ENTRY_SIZE])
    out = bytearray(hi - lo)
    zero = bytes(PAGE_SIZE)
    for o in range(0, len(raw), PAGE_SIZE):     # a block at a time: most of a disk is unused
        part = raw[o:o + PAGE_SIZE]
        if part != zero[:len(part)]:
            out[o // ENTRY_SIZE:(o + len(part)) // ENTRY_SIZE] = _any_byte(part, ENTRY_SIZE)
    return bytes(out)


def split_rows(table: memoryview, lo: int, hi: int) -> bytes:
    """1 where the row holds two values (durable != latest)."""
    durable = int.from_bytes(table[2 * lo:2 * hi:2].tobytes(), "little")
    latest = int.from_bytes(table[2 * lo + 1:2 * hi:2].tobytes(), "little")
    return _any_byte((durable ^ latest).to_bytes(4 * (hi - lo), "little"), 4)


def _any_byte(raw, width: int) -> bytes:
    """0/1 per `width` bytes (a power of 2) of `raw`: 1 where one of them is not 0. The 0/1 per
    byte, read as one integer, is or-ed into the first byte of each item by halving shifts."""
    bits = int.from_bytes(vec.mask_nonzero(raw), "little")
    shift = width * 4
    while shift >= 8:
        bits |= bits >> shift
        shift //= 2
    return bits.to_bytes(len(raw), "little")[::width]


# ---------------------------------------------------------------------------------------------
# header


def pack_header(size: int, clean: bool, mtime_ns: int = 0, ino: int = 0,
                encrypted: bool = False) -> bytes:
    flags = (FLAG_CLEAN if clean else 0) | (FLAG_ENCRYPTED if encrypted else 0)
    version = ENCRYPTED_VERSION if encrypted else META_VERSION
    head = HEADER.pack(META_MAGIC, version, PAGE_SIZE, size, flags, ENTRY_SIZE, mtime_ns, ino)
    head += struct.pack("<I", crc(head))
    return head + bytes(HEADER_SIZE - len(head))


@dataclass
class Header:
    version: int
    page_size: int
    size: int
    clean: bool
    entry_size: int
    mtime_ns: int
    ino: int
    encrypted: bool = False


def parse_header(raw: bytes, where: str) -> Header:
    """BackingError naming the problem unless `raw` is a valid header of this version."""
    n = HEADER.size
    if len(raw) < n + 4:
        raise BackingError(f"{where}: sidecar too short for a header")
    magic, version, page_size, size, flags, entry_size, mtime_ns, ino = HEADER.unpack(raw[:n])
    if magic != META_MAGIC:
        raise BackingError(f"{where}: not a zblock sidecar (bad magic)")
    if struct.unpack("<I", raw[n:n + 4])[0] != crc(raw[:n]):
        raise BackingError(f"{where}: sidecar header checksum mismatch")
    if version not in (1, META_VERSION, ENCRYPTED_VERSION) \
            or bool(flags & FLAG_ENCRYPTED) != (version == ENCRYPTED_VERSION):
        raise BackingError(f"{where}: sidecar version {version} (flags {flags:#x}) is not "
                           f"supported (want {META_VERSION}, or {ENCRYPTED_VERSION} encrypted)")
    if page_size != PAGE_SIZE or entry_size != ENTRY_SIZE:
        raise BackingError(f"{where}: sidecar page size {page_size} / entry size {entry_size} "
                           f"not supported (want {PAGE_SIZE} / {ENTRY_SIZE})")
    return Header(version, page_size, size, bool(flags & FLAG_CLEAN), entry_size, mtime_ns, ino,
                  bool(flags & FLAG_ENCRYPTED))
