"""Where a server's memory goes, in-process and without FUSE (docs/performance.md, 2026-12-02).

    python -P tests/perf/memory_breakdown.py idle            # an idle server's RSS, step by step
    python -P tests/perf/memory_breakdown.py growth [--verify] [--threads N] [--settle S] [DATA]

`idle` runs each step of a server's start in a fresh interpreter, cumulatively, and prints
VmRSS, RssAnon and RssFile after it: the interpreter, the modules `python -m zblock mount
--foreground` imports (with the native front end), then tune_malloc, logging, Store.open of a
64 MiB disk, stats(), and two seconds idle. (A real mount's session adds more: not measured
here, it needs a mount; the memory benchmark's base_MiB is the whole.)

`growth` opens a Store (default Config) on a file in /var/tmp, writes DATA (default the bench's
256 MiB /usr tar) in 1 MiB writes, optionally reads it all back in 1 MiB reads (--verify, as the
benchmark does), serves the requests one at a time from a pool of N threads (--threads), with
--libfuse allocating in them as libfuse 3's high-level API and mfusepy do (a receive buffer of
1 MiB + 4 KiB per worker, a malloc'd 1 MiB buffer per request, mfusepy's bytes copy of a write
and its memmove of a reply), waits --settle seconds, and prints the RSS growth beside what it
is made of: the compressed bytes (compr_data_size), each object's header and malloc rounding
(pool_total_size - compr_data_size), the per-page tables (table_bytes, which counts arrays on
the heap whole: it errs high), and malloc's and pymalloc's own figures (mallinfo2,
sys._debugmallocstats). Run as the server runs, with python -P; zblock is whatever that python
imports (its venv's tree, or PYTHONPATH=TREE).

File-backed RSS depends on the page cache: a library whose file is wholly cached (a fresh venv)
is mapped in bigger pieces by fault-around. Compare RssAnon across runs; RssFile only within one.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
import threading
import time

MiB = 1 << 20
USR = "/var/tmp/zblock-bench/usr-256M.img"
DISK_DIR = "/var/tmp/zblock-mem"

# ---------------------------------------------------------------------------------------------
# idle: cumulative steps, each in a fresh interpreter

SERVER_IMPORTS = [
    ("the interpreter (python -P, site)", "pass"),
    ("+ zblock.cli (python -m zblock)", "import zblock.cli"),
    ("+ zblock.daemon, zblock.hardening", "from zblock import daemon, hardening"),
    ("+ the native front end, zblock.fuse_ops",
     "from zblock.fuse import native; from zblock import fuse_ops"),
    ("+ zblock.store (the core)", "from zblock.store import Store"),
    ("+ tune_malloc, logging, Store.open (64 MiB), stats()",
     "from zblock.pool import tune_malloc; from zblock.config import Config; tune_malloc(); "
     "daemon.setup_logging(); s = Store.open(DISK, 64 << 20, Config()); s.stats()"),
    ("+ 2 s idle", "time.sleep(2)"),
]

STATUS = "d = {}\nfor ln in open('/proc/self/status'):\n    k, _, v = ln.partition(':')\n" \
         "    d[k] = v\nprint(' '.join(d[k].split()[0] for k in ('VmRSS', 'RssAnon', 'RssFile')))\n"


def idle() -> None:
    os.makedirs(DISK_DIR, exist_ok=True)
    disk = os.path.join(DISK_DIR, f"idle-{os.getpid()}.img")
    print(f"{'step':55s} {'VmRSS':>7s} {'anon':>7s} {'file':>7s}   (MiB)")
    try:
        for i, (label, _) in enumerate(SERVER_IMPORTS):
            for p in (disk, disk + ".zbmeta"):
                if os.path.exists(p):
                    os.unlink(p)
            code = f"import os, time\nDISK = {disk!r}\n" + \
                "\n".join(c for _, c in SERVER_IMPORTS[:i + 1]) + "\n" + STATUS
            out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True,
                                 text=True, check=True, cwd="/").stdout.split()
            rss, anon, file = (int(x) / 1024 for x in out[-3:])
            print(f"{label:55s} {rss:7.2f} {anon:7.2f} {file:7.2f}")
    finally:
        for p in (disk, disk + ".zbmeta"):
            if os.path.exists(p):
                os.unlink(p)


# ---------------------------------------------------------------------------------------------
# growth: one process

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                 "usmblks", "fsmblks", "uordblks", "fordblks",
                                                 "keepcost")]


def _rollup() -> dict:
    d = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            m = re.match(r"(\w+):\s+(\d+) kB", line)
            if m:
                d[m.group(1)] = int(m.group(2)) << 10
    return d


def _pymalloc() -> int:
    """Bytes in pymalloc's allocated blocks (sys._debugmallocstats, which writes to fd 2)."""
    r, w = os.pipe()
    saved = os.dup(2)
    os.dup2(w, 2)
    try:
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    m = re.search(rb"# bytes in allocated blocks\s*=\s*([\d,]+)", b"".join(chunks))
    return int(m.group(1).replace(b",", b"")) if m else 0


