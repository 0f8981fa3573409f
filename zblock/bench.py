"""`zblock bench`: the compression path in-process, on the user's data, without a mount.

For every combination asked for -- compressor and level, accelerator (none = software contexts,
sim = the simulated engine with its hw_* settings and mode), submission (page = the seed's
page-at-a-time model, one page submitted and waited for before the next; batch = a whole request
of up to 256 pages submitted at once and waited for once) -- it replays the data through
zblock.acomp.ContextSet exactly as the store does on a FUSE request, and reports:

  write / read MB/s (wall), request latency percentiles (p50/p90/p99, us), compression ratio,
  pool bytes per stored page (zblock.pool.charge: the object's real cost, headers included),
  host CPU per page (this process's CPU; with the engine, the submitters' CPU the engine counts,
  since the engine's work stands for the device's), and with the engine its own latency
  percentiles on the engine clock.

Input: a FILE (its first --pages pages) replayed as sequential requests of --request-kib, or a
trace (--trace T: one request per line, `W|R|D OFFSET LENGTH` in bytes, `#` comments) applied to
FILE's bytes (or to the built-in mixed set when no FILE: 1/4 zero, 1/4 random, 1/2 text pages).
Same-filled pages are kept as a fill value (zswap 4.14-6.9) and cost nothing; pages that do not
compress below a page are stored raw (zswap 6.18). Every page read back is compared with what
was written: a mismatch is an error (exit 1).

Output: a table (or --json), and --plot FILE.png (matplotlib, the `bench` extra).

Not measured here: FUSE, the page cache, disk writeback -- tests/perf/ measures those.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from . import PAGE_SIZE
from .errors import UsageError, ZblockError

MAX_REQUEST_PAGES = 256   # 1 MiB: the largest FUSE request libfuse 3 sends (max_write)


# ---------------------------------------------------------------------------------------------
# input


def builtin_pages(n: int, seed: int = 1) -> list[bytes]:
    """The mixed set: 1/4 zero, 1/4 random, 1/2 text pages, seeded, shuffled."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("etaoinshrdlucmfwypvbgk") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    kinds = [0] * (n // 4) + [1] * (n // 4) + [2] * (n - 2 * (n // 4))
    rng.shuffle(kinds)
    zero = bytes(PAGE_SIZE)
    out = []
    for k in kinds:
        if k == 0:
            out.append(zero)
        elif k == 1:
            out.append(rng.randbytes(PAGE_SIZE))
        else:
            text = " ".join(rng.choices(words, weights, k=900)).encode()
            out.append((text * 2)[:PAGE_SIZE])
    return out


