"""What --encrypt costs a page that goes to the backing file and comes back, in-process (no FUSE).

A swap-mode Store with a 16 MiB pool: 256 MiB written in 32 KiB writes (most pages are written
back to the file), then read back in random 32 KiB reads (from the file). Runs plain and
encrypted alternately and prints the medians; ZBLOCK_NO_EXTENSION=1 times the cryptography
package instead of zblock._sealpages.

    python -P tests/perf/encrypt_cost.py [--rounds 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from zblock.config import Config  # noqa: E402
from zblock.seal import backend  # noqa: E402
from zblock.store import Store  # noqa: E402

WRITE = 32 << 10
TOTAL = 256 << 20


def one_run(path: str, encrypt: bool) -> dict:
    rng = random.Random(1)
    def page(i: int) -> bytes:       # compresses to about 40%: real objects to write back
        return (i.to_bytes(8, "little") + rng.randbytes(1500) + bytes(4096))[:4096]
    data = [b"".join(page(i * 8 + k) for k in range(8)) for i in range(TOTAL // WRITE)]
    store = Store.open(path, 2 * TOTAL, Config(swap=True, encrypt=encrypt, pool_limit=16 << 20))
    try:
        t0 = time.perf_counter()
        for i, d in enumerate(data):
            store.write(i * WRITE, d)
        t1 = time.perf_counter()
        order = list(range(len(data)))
        rng.shuffle(order)
        for i in order:
            if store.read(i * WRITE, WRITE) != data[i]:
                raise SystemExit(f"chunk {i} read back wrong")
        t2 = time.perf_counter()
        s = store.stats()
    finally:
        store.close()
        os.unlink(path)
    return {"write_s": t1 - t0, "read_s": t2 - t1, "written_back": s["written_back_pages"],
            "bd_reads": s["bd_reads"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    path = os.path.join(args.dir, f"zblock-encrypt-cost-{os.getpid()}.img")
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.rounds):
        for encrypt in (False, True):
            runs[encrypt].append(one_run(path, encrypt))
    print(f"seal backend: {backend()}")
    for encrypt, rs in runs.items():
        write = statistics.median(r["write_s"] for r in rs)
        read = statistics.median(r["read_s"] for r in rs)
        print(f"{'encrypt' if encrypt else 'plain':8} write {write:.2f} s  read {read:.2f} s  "
              f"(written back {rs[0]['written_back']} pages, {rs[0]['bd_reads']} read from the file)")


if __name__ == "__main__":
    main()
