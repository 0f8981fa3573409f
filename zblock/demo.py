"""`make demo`: mount a store, push a few hundred MiB of real data through it, show what happened.

Steps: a temporary directory; `zblock mount` of a 512 MiB disk with a 48 MiB pool (so the pool
fills and cold pages are written back); a tar stream of /usr/share (then /usr/lib) as the data,
written through `disk` with dd (progress shown); the stats that matter; everything read back
and compared by SHA-256; `zblock umount`; a few plain lines on what happened. Cleans up on every
path (abort + lazy unmount if the clean unmount fails). Needs root and /dev/fuse, nothing else
beyond what `make demo` installs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .runtime import log_file

DATA_MIB = 256
DISK = "512M"
POOL = "48M"


def say(text: str = "") -> None:
    print(text, flush=True)


def zblock(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "zblock", *args], capture_output=True, text=True,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise SystemExit(f"demo: zblock {args[0]} failed: {res.stderr.strip()}")
    return res


def make_data(path: str, mib: int) -> str:
    """A tar stream of /usr/share (then /usr/lib), cut at `mib` MiB. Returns its SHA-256."""
    want = mib << 20
    h = hashlib.sha256()
    got = 0
    with open(path, "wb") as out:
        for root in ("share", "lib"):
            if got >= want or not os.path.isdir(f"/usr/{root}"):
                continue
            tar = subprocess.Popen(["tar", "cf", "-", "--ignore-failed-read", "-C", "/usr", root],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            try:
                while got < want:
                    chunk = tar.stdout.read(min(1 << 20, want - got))
                    if not chunk:
                        break
                    out.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
            finally:
                tar.kill()
                tar.wait()
    if got < want:
        # a very small /usr: pad with zeros so the disk sees the same amount of data
        pad = bytes(want - got)
        with open(path, "ab") as out:
            out.write(pad)
        h.update(pad)
    return h.hexdigest()


def read_back_hash(disk: str, nbytes: int) -> str:
    h = hashlib.sha256()
    fd = os.open(disk, os.O_RDONLY)
    try:
        left = nbytes
        off = 0
        while left:
            chunk = os.pread(fd, min(1 << 20, left), off)
            if not chunk:
                break
            h.update(chunk)
            off += len(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def mib(n) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def main() -> int:
    if os.geteuid() != 0:
        say("demo: run as root (the mount uses allow_other, and make demo installs system packages)")
        return 1
    if not os.path.exists("/dev/fuse"):
        say("demo: /dev/fuse is missing (modprobe fuse)")
        return 1
    work = tempfile.mkdtemp(prefix="zblock-demo-")
    mnt = os.path.join(work, "mnt")
    backing = os.path.join(work, "disk.img")
    data = os.path.join(work, "data.tar")
    os.makedirs(mnt)
    mounted = ok = False
    try:
        say(f"== zblock demo in {work}")
        say(f"1. Preparing {DATA_MIB} MiB of real data: a tar stream of /usr/share ...")
        digest = make_data(data, DATA_MIB)

        say(f"2. zblock mount {mnt} --backing {backing} --size {DISK} --pool-limit {POOL}")
        t0 = time.monotonic()
        zblock("mount", mnt, "--backing", backing, "--size", DISK, "--pool-limit", POOL)
        mounted = True
        say(f"   mounted in {time.monotonic() - t0:.2f} s; files: {', '.join(sorted(os.listdir(mnt)))}")

        disk = os.path.join(mnt, "disk")
        say(f"3. dd if=data.tar of={disk} bs=1M oflag=direct")
        t0 = time.monotonic()
        subprocess.run(["dd", f"if={data}", f"of={disk}", "bs=1M", "oflag=direct", "conv=fsync",
                        "status=progress"], check=True, timeout=1800)
        wtime = time.monotonic() - t0
        say(f"   wrote {DATA_MIB} MiB in {wtime:.1f} s ({DATA_MIB / wtime:.0f} MiB/s, fsync included)")

        stats = json.loads(zblock("stats", mnt, "--json").stdout)
        orig, compr = stats.get("orig_data_size", 0), stats.get("compr_data_size", 0)
        ratio = orig / compr if compr else 0.0
        say("4. zblock stats (the numbers that matter):")
        rows = [
            ("compression ratio in the pool", f"{ratio:.2f}  ({mib(orig)} stored as {mib(compr)})"),
            ("pool size / limit", f"{mib(stats.get('pool_total_size', 0))} / {mib(stats.get('pool_limit', 0))}"),
            ("pages cached (all kinds)", str(stats.get("stored_pages"))),
            ("same-filled pages", str(stats.get("same_filled_pages"))),
            ("incompressible pages stored raw", str(stats.get("stored_incompressible_pages"))),
            ("pages written back to disk", str(stats.get("written_back_pages"))),
            ("pages flushed by fsync", str(stats.get("flushed_pages"))),
            ("times the pool hit its limit", str(stats.get("pool_limit_hit"))),
        ]
        sizes = stats.get("request_sizes", {}).get("write", {})
        if sizes:
            rows.append(("write request sizes from the kernel", ", ".join(f"{k} B x{v}" for k, v in sizes.items())))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            say(f"   {k:<{width}}  {v}")

        say("5. Reading everything back and comparing ...")
        t0 = time.monotonic()
        back = read_back_hash(disk, DATA_MIB << 20)
        rtime = time.monotonic() - t0
        ok = back == digest
        say(f"   read {DATA_MIB} MiB in {rtime:.1f} s: {'identical' if ok else 'DIFFERENT'} (SHA-256 {back[:16]}...)")
        after = json.loads(zblock("stats", mnt, "--json").stdout)

        say(f"6. zblock umount {mnt}")
        t0 = time.monotonic()
        zblock("umount", mnt)
        mounted = False
        say(f"   unmounted in {time.monotonic() - t0:.2f} s (everything written back, server exited)")

        say("")
        say("What happened:")
        say(f"- {DATA_MIB} MiB went through the FUSE file in {sizes and max(map(int, sizes)) // 1024 or '?'} KiB "
            f"requests; zblock kept the recent pages compressed in RAM ({ratio:.2f}:1).")
        say(f"- The pool was capped at {POOL}, so {stats.get('written_back_pages', 0)} colder pages were "
            f"written back to {os.path.basename(backing)}; {stats.get('same_filled_pages', 0)} same-filled "
            "pages took no pool memory at all.")
        say(f"- Reading back served {after.get('zswpin', 0)} pages from the compressed cache and "
            f"{after.get('bd_reads', 0)} from the backing file, and every byte matched.")
        say("- After the unmount the backing file is a plain raw image of the disk.")
        return 0 if ok else 1
    finally:
        if mounted:
            res = zblock("umount", mnt, check=False)
            if res.returncode != 0:
                zblock("umount", "--force", mnt, check=False, timeout=120)
        elif ok:
            # the server's log of a demo that went well names a directory that is gone
            with contextlib.suppress(OSError):
                os.unlink(log_file(mnt))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
