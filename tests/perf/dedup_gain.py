"""Dedup's gain and cost, in-process and without FUSE (docs/performance.md, 2026-12-02).

    python -P tests/perf/dedup_gain.py image [--copies 1,5] [--src DIR]
    python -P tests/perf/dedup_gain.py speed [--rounds 3] [DATA ...]

`image`: for each count in --copies, an ext4 image made by `mkfs.ext4 -d` from a directory
holding that many copies of SRC (default /usr/lib/python3.11), written in 1 MiB writes to a
Store with dedup off, then on (pool limit above the data: nothing is written back); prints
pool_total_size, dedup_pages, dedup_saved_bytes and the table memory (table_bytes: with dedup
it includes the pools' indexes).

`speed`: each DATA file (default the bench's 256 MiB /usr tar and its mixed set, made by
tests/perf/harness.py) written in 1 MiB writes to a fresh Store, dedup off and on alternating,
--rounds rounds; prints each run's MB/s and the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from zblock.config import Config          # noqa: E402
from zblock.store import Store            # noqa: E402

MiB = 1 << 20
WORK = "/var/tmp/zblock-dedup"


def write_through_store(data_path: str, dedup: bool) -> tuple[float, dict]:
    """(seconds, stats) of writing `data_path` to a fresh Store in 1 MiB writes."""
    size = os.path.getsize(data_path)
    size -= size % 4096
    disk = os.path.join(WORK, "disk.img")
    for p in (disk, disk + ".zbmeta"):
        if os.path.exists(p):
            os.unlink(p)
    store = Store.open(disk, size, Config(pool_limit=8 << 30, shrinker_enabled=False,
                                          dedup=dedup))
    try:
        with open(data_path, "rb") as f:
            chunks = [f.read(MiB) for _ in range(0, size, MiB)]
        t0 = time.perf_counter()
        for i, chunk in enumerate(chunks):
            store.write(i * MiB, chunk[:size - i * MiB])
        if store.staging:
            store.staging.settle()
        seconds = time.perf_counter() - t0
        stats = store.stats()
    finally:
        store.close()
    return seconds, stats


def cmd_image(args) -> None:
    for copies in map(int, args.copies.split(",")):
        with tempfile.TemporaryDirectory(dir=WORK) as tmp:
            tree = os.path.join(tmp, "tree")
            for i in range(copies):
                shutil.copytree(args.src, os.path.join(tree, f"copy{i}"), symlinks=True)
            used = int(subprocess.check_output(["du", "-sb", tree]).split()[0])
            img = os.path.join(tmp, "fs.img")
            size_mib = used * 13 // 10 // MiB + 64
            subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", tree, img, f"{size_mib}M"],
                           check=True)
            print(f"{copies} cop{'y' if copies == 1 else 'ies'} of {args.src}: files {used / MiB:.1f} MiB, "
                  f"image {size_mib} MiB")
            for dedup in (False, True):
                _, s = write_through_store(img, dedup)
                print(f"  dedup={'on ' if dedup else 'off'} pool_total_size {s['pool_total_size'] / MiB:8.1f} MiB  "
                      f"stored_pages {s['stored_pages']}  same_filled {s['same_filled_pages']}  "
                      f"dedup_pages {s['dedup_pages']}  dedup_saved_bytes {s['dedup_saved_bytes'] / MiB:.1f} MiB  "
                      f"table_bytes {s['table_bytes'] / MiB:.2f} MiB")


def cmd_speed(args) -> None:
    data = args.data
    if not data:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
        from perf import harness
        data = [str(harness.dataset("usr", 256 * MiB)), str(harness.dataset("mix", 256 * MiB))]
    for path in data:
        runs: dict[bool, list[float]] = {False: [], True: []}
        found = {}
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for dedup in order:
                seconds, s = write_through_store(path, dedup)
                mbs = os.path.getsize(path) / 1e6 / seconds
                runs[dedup].append(mbs)
                found[dedup] = s
                print(f"  {os.path.basename(path)} round {r + 1} dedup={'on ' if dedup else 'off'} "
                      f"{mbs:7.1f} MB/s")
        off, on = statistics.median(runs[False]), statistics.median(runs[True])
        s = found[True]
        print(f"{os.path.basename(path)}: median write MB/s off {off:.1f}, on {on:.1f} "
              f"(on/off {on / off:.3f}); with dedup: dedup_pages {s['dedup_pages']} of "
              f"{s['stored_pages']} stored, saved {s['dedup_saved_bytes'] / MiB:.1f} MiB of "
              f"{(s['pool_total_size'] + s['dedup_saved_bytes']) / MiB:.1f}; table_bytes off "
              f"{found[False]['table_bytes'] / MiB:.2f} MiB, on {s['table_bytes'] / MiB:.2f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("image")
    p.add_argument("--copies", default="1,5")
    p.add_argument("--src", default="/usr/lib/python3.11")
    p = sub.add_parser("speed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("data", nargs="*")
    args = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    {"image": cmd_image, "speed": cmd_speed}[args.cmd](args)


if __name__ == "__main__":
    main()
