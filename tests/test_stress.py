"""Stress: several processes write self-describing pages to random places on a mounted disk for a
bounded time while the compressor, zstd level, pool limit and limit policy change through params;
then every page verifies, before and after a clean unmount and remount.

A page says what it is: magic, page index, writer, sequence number, a kind byte and a CRC32C of
the whole page (with the CRC field zeroed). Each writer owns blocks of 16 pages (block % W == w)
and writes runs of 1..16 pages inside its own blocks, so it knows the last sequence number of
every page it owns; a shared region at the end is written by everyone (one writer must win each
page whole: the CRC and the index check that).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import struct
import time

import crc32c
import pytest

import mountutil
from zblock import PAGE_SIZE

pytestmark = [pytest.mark.timeout(240), pytest.mark.mount, pytest.mark.slow]

MAGIC = b"ZBSTRESS"
HEAD = struct.Struct("<8sIIQBxxxI")          # magic, page, writer, seq, kind, crc
NPAGES = 8192                                # 32 MiB disk
SHARED = 256                                 # the last 256 pages are written by everyone
BLOCK = 16
WRITERS = 3
DURATION = 10.0


def make_page(page: int, writer: int, seq: int, rng: random.Random) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:                    # text-like, compressible
        body = (f"w{writer} s{seq} " * 600).encode()
    elif kind == 1:                  # incompressible
        body = rng.randbytes(PAGE_SIZE)
    else:                            # mostly zeros
        body = bytes(100) + str(seq).encode()
    page_bytes = bytearray(PAGE_SIZE)
    body = body[:PAGE_SIZE - HEAD.size]
    page_bytes[HEAD.size:HEAD.size + len(body)] = body
    HEAD.pack_into(page_bytes, 0, MAGIC, page, writer, seq, kind, 0)
    crc = crc32c.crc32c(page_bytes)
    HEAD.pack_into(page_bytes, 0, MAGIC, page, writer, seq, kind, crc)
    return bytes(page_bytes)


def check_page(raw: bytes, page: int) -> tuple[int, int] | None:
    """(writer, seq) of a valid page, None for an all-zero page; AssertionError otherwise."""
    if raw == bytes(PAGE_SIZE):
        return None
    magic, idx, writer, seq, kind, crc = HEAD.unpack_from(raw)
    assert magic == MAGIC, f"page {page}: not a stress page: {raw[:32]!r}"
    assert idx == page, f"page {page} holds page {idx}'s data"
    zeroed = bytearray(raw)
    HEAD.pack_into(zeroed, 0, magic, idx, writer, seq, kind, 0)
    assert crc32c.crc32c(zeroed) == crc, f"page {page}: CRC mismatch (torn or corrupted)"
    return writer, seq


def writer_main(disk: str, writer: int, deadline: float, out: str) -> None:
    rng = random.Random(1000 + writer)
    last: dict[int, int] = {}
    blocks = [b for b in range((NPAGES - SHARED) // BLOCK) if b % WRITERS == writer]
    fd = os.open(disk, os.O_RDWR)
    seq = 0
    try:
        while time.monotonic() < deadline:
            if rng.random() < 0.1:
                n = rng.randrange(1, 5)
                start = NPAGES - SHARED + rng.randrange(SHARED - n)
            else:
                b = rng.choice(blocks)
                n = rng.randrange(1, BLOCK + 1)
                start = b * BLOCK + rng.randrange(BLOCK - n + 1)
            pages = []
            for p in range(start, start + n):
                seq += 1
                pages.append(make_page(p, writer, seq, rng))
                if p < NPAGES - SHARED:
                    last[p] = seq
            os.pwrite(fd, b"".join(pages), start * PAGE_SIZE)
            if rng.random() < 0.02:
                os.fsync(fd)
    finally:
        os.close(fd)
    with open(out, "w") as f:
        json.dump({"last": last, "writes": seq}, f)


def verify(disk: str, expect: dict[int, tuple[int, int]]) -> dict:
    counts = {"owned": 0, "shared": 0, "zero": 0}
    with open(disk, "rb", buffering=0) as f:
        for lo in range(0, NPAGES, 256):
            chunk = f.read(256 * PAGE_SIZE)
            for i in range(256):
                p = lo + i
                got = check_page(chunk[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], p)
                if p >= NPAGES - SHARED:
                    counts["shared" if got else "zero"] += 1
                elif p in expect:
                    assert got == expect[p], f"page {p}: expected writer/seq {expect[p]}, got {got}"
                    counts["owned"] += 1
                else:
                    assert got is None, f"page {p} was never written but holds {got}"
                    counts["zero"] += 1
    return counts


def test_writers_while_params_change():
    mountutil.require_mounts()
    workdir = mountutil.new_workdir("stress")
    try:
        m = mountutil.Mount(size=str(NPAGES * PAGE_SIZE), workdir=workdir, pool_limit="2M")
        with m:
            ctx = mp.get_context("fork")
            deadline = time.monotonic() + DURATION
            outs = [os.path.join(workdir, f"w{i}.json") for i in range(WRITERS)]
            procs = [ctx.Process(target=writer_main, args=(m.disk, i, deadline, outs[i]))
                     for i in range(WRITERS)]
            for p in procs:
                p.start()
            changes = 0
            rng = random.Random(5)
            settings = [("compressor", ["lz4", "zstd", "deflate", "lzo"]),
                        ("zstd_level", ["1", "3", "9"]),
                        ("pool_limit", ["512K", "2M", "8M", "1M"]),
                        ("limit_policy", ["evict", "zswap"]),
                        ("accept_threshold", ["50", "90"]),
                        ("same_filled_pages_enabled", ["Y", "N"])]
            try:
                while time.monotonic() < deadline:
                    name, values = rng.choice(settings)
                    with open(os.path.join(m.mountpoint, "params", name), "w") as f:
                        f.write(rng.choice(values) + "\n")
                    changes += 1
                    time.sleep(0.2)      # a pace for param changes, not a wait for a condition
            finally:
                for p in procs:
                    p.join(DURATION + 60)
                    if p.is_alive():
                        p.kill()
                        p.join(10)
            assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
            expect: dict[int, tuple[int, int]] = {}
            writes = 0
            for i, out in enumerate(outs):
                with open(out) as f:
                    d = json.load(f)
                writes += d["writes"]
                for page, seq in d["last"].items():
                    expect[int(page)] = (i, seq)
            counts = verify(m.disk, expect)
            st = m.stats()
            print(f"\nstress: {writes} page writes by {WRITERS} writers, {changes} param changes, "
                  f"pools now {len(st['pools'])}, written back {st['written_back_pages']}, "
                  f"limit hits {st['pool_limit_hit']}; pages {counts}")
            assert st["written_back_pages"] > 0 and changes > 10
            assert st["checksum_errors"] == 0 and st["decompress_fail"] == 0
        with mountutil.Mount(size=None, backing=m.backing, workdir=workdir) as m2:
            verify(m2.disk, expect)
    finally:
        mountutil.cleanup_dir(workdir)