def file_pages(path: str, n: int) -> list[bytes]:
    try:
        with open(path, "rb") as f:
            data = f.read(n * PAGE_SIZE)
    except OSError as e:
        raise UsageError(f"bench: cannot read {path}: {e.strerror}") from None
    if not data:
        raise UsageError(f"bench: {path} is empty")
    data += bytes(-len(data) % PAGE_SIZE)
    return [data[i:i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]


def parse_trace(path: str, npages: int) -> list[tuple[str, int, int]]:
    """Requests (op, first page, page count); offsets and lengths are rounded out to pages."""
    ops = []
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise UsageError(f"bench: cannot read trace {path}: {e.strerror}") from None
    for no, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            op, off, length = parts[0].upper(), int(parts[1], 0), int(parts[2], 0)
        except (IndexError, ValueError):
            raise UsageError(f"bench: {path}:{no}: expected 'W|R|D OFFSET LENGTH', got {line!r}") from None
        if op not in ("W", "R", "D") or off < 0 or length <= 0:
            raise UsageError(f"bench: {path}:{no}: bad request {line!r}")
        first, last = off // PAGE_SIZE, (off + length + PAGE_SIZE - 1) // PAGE_SIZE
        if last > npages:
            raise UsageError(f"bench: {path}:{no}: past the end of the data ({npages} pages)")
        for s in range(first, last, MAX_REQUEST_PAGES):
            ops.append((op, s, min(MAX_REQUEST_PAGES, last - s)))
    return ops


def sequential_trace(npages: int, req_pages: int) -> list[tuple[str, int, int]]:
    w = [("W", s, min(req_pages, npages - s)) for s in range(0, npages, req_pages)]
    return w + [("R", s, n) for _, s, n in w]


# ---------------------------------------------------------------------------------------------
# one configuration


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def run_config(pages: list[bytes], trace, alg: str, level, accel: str, submit: str, hw: dict) -> dict:
    from .accel import Engine
    from .acomp import ContextSet
    from .pool import charge
    from . import scan

    engine = Engine(**hw) if accel == "sim" else None
    cs = ContextSet(alg, level, engine=engine)
    store: dict[int, tuple[str, object]] = {}   # page -> ("same", fill) | ("raw", bytes) | ("c", bytes)
    lat_w, lat_r = [], []
    wbytes = rbytes = 0
    t_w = t_r = 0.0
    cpu0 = time.process_time()
    try:
        for op, first, n in trace:
            if op == "D":
                for i in range(first, first + n):
                    store.pop(i, None)
                continue
            t0 = time.perf_counter()
            if op == "W":
                span = range(first, first + n)
                # batch: one acomp request for the write; page: one request per page, each
                # waited for (the seed's model)
                scans = [cs.compress(b"".join(pages[first:first + n]), detect_same=True)] \
                    if submit == "batch" else [cs.compress(pages[i], detect_same=True) for i in span]
                sc = scan.concat(scans)
                for i, st, obj, fill in zip(span, sc.states, sc.objs, sc.fills):
                    store[i] = ("same", fill) if st == scan.SAME else \
                        ("c", obj) if st == scan.COMP else ("raw", pages[i])
                dt = time.perf_counter() - t0
                lat_w.append(dt * 1e6)
                t_w += dt
                wbytes += n * PAGE_SIZE
            else:
                idx = [i for i in range(first, first + n) if store.get(i, ("", None))[0] == "c"]
                srcs = [store[i][1] for i in idx]
                if submit == "batch" or not srcs:
                    res = cs.decompress(srcs) if srcs else []
                else:
                    res = [cs.decompress([s])[0] for s in srcs]
                dt = time.perf_counter() - t0
                lat_r.append(dt * 1e6)
                t_r += dt
                rbytes += n * PAGE_SIZE
                for i, r in zip(idx, res):
                    if r != pages[i]:
                        raise ZblockError(f"bench: page {i} read back wrong ({alg}, {accel}, {submit})")
        cpu = time.process_time() - cpu0
        hw_stats = engine.stats() if engine is not None else None
    finally:
        cs.close()
        if engine is not None:
            engine.close()
    stored = [v for v in store.values()]
    payload = sum(len(v[1]) for v in stored if v[0] != "same")
    pool = sum(charge(len(v[1])) for v in stored if v[0] != "same")
    orig = len(stored) * PAGE_SIZE
    npages_done = max(1, (wbytes + rbytes) // PAGE_SIZE)
    row = {
        "compressor": alg if level is None else f"{alg}-{level}", "accelerator": accel,
        "mode": hw.get("mode", "-") if accel == "sim" else "-", "submit": submit,
        "write_MBps": wbytes / 1e6 / t_w if t_w else None,
        "read_MBps": rbytes / 1e6 / t_r if t_r else None,
        "write_lat_us": {"p50": _pct(lat_w, .5), "p90": _pct(lat_w, .9), "p99": _pct(lat_w, .99)},
        "read_lat_us": {"p50": _pct(lat_r, .5), "p90": _pct(lat_r, .9), "p99": _pct(lat_r, .99)},
        "ratio": orig / payload if payload else None,
        "pool_bytes_per_page": pool / len(stored) if stored else 0.0,
        "same_filled_pages": sum(1 for v in stored if v[0] == "same"),
        "raw_pages": sum(1 for v in stored if v[0] == "raw"),
        "host_cpu_us_per_page": (hw_stats["host_cpu_us_per_page"] if hw_stats
                                 else cpu * 1e6 / npages_done),
    }
    if hw_stats:
        row["engine_latency_us"] = hw_stats["latency_us"]
        row["engine_wait_us"] = hw_stats["model_wait_us"]
    return row


# ---------------------------------------------------------------------------------------------
# output


def table(rows: list[dict]) -> str:
    head = ("compressor", "accel", "mode", "submit", "wr MB/s", "rd MB/s", "wr p50", "wr p99",
            "rd p50", "rd p99", "ratio", "pool B/pg", "cpu us/pg")
    fmt = "{:<10} {:<5} {:<5} {:<6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>9} {:>9}"
    out = [fmt.format(*head)]

    def f(v, spec=".0f"):
        return "-" if v is None else format(v, spec)
    for r in rows:
        out.append(fmt.format(r["compressor"], r["accelerator"], r["mode"], r["submit"],
                              f(r["write_MBps"]), f(r["read_MBps"]),
                              f(r["write_lat_us"]["p50"]), f(r["write_lat_us"]["p99"]),
                              f(r["read_lat_us"]["p50"]), f(r["read_lat_us"]["p99"]),
                              f(r["ratio"], ".2f"), f(r["pool_bytes_per_page"]),
                              f(r["host_cpu_us_per_page"], ".1f")))
    return "\n".join(out)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), or a UsageError saying how
    to install it: run() calls this first, so a missing matplotlib fails before the runs do."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(f"bench: --plot needs matplotlib: {sys.executable} -m pip install "
                         "'zblock[bench]'") from None
    return plt