def growth(args) -> None:
    import concurrent.futures
    import gc

    from zblock import pool
    from zblock.config import Config
    from zblock.store import Store

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    pool.tune_malloc()                          # as the server does before it starts threads
    os.makedirs(DISK_DIR, exist_ok=True)
    disk = os.path.join(DISK_DIR, f"growth-{os.getpid()}.img")
    size = os.path.getsize(args.data)

    def snap():
        gc.collect()
        m = libc.mallinfo2()
        return _rollup(), m.uordblks, m.fordblks, _pymalloc()

    r0, used0, free0, py0 = snap()
    store = Store.open(disk, size, Config())
    try:
        t0 = time.monotonic()

        fd = os.open(args.data, os.O_RDONLY)
        worker = threading.local()

        def libfuse_buffer(size):
            """A worker's receive buffer at its first request (only the header lands in it:
            libfuse splices a write's data into a pipe), then malloc(size) for the request."""
            if not hasattr(worker, "recv"):
                worker.recv = libc.malloc(MiB + 4096)      # kept while the worker lives
                ctypes.memset(worker.recv, 0, 4096)
            return libc.malloc(size)

        def write_at(off):
            if not args.libfuse:
                store.write(off, os.pread(fd, MiB, off))
                return
            buf = libfuse_buffer(MiB)
            os.preadv(fd, [(ctypes.c_char * MiB).from_address(buf)], off)
            store.write(off, ctypes.string_at(buf, MiB))    # mfusepy's write
            libc.free(buf)

        def read_matches(off):
            if not args.libfuse:
                return store.read(off, MiB) == os.pread(fd, MiB, off)
            buf = libfuse_buffer(MiB)
            reply = store.read(off, MiB)
            ctypes.memmove(buf, reply, len(reply))           # mfusepy's read
            del reply
            ok = ctypes.string_at(buf, MiB) == os.pread(fd, MiB, off)
            libc.free(buf)
            return ok

        with concurrent.futures.ThreadPoolExecutor(args.threads) as ex:
            for off in range(0, size, MiB):     # one request at a time, as the kernel sends them
                ex.submit(write_at, off).result()
            store.stats()                       # the write-behind queue settled
            for off in range(0, size, MiB) if args.verify else ():
                if not ex.submit(read_matches, off).result():
                    raise SystemExit(f"read-back mismatch at MiB {off >> 20}")
        os.close(fd)
        took = time.monotonic() - t0
        time.sleep(args.settle)
        st = store.stats()
        r1, used1, free1, py1 = snap()
    finally:
        store.close()
        for p in (disk, disk + ".zbmeta"):
            os.unlink(p)

    cached = st["stored_pages"] - st["same_filled_pages"]
    grown = r1["Rss"] - r0["Rss"]
    parts = [
        ("compressed bytes (compr_data_size)", st["compr_data_size"]),
        ("objects' headers and malloc rounding", st["pool_total_size"] - st["compr_data_size"]),
        ("per-page tables (table_bytes)", st["table_bytes"]),
    ]
    print(f"{size >> 20} MiB of {os.path.basename(args.data)} in {took:.1f} s"
          f"{' and read back' if args.verify else ''}, {args.threads} thread(s)"
          f"{' with libfuse buffers' if args.libfuse else ''}, then {args.settle:.1f} s idle")
    print(f"  pages {st['stored_pages']}: {cached} objects ({st['stored_incompressible_pages']} raw), "
          f"{st['same_filled_pages']} same-filled; "
          f"{(st['pool_total_size'] - st['compr_data_size']) / max(cached, 1):.1f} bytes an object "
          f"beyond its stream")
    print(f"  RSS growth {grown / MiB:8.2f} MiB (anon {(r1['Anonymous'] - r0['Anonymous']) / MiB:.2f}, "
          f"file {(r1['Rss'] - r1['Anonymous'] - r0['Rss'] + r0['Anonymous']) / MiB:.2f})")
    rest = grown
    for label, n in parts:
        print(f"    {label:40s} {n / MiB:8.2f}")
        rest -= n
    print(f"    {'the rest':40s} {rest / MiB:8.2f}")
    print(f"  malloc in use {(used1 - used0) / MiB:+.2f} MiB, free in its lists "
          f"{(free1 - free0) / MiB:+.2f} (resident or not); pymalloc blocks "
          f"{(py1 - py0) / MiB:+.2f}")
    print(f"  pool_total_size {st['pool_total_size'] / MiB:.2f} MiB = "
          f"{st['pool_total_size'] / st['compr_data_size']:.4f} x compr_data_size")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("idle")
    g = sub.add_parser("growth")
    g.add_argument("data", nargs="?", default=USR)
    g.add_argument("--verify", action="store_true", help="read everything back in 1 MiB reads")
    g.add_argument("--threads", type=int, default=1, help="threads serving the requests")
    g.add_argument("--libfuse", action="store_true",
                   help="allocate in those threads as libfuse 3 and mfusepy do")
    g.add_argument("--settle", type=float, default=3.0, help="seconds idle before measuring")
    args = ap.parse_args()
    if args.cmd == "idle":
        idle()
    else:
        growth(args)


if __name__ == "__main__":
    main()
