"""A memory hog with checksummed pages: the client of the real swap tests.

    python tests/hog.py --mib 320 [--passes 1] [--seed 1] [--cgroup-procs PATH]

With --cgroup-procs it first moves itself into that cgroup (writes its pid to PATH: v1
`cgroup.procs`/`tasks` or v2 `cgroup.procs`), so the pages it allocates are charged there and
the cgroup's limit forces them out to swap.

Working set: one anonymous mapping of MIB MiB. Every 4 KiB page holds
    [0:8]   page index (u64)   [8:16] generation (u64)   [16:20] CRC32 of [20:4096] (u32)
    [20:]   payload: one of 64 precomputed blocks, half text-like (compresses ~3x) half random,
            chosen by (index, generation), so pages differ and compress like real anonymous memory.
Pass 0 writes every page (generation 0). Each further pass visits 1 MiB chunks in a seeded random
order, verifies them and rewrites them with the next generation: pages go out to swap and come
back, some many times. A final pass verifies every page: header, CRC and the exact payload.

Prints one JSON line {"pages", "verified", "errors", "seconds", "first_errors"}; exit 0 only when
every page verified (with --hold, only after a line on stdin). No mocks: whatever swap is underneath has to give every byte back.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
import zlib

import numpy as np

PAGE = 4096
HDR = 20
NBASE = 64
CHUNK = 256          # pages per step: 1 MiB, vectorised


def make_base(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    words = np.frombuffer(b"zblock swap page compressed cache kernel zswap acomp loop device "
                          b"the quick brown fox jumps over the lazy dog 0123456789 ", dtype=np.uint8)
    base = np.empty((NBASE, PAGE - HDR), dtype=np.uint8)
    half = (PAGE - HDR) // 2
    for k in range(NBASE):
        start = rng.integers(0, len(words))
        base[k, :half] = np.resize(np.roll(words, -int(start)), half)
        base[k, half:] = rng.integers(0, 256, PAGE - HDR - half, dtype=np.uint8)
    crcs = np.array([zlib.crc32(base[k].tobytes()) for k in range(NBASE)], dtype=np.uint32)
    return base, crcs


def choose(idx: np.ndarray, gen: int) -> np.ndarray:
    return ((idx * 2654435761 + gen * 40503) >> 7) % NBASE


def fill(pages: np.ndarray, words: np.ndarray, lo: int, hi: int, gen: int, base, crcs) -> None:
    idx = np.arange(lo, hi, dtype=np.uint64)
    k = choose(idx, gen).astype(np.intp)
    pages[lo:hi, HDR:] = base[k]
    words[lo:hi, 0] = idx
    words[lo:hi, 1] = gen
    hdr32 = pages[lo:hi, 16:20].view(np.uint32)
    hdr32[:, 0] = crcs[k]


def verify(buf: mmap.mmap, pages: np.ndarray, words: np.ndarray, lo: int, hi: int, gen: int,
           base, errors: list) -> int:
    """Check pages lo..hi: (verified, failed); the first failures are described in `errors`."""
    idx = np.arange(lo, hi, dtype=np.uint64)
    k = choose(idx, gen).astype(np.intp)
    ok = (words[lo:hi, 0] == idx) & (words[lo:hi, 1] == gen)
    ok &= (pages[lo:hi, HDR:] == base[k]).all(axis=1)
    mv = memoryview(buf)
    stored = pages[lo:hi, 16:20].view(np.uint32)[:, 0]
    for j in range(hi - lo):             # the CRC is over the bytes as they are in memory
        p = lo + j
        if zlib.crc32(mv[p * PAGE + HDR:(p + 1) * PAGE]) != int(stored[j]):
            ok[j] = False
    bad = np.flatnonzero(~ok)
    for j in bad[:max(0, 10 - len(errors))]:
        p = lo + int(j)
        errors.append({"page": p, "index": int(words[p, 0]), "gen": int(words[p, 1]), "want_gen": gen})
    return int(ok.sum()), len(bad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, required=True)
    ap.add_argument("--passes", type=int, default=1, help="verify+rewrite passes after the first write")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cgroup-procs", help="cgroup procs file to join first")
    ap.add_argument("--hold", action="store_true",
                    help="after printing the result, keep the pages until a line arrives on stdin "
                         "(lets a test look at swap while they are still there)")
    args = ap.parse_args(argv)

    if args.cgroup_procs:
        with open(args.cgroup_procs, "w") as f:
            f.write(str(os.getpid()))
    t0 = time.monotonic()
    npages = args.mib * 256
    base, crcs = make_base(args.seed)
    buf = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages = np.frombuffer(buf, dtype=np.uint8).reshape(npages, PAGE)
    words = np.frombuffer(buf, dtype=np.uint64).reshape(npages, PAGE // 8)
    gens = np.zeros((npages + CHUNK - 1) // CHUNK, dtype=np.int64)
    errors: list = []
    nerr = 0

    for lo in range(0, npages, CHUNK):
        fill(pages, words, lo, min(npages, lo + CHUNK), 0, base, crcs)
    t_written = time.monotonic()
    rng = np.random.default_rng(args.seed + 1)
    for p in range(1, args.passes + 1):
        for c in rng.permutation(len(gens)):
            lo, hi = int(c) * CHUNK, min(npages, (int(c) + 1) * CHUNK)
            _, bad = verify(buf, pages, words, lo, hi, int(gens[c]), base, errors)
            nerr += bad
            fill(pages, words, lo, hi, p, base, crcs)
            gens[c] = p
    t_passed = time.monotonic()
    verified = 0
    for c in range(len(gens)):
        lo, hi = c * CHUNK, min(npages, (c + 1) * CHUNK)
        good, bad = verify(buf, pages, words, lo, hi, int(gens[c]), base, errors)
        verified += good
        nerr += bad
    result = {"pages": npages, "verified": verified, "errors": nerr,
              "seconds": round(time.monotonic() - t0, 2), "first_errors": errors[:10],
              # the first write, the verify+rewrite passes, the final verify
              "phase_seconds": [round(t_written - t0, 2), round(t_passed - t_written, 2),
                                round(time.monotonic() - t_passed, 2)]}
    print(json.dumps(result), flush=True)
    if args.hold:
        sys.stdin.readline()          # EOF (the test died) ends the wait too
    del pages, words
    buf.close()
    return 0 if nerr == 0 and verified == npages else 1


if __name__ == "__main__":
    sys.exit(main())
