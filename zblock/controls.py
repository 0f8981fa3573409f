"""`zblock writeback`, `zblock recompress` and `zblock compact`: zram's on-demand controls,
through a mount's files.

Each writes one of the mount's action files (params/writeback, params/recompress,
params/compact), as an operator would with echo, and reports what the stats say changed. `writeback` shows a progress bar on a
terminal while the write runs (the stats' `writeback_progress`).
"""

from __future__ import annotations

import errno
import os
import sys
import threading

from .config import RECOMPRESS_TYPES, WRITEBACK_TYPES
from .errors import ConfigError, MountError
from .runtime import find_zblock_mount, read_stats

POLL = 0.2


def _write_action(mountpoint: str, name: str, value: str) -> threading.Thread:
    """Write params/NAME in a thread (it may take long); the thread carries its error."""
    path = os.path.join(mountpoint, "params", name)

    def write():
        try:
            with open(path, "w") as f:
                f.write(value + "\n")
        except OSError as e:
            t.error = e

    t = threading.Thread(target=write, daemon=True, name=f"write {name}")
    t.error = None
    t.start()
    return t


def _raise_error(t: threading.Thread, what: str) -> None:
    """The action's error, if it had one: EINVAL (a value the server refused) is a usage
    error, anything else a mount error."""
    if t.error is not None:
        raise (ConfigError if t.error.errno == errno.EINVAL else MountError)(
            f"{what}: {t.error.strerror}")


def _bar(done: int, total: int, width: int = 40) -> str:
    filled = width * done // total if total else width
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} pages"


def cmd_writeback(args, argv) -> int:
    mp = args.mountpoint
    find_zblock_mount(mp)
    before = read_stats(mp)
    show = sys.stderr.isatty() and not args.no_progress
    t = _write_action(mp, "writeback", args.type)
    while t.is_alive():
        t.join(POLL)
        if show and t.is_alive():
            progress = read_stats(mp).get("writeback_progress") or {}
            if progress:
                sys.stderr.write(_bar(progress["done"], progress["total"]))
                sys.stderr.flush()
    if show:
        sys.stderr.write("\n")
    _raise_error(t, f"writeback {args.type}")
    after = read_stats(mp)
    pages = after["written_back_on_demand"] - before["written_back_on_demand"]
    budget = after.get("writeback_limit", -1)
    print(f"{pages} page(s) left the cache ({args.type}); {after['bd_count']} page(s) on the "
          f"backing file; writeback budget: {'none' if budget < 0 else f'{budget} bytes left'}")
    return 0


def cmd_recompress(args, argv) -> int:
    mp = args.mountpoint
    find_zblock_mount(mp)
    before = read_stats(mp)
    text = f"type={args.type} threshold={args.threshold}" + (f" algo={args.algo}" if args.algo else "")
    t = _write_action(mp, "recompress", text)
    t.join()
    _raise_error(t, f"recompress {text}")
    after = read_stats(mp)
    pages = after["recompressed_pages"] - before["recompressed_pages"]
    saved = after["recompress_saved_bytes"] - before["recompress_saved_bytes"]
    print(f"{pages} page(s) recompressed, {saved} bytes of pool memory saved")
    return 0


def cmd_compact(args, argv) -> int:
    mp = args.mountpoint
    find_zblock_mount(mp)
    t = _write_action(mp, "compact", "1")
    t.join(60)
    if t.is_alive():
        raise MountError(f"compact: {mp} did not answer within 60 s")
    if t.error is not None:
        raise MountError(f"compact: {t.error.strerror}")
    freed = read_stats(mp)["compact_freed_bytes"]
    print(f"gave back {freed} bytes ({freed / (1 << 20):.1f} MiB)")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("writeback", help="write cached pages to the backing file now (zram writeback)",
                       description="Write the chosen cached pages of a mount to its backing file "
                                   "now, within its writeback_limit budget: idle (marked with "
                                   "params/idle and not accessed since), huge (stored raw), "
                                   "incompressible (no recompression shrank them), or all.")
    p.add_argument("mountpoint")
    p.add_argument("--type", required=True, choices=WRITEBACK_TYPES)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    p.set_defaults(func=cmd_writeback)
    p = sub.add_parser("recompress", help="compress cached pages again, stronger (zram recompress)",
                       description="Compress the chosen cached pages of a mount again with a "
                                   "secondary algorithm (--algo, or the mount's recomp_algorithm "
                                   "in priority order) and keep the result where it is smaller: "
                                   "idle pages, huge ones (stored raw), or both.")
    p.add_argument("mountpoint")
    p.add_argument("--type", required=True, choices=RECOMPRESS_TYPES)
    p.add_argument("--threshold", type=int, default=0, metavar="BYTES",
                   help="only pages stored in at least this many bytes")
    p.add_argument("--algo", metavar="NAME", help="NAME or zstd:LEVEL (default: recomp_algorithm)")
    p.set_defaults(func=cmd_recompress)
    p = sub.add_parser("compact", help="give the pool's free memory back now (zram compact)",
                       description="Have the server give the memory its pool freed back to the "
                                   "system now, and print how much its RSS fell.")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_compact)

