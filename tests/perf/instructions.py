"""Instructions a 4 KiB request costs in-process, counted by callgrind: deterministic where
timings on this VM vary by 20% from run to run (docs/performance.md, fourteenth session).

    python -P tests/perf/instructions.py [OP ...]

OP: answer (NativeFuse._answer of a READ of a pooled LZ4 page), raw (the same of a page stored raw:
what test_random.py's reads mostly meet, after fio's random writes), read (Store.read), load
(Cache.load_page), write (NativeFuse._answer of a WRITE: the FUSE side, queued), disk
(Cache.load_page of a page on disk), cluster (Store.read of 32 KiB: a swap-in), batch
(Cache.store_pages of 32 pages at a random place: a write-behind worker's store of a swap-out;
reported per batch, not per page). Needs valgrind (not a dependency: `apt-get install
valgrind`). It runs itself under callgrind once per OP, and counts only what runs inside
functools.reduce (the measured loop, in the main thread). PYTHONPATH picks the tree measured.
"""

from __future__ import annotations

import functools
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

N = 3000
OPS = ("answer", "raw", "read", "load", "write", "disk", "cluster", "batch")
DATA = Path("/var/tmp/zblock-bench")          # the bench's data sets (tests/perf/harness.py)


def measure(op: str) -> int:
    """Instructions per `op`: this script under callgrind, collecting inside reduce only."""
    env = dict(os.environ, PYTHONHASHSEED="0", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--toggle-collect=functools_reduce",
         "--callgrind-out-file=/dev/null", sys.executable, "-P", __file__, "--run", op],
        env=env, capture_output=True, text=True, timeout=900)
    m = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode or m is None:
        raise SystemExit(f"{op}: the run failed\n{out.stderr[-2000:]}")
    return int(m.group(1)) // N


def run(op: str) -> None:
    """One op N times on a 16 MiB store on /dev/shm (the loop callgrind counts)."""
    from zblock.config import Config
    from zblock.entries import COMP, DISK, RAW
    from zblock.fuse import protocol as p
    from zblock.fuse.native import ARG, WRITE_DATA, NativeFuse, _FileInfo
    from zblock.fuse_ops import ZblockOps
    from zblock.store import Store

    disk = op == "disk"
    d = tempfile.mkdtemp(dir="/dev/shm")
    store = None
    try:
        store = Store.open(f"{d}/backing", 16 << 20,
                           Config.from_strings({"pool_limit": "0"} if disk else {}))
        if op == "raw":
            store.write(0, random.Random(2).randbytes(16 << 20))
        else:
            with open(DATA / ("usr-256M.img" if disk else "mix-256M.img"), "rb") as f:
                store.write(0, f.read(16 << 20))
        store.fsync()
        cache = store.cache
        rng = random.Random(1)
        want = DISK if disk else RAW if op == "raw" else COMP
        pages = [q for q in (rng.randrange(4096) for _ in range(20000))
                 if cache.table.state[q] == want][:N]
        if op == "cluster":                     # swap-in clusters: 8 pages from a multiple of 8
            pages = [q & ~7 for q in pages]
        if op == "batch":                       # 32 pages of the set to a random place
            batch = 32 * 4096
            with open(DATA / "mix-256M.img", "rb") as f:
                data = f.read(512 * batch)
            pages = [(rng.randrange(4096 - 32), data[i % 512 * batch:(i % 512 + 1) * batch])
                     for i in range(N)]
        assert len(pages) == N, f"only {len(pages)} pages in the state measured"
        ops = ZblockOps(store)
        fuse = NativeFuse(ops, d, fsname="zblock")
        node = fuse.nodes.children[1][b"disk"]
        fi = _FileInfo(lendable=True)
        ops.open("/disk", fi)

        def request(opcode: int, page: int) -> memoryview:
            size = 4096 if opcode == p.WRITE else 0
            buf = bytearray((WRITE_DATA if size else ARG + p.READ_IN.size) + size)
            p.IN_HEADER.pack_into(buf, 0, len(buf), opcode, 1, node, 0, 0, 0, 0, 0)
            (p.WRITE_IN if size else p.READ_IN).pack_into(buf, ARG, fi.fh, page * 4096, 4096, 0)
            if size:
                buf[WRITE_DATA:] = os.urandom(4096)
            return memoryview(buf)

        calls = {
            "answer": (lambda a, m: fuse._answer(p.READ, node, m, len(m), fi), p.READ),
            "write": (lambda a, m: fuse._answer(p.WRITE, node, m, len(m), fi), p.WRITE),
            "read": (lambda a, q: store.read(q << 12, 4096), None),
            "load": (lambda a, q: cache.load_page(q), None),
            "disk": (lambda a, q: cache.load_page(q), None),
            "cluster": (lambda a, q: store.read(q << 12, 32768), None),
            "batch": (lambda a, item: cache.store_pages(*item), None),
        }
        calls["raw"] = calls["answer"]          # the same request, of a page stored raw
        call, opcode = calls[op]
        items = [request(opcode, q) for q in pages] if opcode else pages
        for item in items[:200]:                # warm: caches, specialised bytecode
            call(None, item)
        functools.reduce(call, items, None)
    finally:
        if store is not None:
            store.close()
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    if sys.argv[1:2] == ["--run"]:
        run(sys.argv[2])
        return
    for op in sys.argv[1:] or OPS:
        if op not in OPS:
            raise SystemExit(f"unknown op {op!r}: one of {', '.join(OPS)}")
        print(f"{op:7s} {measure(op):7d} instructions", flush=True)


if __name__ == "__main__":
    main()