# (panel title, value of a row); one panel each, in a grid of 2 rows
PLOT_PANELS = (
    ("write MB/s", lambda r: r["write_MBps"]),
    ("read MB/s", lambda r: r["read_MBps"]),
    ("compression ratio", lambda r: r["ratio"]),
    ("write latency p99 (ms per request)", lambda r: r["write_lat_us"]["p99"] / 1000),
    ("read latency p99 (ms per request)", lambda r: r["read_lat_us"]["p99"] / 1000),
    ("host CPU (us per page)", lambda r: r["host_cpu_us_per_page"]),
)


def _plot_group(r: dict) -> str:
    """The x-axis label of a row: everything but the compressor, in the options' words, on two
    short lines (six groups fit side by side at 1600 pixels)."""
    accel = r["accelerator"] if r["mode"] == "-" else f"{r['accelerator']} {r['mode']}"
    return f"{accel}\n{r['submit']}"


def plot(rows: list[dict], path: str, title: str = "") -> None:
    """One panel per measure; in each, a group of bars per setting, one bar (colour) per
    compressor. 1600x1000 pixels."""
    plt = _pyplot()
    comps = list(dict.fromkeys(r["compressor"] for r in rows))
    groups = list(dict.fromkeys(_plot_group(r) for r in rows))
    by_key = {(r["compressor"], _plot_group(r)): r for r in rows}
    width = 0.8 / len(comps)
    fig, axes = plt.subplots(2, (len(PLOT_PANELS) + 1) // 2, figsize=(16, 10), dpi=100)
    for ax, (name, value) in zip(axes.flat, PLOT_PANELS):
        for i, comp in enumerate(comps):
            xs = [g + (i - (len(comps) - 1) / 2) * width for g in range(len(groups))]
            ys = [value(by_key[comp, g]) or 0 for g in groups]     # None: nothing measured
            ax.bar(xs, ys, width, label=comp, color=f"C{i}")
        ax.set_title(name)
        ax.set_xticks(range(len(groups)), groups)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="compressor", loc="upper right", ncols=len(comps))
    fig.suptitle(title, x=0.02, ha="left", fontsize=13)
    fig.supxlabel("--accelerator (none: software; sim: the simulated engine, --hw-mode) and "
                  "--submit (page: one page at a time; batch: a whole request at once)",
                  fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# command


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zblock bench", description=(__doc__ or "").splitlines()[0],
                                 add_help=add_help)
    ap.add_argument("file", nargs="?", help="data to compress (default: a built-in mixed set)")
    ap.add_argument("--trace", help="replay requests 'W|R|D OFFSET LENGTH' (bytes) on the data")
    ap.add_argument("--pages", type=int, default=16384, help="pages of data to use (default 16384 = 64 MiB)")
    ap.add_argument("--request-kib", type=int, default=1024, help="sequential request size (default 1024)")
    ap.add_argument("--compressor", default="lz4", help="comma list: lz4,lzo,zstd,deflate")
    ap.add_argument("--zstd-level", default="1", help="comma list of zstd levels (1..19)")
    ap.add_argument("--accelerator", default="none", help="comma list: none,sim")
    ap.add_argument("--hw-mode", default="sync", help="comma list: sync,async")
    ap.add_argument("--submit", default="page,batch", help="comma list: page,batch")
    ap.add_argument("--hw-queues", type=int, default=4)
    ap.add_argument("--hw-depth", type=int, default=128)
    ap.add_argument("--hw-latency-us", type=float, default=3.0)
    ap.add_argument("--hw-throughput-mbps", type=float, default=2000.0)
    ap.add_argument("--hw-batch", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--plot", metavar="FILE.png", help="also draw the results (matplotlib)")
    return ap


def _list(text: str, allowed: tuple[str, ...], name: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UsageError(f"bench: {name}: {text!r} must be a comma list of {', '.join(allowed)}")
    return items


def register_cli(subparsers) -> None:
    """Hook for zblock.cli: adds `zblock bench` with the same options as main()."""
    p = subparsers.add_parser("bench", parents=[build_parser(add_help=False)],
                              help="compressors, engine settings, batch vs page-at-a-time, in-process")
    p.set_defaults(func=lambda args, argv: run(args))


def main(argv: list[str] | None = None) -> int:
    """Run `zblock bench ARGS` (argv without the 'bench'); returns the exit code
    (0 ok, 1 failure, 2 usage)."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The command on parsed arguments (see build_parser)."""
    try:
        if args.plot:
            _pyplot()               # now, not after minutes of runs
            if not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
                raise UsageError(f"bench: --plot: the directory of {args.plot} does not exist")
        from .compressors import ALGORITHMS, check_available
        algs = _list(args.compressor, ALGORITHMS, "--compressor")
        for a in algs:
            check_available(a)
        levels = [int(x) for x in args.zstd_level.split(",")]
        if any(not 1 <= lv <= 19 for lv in levels):
            raise UsageError(f"bench: --zstd-level: {args.zstd_level!r} must be in 1..19")
        accels = _list(args.accelerator, ("none", "sim"), "--accelerator")
        modes = _list(args.hw_mode, ("sync", "async"), "--hw-mode")
        submits = _list(args.submit, ("page", "batch"), "--submit")
        if args.pages < 1 or not 4 <= args.request_kib <= 1024 or args.request_kib % 4:
            raise UsageError("bench: --pages must be >= 1 and --request-kib a multiple of 4 in 4..1024")
        pages = file_pages(args.file, args.pages) if args.file else builtin_pages(args.pages)
        trace = (parse_trace(args.trace, len(pages)) if args.trace
                 else sequential_trace(len(pages), args.request_kib // 4))
        hw_base = dict(queues=args.hw_queues, depth=args.hw_depth, latency_us=args.hw_latency_us,
                       throughput_mbps=args.hw_throughput_mbps, batch=args.hw_batch)
        rows = []
        for alg in algs:
            for level in (levels if alg == "zstd" else [None]):
                for accel in accels:
                    for mode in (modes if accel == "sim" else ["-"]):
                        hw = {**hw_base, "mode": mode} if accel == "sim" else {}
                        for submit in submits:
                            rows.append(run_config(pages, trace, alg, level, accel, submit, hw))
        what = (f"zblock bench: {len(pages)} pages of {args.file or 'built-in mixed set'}, "
                f"{len(trace)} requests{' from ' + args.trace if args.trace else ''}")
        if args.json:
            print(json.dumps({"pages": len(pages), "requests": len(trace), "results": rows}, indent=1))
        else:
            print(f"{what}; latency per request (us)")
            print(table(rows))
        if args.plot:
            plot(rows, args.plot, title=what)
        return 0
    except ValueError as e:          # engine/context parameter validation
        print(f"zblock: bench: {e}", file=sys.stderr)
        return 2
    except ZblockError as e:
        print(f"zblock: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return getattr(e, "exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
