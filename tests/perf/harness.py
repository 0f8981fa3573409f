"""Benchmark harness: data sets, targets (zblock and its references), runners, rotation, reports.

A *target* is something a user could put their pages on: zblock (mounted with its CLI), kernel
zram with lz4, `nbdkit memory allocator=zstd` behind `nbdfuse`, and the bare Python FUSE memory
file (tests/perf/memfile.py) on libfuse 3 and 2. Each target is a context manager that sets
itself up, exposes `path` (a file or block device to dd/fio) and undoes every global change on
every path (unmount, reset and hot_remove zram, end the servers it started, by pid).

Measuring rules (DESIGN.md "Performance"): every target in one run, interleaved, with the order
rotated each round (a fixed order lied by up to 1.7x), medians over rounds, ratios only between
figures of the same run. Benchmarks print and record; they fail only when a run is broken
(`BenchBroken`: a verify mismatch, a mount that never answered, a dd that failed). A target that
cannot run here raises `TargetUnavailable` and is reported as skipped.

Environment knobs: ZBLOCK_BENCH_SIZE (default 256M), ZBLOCK_BENCH_ROUNDS (default 4),
ZBLOCK_BENCH_FIO_SECONDS (default 5), ZBLOCK_BENCH_TARGETS (comma list of target names to keep),
ZBLOCK_BENCH_OUT (directory for the JSON results, default /tmp).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

PAGE_SIZE = 4096
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PYTHON = sys.executable
ZBLOCK_CLI = ROOT / ".venv" / "bin" / "zblock"

STATE_DIR = Path(os.environ.get("ZBLOCK_BENCH_CACHE", "/var/tmp/zblock-bench"))
# Mount points of this harness live here (outside pytest's tmp_path); the sweep only touches it.
MNT_PREFIX = Path("/tmp/zblock-bench-mnt")
ZRAM_STATE = STATE_DIR / "zram-hot-added"  # devices we hot_added and must hot_remove

MOUNT_DEADLINE_S = 20.0
STOP_DEADLINE_S = 30.0


class BenchBroken(Exception):
    """The run itself failed (verify mismatch, mount never answered, a tool failed)."""


class TargetUnavailable(Exception):
    """This target cannot run on this machine or in this tree yet; reported as skipped."""


FUSE_URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


@contextlib.contextmanager
def fuse_uring_enabled():
    """The kernel offers FUSE over io_uring (`--fuse-uring on` targets) for the block, and the
    admin's setting is back after it."""
    try:
        with open(FUSE_URING_PARAM) as f:
            before = f.read().strip()
    except OSError:
        raise TargetUnavailable("this kernel has no FUSE over io_uring (Linux 6.14+)") from None
    with open(FUSE_URING_PARAM, "w") as f:
        f.write("Y")
    try:
        yield
    finally:
        with open(FUSE_URING_PARAM, "w") as f:
            f.write(before)


# =============================================================================================
# knobs


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.I)
    if not m:
        raise ValueError(f"bad size {text!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def bench_size() -> int:
    size = _parse_size(os.environ.get("ZBLOCK_BENCH_SIZE", "256M"))
    if size % (1 << 20):
        raise ValueError("ZBLOCK_BENCH_SIZE must be a multiple of 1 MiB (dd bs=1M)")
    return size


def bench_key() -> str:
    """A key file (mode 600) for the targets that run with --encrypt, made once in STATE_DIR."""
    path = STATE_DIR / "bench.key"
    if not path.exists():
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return str(path)


def bench_rounds() -> int:
    return max(1, int(os.environ.get("ZBLOCK_BENCH_ROUNDS", "4")))


def fio_seconds() -> float:
    return float(os.environ.get("ZBLOCK_BENCH_FIO_SECONDS", "5"))


def wanted(name: str) -> bool:
    sel = os.environ.get("ZBLOCK_BENCH_TARGETS")
    return not sel or name in [s.strip() for s in sel.split(",")]


def out_path(name: str) -> Path:
    return Path(os.environ.get("ZBLOCK_BENCH_OUT", "/tmp")) / f"zblock-bench-{name}.json"


# =============================================================================================
# data sets (cached in STATE_DIR; deterministic)


def dataset(name: str, size: int | None = None) -> Path:
    """Path of data set `name` ('mix' or 'usr') of `size` bytes, generated once and cached."""
    size = size or bench_size()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = STATE_DIR / f"{name}-{size >> 20}M.img"
    if path.exists() and path.stat().st_size == size:
        return path
    tmp = path.with_suffix(".tmp")
    if name == "mix":
        _make_mix(tmp, size)
    elif name == "usr":
        _make_usr(tmp, size)
    else:
        raise ValueError(f"unknown data set {name!r}")
    os.replace(tmp, path)
    return path


def _make_mix(path: Path, size: int, seed: int = 20240611) -> None:
    """1/4 zero pages, 1/4 random pages, 1/2 text pages, in a seeded shuffled order.

    Text is words from a seeded 4000-word vocabulary (2-9 letters) drawn with Zipf-like
    frequencies, so lz4 finds repeats the way it does in prose (~2x per 4 KiB page), unlike
    random printable characters (which lz4, having no entropy coder, cannot shrink).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    n = size // PAGE_SIZE
    q = n // 4
    kinds = np.array([0] * q + [1] * q + [2] * (n - 2 * q), dtype=np.uint8)
    rng.shuffle(kinds)
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz", dtype=np.uint8)
    lp = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.2,
                   2.4, 2.0, 2.0, 1.0, 1.5, 2.0, 0.8, 0.2, 0.1, 0.2, 0.1])
    lp /= lp.sum()
    vocab = [bytes(rng.choice(letters, size=int(rng.integers(2, 10)), p=lp)) for _ in range(4000)]
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    n_text = int((kinds == 2).sum())
    need = n_text * PAGE_SIZE
    words = rng.choice(len(vocab), size=need // 5 + 1024, p=zipf)
    seps = rng.choice([b" ", b" ", b" ", b" ", b" ", b", ", b".\n"], size=len(words))
    text = b"".join(vocab[w] + s for w, s in zip(words.tolist(), seps.tolist()))
    while len(text) < need:  # the draw above nearly always suffices; keep it exact anyway
        text += text[: need - len(text)]
    rnd = rng.bytes(q * PAGE_SIZE)
    out = bytearray(size)
    zero_i = rnd_i = txt_i = 0
    for i, k in enumerate(kinds.tolist()):
        if k == 1:
            out[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = rnd[rnd_i * PAGE_SIZE:(rnd_i + 1) * PAGE_SIZE]
            rnd_i += 1
        elif k == 2:
            out[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = text[txt_i * PAGE_SIZE:(txt_i + 1) * PAGE_SIZE]
            txt_i += 1
        else:
            zero_i += 1
    path.write_bytes(out)


def _make_usr(path: Path, size: int) -> None:
    """`tar cf - /usr` (sorted by name) truncated or zero-padded to `size`."""
    proc = subprocess.Popen(["tar", "cf", "-", "--sort=name", "/usr"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    got = 0
    try:
        with open(path, "wb") as f:
            while got < size:
                chunk = proc.stdout.read(min(1 << 20, size - got))
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
            if got < size:
                f.write(bytes(size - got))
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()  # our own tar, by pid: we have all we need
        proc.wait(timeout=30)


def warm(path: Path) -> None:
    """Read a data set once so that timed runs read it from the page cache, not the disk."""
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


# =============================================================================================
# process and mount helpers


def _run(cmd: list[str], timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "LC_ALL": "C"}, **kw)
    except subprocess.TimeoutExpired:
        raise BenchBroken(f"{' '.join(cmd)}: no answer within {timeout:.0f} s") from None
    if check and p.returncode != 0:
        raise BenchBroken(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()[-500:]}")
    return p


def is_mount(path: Path) -> bool:
    mp = str(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == mp for line in f)


def wait_for(cond, what: str, deadline_s: float = MOUNT_DEADLINE_S, proc=None) -> None:
    """Poll `cond` (something outside this process, e.g. a mount appearing) until a deadline."""
    end = time.monotonic() + deadline_s
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise BenchBroken(f"{what}: server exited with {proc.returncode} before it was ready")
        if time.monotonic() > end:
            raise BenchBroken(f"{what}: not ready after {deadline_s:.0f} s")
        time.sleep(0.05)


def unmount(mp: Path) -> None:
    """Unmount a FUSE mount: plain umount, then abort the connection and umount -l if stuck."""
    if not is_mount(mp):
        return
    if subprocess.run(["umount", str(mp)], capture_output=True, timeout=STOP_DEADLINE_S).returncode == 0:
        return
    with contextlib.suppress(OSError):
        dev = os.stat(mp).st_dev
        abort = Path(f"/sys/fs/fuse/connections/{os.minor(dev)}/abort")
        if abort.exists():
            abort.write_text("1")
    subprocess.run(["umount", "-l", str(mp)], capture_output=True, timeout=STOP_DEADLINE_S)


def stop_process(proc: subprocess.Popen | None, deadline_s: float = STOP_DEADLINE_S) -> None:
    """End a server this harness started (by its pid): wait, then SIGTERM, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.wait(timeout=deadline_s / 3)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=deadline_s / 3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=deadline_s / 3)


def new_mountpoint(name: str) -> Path:
    MNT_PREFIX.mkdir(parents=True, exist_ok=True)
    mp = MNT_PREFIX / f"{name}-{os.getpid()}"
    mp.mkdir(exist_ok=True)
    return mp


def owned_by_live_run(pid: int | None) -> bool:
    """Whether `pid` (the run that created a mount point or zram device) is another benchmark
    process still alive: two runs at once must not sweep each other's live targets."""
    return pid is not None and pid != os.getpid() and psutil.pid_exists(pid)


def _suffix_pid(name: str) -> int | None:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _zram_state() -> list[tuple[str, int | None]]:
    """ZRAM_STATE lines: "DEV PID" (older runs wrote "DEV" alone: no owner known)."""
    out = []
    if ZRAM_STATE.exists():
        for line in ZRAM_STATE.read_text().splitlines():
            parts = line.split()
            if parts:
                out.append((parts[0], int(parts[1]) if len(parts) > 1 else None))
    return out


def _write_zram_state(entries: list[tuple[str, int | None]]) -> None:
    ZRAM_STATE.write_text("".join(f"{d} {p}\n" if p is not None else f"{d}\n" for d, p in entries))


def sweep_leftovers() -> list[str]:
    """Undo what an earlier, killed run of this harness left: mounts under MNT_PREFIX and zram
    devices it hot_added (recorded in ZRAM_STATE). Mounts and devices of another run that is
    still alive (its pid in the mount point's name or the state line) are left alone. Returns
    what was cleaned, for the log."""
    done = []
    if MNT_PREFIX.exists():
        with open("/proc/self/mounts") as f:
            mps = [line.split()[1] for line in f if line.split()[1].startswith(str(MNT_PREFIX) + "/")]
        for mp in sorted(mps, reverse=True):
            if owned_by_live_run(_suffix_pid(Path(mp).name)):
                continue
            unmount(Path(mp))
            done.append(f"unmounted {mp}")
        for d in MNT_PREFIX.iterdir():
            if owned_by_live_run(_suffix_pid(d.name.split(".")[0])):
                continue
            with contextlib.suppress(OSError):
                d.rmdir()
                for p in runtime_files(d):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
    kept = []
    for dev, pid in _zram_state():
        if owned_by_live_run(pid):
            kept.append((dev, pid))
            continue
        _zram_release(int(dev), hot_removed=True)
        done.append(f"reset zram{dev}")
    if kept:
        _write_zram_state(kept)
    else:
        with contextlib.suppress(FileNotFoundError):
            ZRAM_STATE.unlink()
    return done


def rss_bytes(pids: list[int]) -> int:
    """Resident set size summed over server processes (measured, not the server's counters)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_info().rss
    return total


def flock_holders(path: Path) -> list[int]:
    """Pids holding a flock on `path`, from /proc/locks (dev major:minor:inode in hex:hex:dec)."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "FLOCK" in parts and key in parts:
                pid = int(parts[parts.index(key) - 1])
                pids.append(pid)
    return pids


def libfuse_versions() -> dict:
    out = {}
    for lib, name in (("fuse3", "libfuse3"), ("fuse", "libfuse2")):
        code = f"import ctypes.util,ctypes;print(ctypes.CDLL(ctypes.util.find_library('{lib}')).fuse_version())"
        p = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True)
        out[name] = p.stdout.strip() or "missing"
    return out


# =============================================================================================
# targets


class Target:
    """One place to put pages. Subclasses set `name`, `path`, and implement start/stop."""

    name = "?"
    kind = "?"

    def __init__(self, size: int):
        self.size = size
        self.path: Path | None = None

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def server_pids(self) -> list[int]:
        return []

    def memory_used(self) -> int:
        """Bytes the target holds for its pages: server RSS (FUSE targets), mem_used_total (zram)."""
        return rss_bytes(self.server_pids())

    def discard(self, offset: int, length: int) -> None:
        _run(["fallocate", "--punch-hole", "--keep-size", "-o", str(offset), "-l", str(length),
              str(self.path)])

    def info(self) -> dict:
        return {"kind": self.kind}


# --- kernel zram ------------------------------------------------------------------------------


def _zram_release(dev: int, hot_removed: bool) -> None:
    base = Path(f"/sys/block/zram{dev}")
    if not base.exists():
        return
    for _ in range(50):  # reset is EBUSY while a just-closed opener is still going away
        try:
            (base / "reset").write_text("1")
            break
        except OSError:
            time.sleep(0.1)
    if hot_removed:
        with contextlib.suppress(OSError):
            Path("/sys/class/zram-control/hot_remove").write_text(str(dev))


class ZramTarget(Target):
    """A zram device we hot_add (never someone else's zram0), lz4, disksize = size; reset and
    hot_removed on every path. With no zram-control, an unused (initstate 0) zram0 is borrowed."""

    kind = "kernel zram lz4"

    def __init__(self, size: int, algorithm: str = "lz4"):
        super().__init__(size)
        self.name = f"zram-{algorithm}"
        self.algorithm = algorithm
        self.dev: int | None = None
        self.hot_added = False

    def start(self) -> None:
        if not Path("/sys/class/zram-control").exists() and not Path("/sys/block/zram0").exists():
            # built in (CONFIG_ZRAM=y, as here) needs nothing; a module is loaded once and left
            # loaded (loading adds no setting a user would notice; unloading could hit a user's)
            modprobe = shutil.which("modprobe")
            if modprobe is None or subprocess.run([modprobe, "zram"], capture_output=True).returncode:
                raise TargetUnavailable("zram: not built in and modprobe zram failed")
        ctl = Path("/sys/class/zram-control/hot_add")
        if ctl.exists():
            self.dev = int(ctl.read_text().strip())
            self.hot_added = True
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            with open(ZRAM_STATE, "a") as f:
                f.write(f"{self.dev} {os.getpid()}\n")
        elif Path("/sys/block/zram0/initstate").read_text().strip() == "0":
            self.dev = 0
        else:
            raise TargetUnavailable("zram: zram0 busy and no hot_add")
        base = Path(f"/sys/block/zram{self.dev}")
        algs = (base / "comp_algorithm").read_text()
        if self.algorithm not in algs.replace("[", " ").replace("]", " ").split():
            raise TargetUnavailable(f"zram: {self.algorithm} not offered ({algs.strip()})")
        (base / "comp_algorithm").write_text(self.algorithm)
        (base / "disksize").write_text(str(self.size))
        self.path = Path(f"/dev/zram{self.dev}")
        wait_for(self.path.exists, f"{self.path}", 5)

    def stop(self) -> None:
        if self.dev is None:
            return
        _zram_release(self.dev, self.hot_added)
        if self.hot_added and ZRAM_STATE.exists():
            _write_zram_state([(d, p) for d, p in _zram_state() if d != str(self.dev)])
        self.dev = None

    def mm_stat(self) -> dict:
        names = ["orig_data_size", "compr_data_size", "mem_used_total", "mem_limit",
                 "mem_used_max", "same_pages", "pages_compacted", "huge_pages"]
        vals = Path(f"/sys/block/zram{self.dev}/mm_stat").read_text().split()
        return dict(zip(names, map(int, vals)))

    def memory_used(self) -> int:
        return self.mm_stat()["mem_used_total"]

    def discard(self, offset: int, length: int) -> None:
        _run(["blkdiscard", "-o", str(offset), "-l", str(length), str(self.path)])

    def info(self) -> dict:
        st = Path(f"/sys/block/zram{self.dev}/stat").read_text().split()
        # block stat: reads completed, merged, sectors; writes completed(4), merged, sectors(6)
        rd, rs, wr, ws = int(st[0]), int(st[2]), int(st[4]), int(st[6])
        return {"kind": self.kind, "device": str(self.path),
                "avg_request_bytes": {"read": rs * 512 // rd if rd else 0,
                                      "write": ws * 512 // wr if wr else 0},
                "mm_stat": self.mm_stat()}


# --- nbdkit memory allocator=zstd behind nbdfuse ---------------------------------------------


class NbdTarget(Target):
    """`nbdkit memory SIZE allocator=zstd` on a Unix socket, `nbdfuse MP --unix SOCK` (multi-conn)."""

    name = "nbdkit-zstd"
    kind = "nbdkit memory allocator=zstd + nbdfuse (C)"

    def __init__(self, size: int):
        super().__init__(size)
        self.mp: Path | None = None
        self.nbdkit = self.nbdfuse = None

    def start(self) -> None:
        for tool in ("nbdkit", "nbdfuse"):
            if shutil.which(tool) is None:
                raise TargetUnavailable(f"{tool} not installed (apt-get install nbdkit libnbd-bin)")
        self.mp = new_mountpoint(self.name)
        sock = self.mp.parent / f"{self.name}-{os.getpid()}.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        self.sock = sock
        # -f: foreground, so the pid we hold is the server's; --exit-with-parent: never outlive us
        self.nbdkit = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "memory", str(self.size),
             "allocator=zstd"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(sock.exists, "nbdkit socket", proc=self.nbdkit)
        pidfile = self.mp.parent / f"{self.name}-{os.getpid()}.nbdfuse.pid"
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        self.nbdfuse = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(self.mp), "--unix", str(sock)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pidfile = pidfile
        wait_for(lambda: pidfile.exists() and is_mount(self.mp), "nbdfuse mount", proc=self.nbdfuse)
        self.path = self.mp / "nbd"

    def stop(self) -> None:
        if self.mp is not None:
            unmount(self.mp)
        stop_process(self.nbdfuse)
        if self.nbdkit is not None and self.nbdkit.poll() is None:
            self.nbdkit.send_signal(signal.SIGTERM)
        stop_process(self.nbdkit)
        for p in (getattr(self, "sock", None), getattr(self, "pidfile", None)):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        if self.mp is not None:
            with contextlib.suppress(OSError):
                self.mp.rmdir()
        self.mp = None

    def server_pids(self) -> list[int]:
        return [p.pid for p in (self.nbdkit, self.nbdfuse) if p is not None and p.poll() is None]

    def info(self) -> dict:
        return {"kind": self.kind, "libfuse": "3 (nbdfuse)", "request_sizes": "n/a (not instrumented)"}


# --- the bare Python FUSE memory file --------------------------------------------------------


class MemfileTarget(Target):
    """tests/perf/memfile.py as a subprocess: pages uncompressed in a dict (the ceiling)."""

    def __init__(self, size: int, libfuse: int | str = 3, on_disk: bool = False):
        super().__init__(size)
        self.libfuse = libfuse
        self.backing: Path | None = None
        if on_disk:     # memfile.py --backing: the pages in a file beside zblock's, O_DIRECT
            self.name = f"diskfile-{libfuse}"
            self.kind = f"bare Python FUSE server over the backing disk (O_DIRECT), {libfuse}"
            self.backing = STATE_DIR / f"{self.name}-{os.getpid()}.img"
        elif libfuse == "native":
            self.name = "memfile-native"
            self.kind = "bare Python FUSE memory file, zblock's native front end"
        else:
            self.name = f"memfile-fuse{libfuse}"
            self.kind = f"bare Python FUSE memory file, libfuse {libfuse}"
        self.mp: Path | None = None
        self.proc = None

    def start(self) -> None:
        self.mp = new_mountpoint(self.name)
        self.log = open(self.mp.parent / f"{self.name}-{os.getpid()}.log", "w+")
        extra = []
        if self.backing is not None:
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            _run(["fallocate", "-l", str(self.size), str(self.backing)])
            extra = ["--backing", str(self.backing)]
        self.proc = subprocess.Popen(
            [PYTHON, str(HERE / "memfile.py"), str(self.mp), "--size", str(self.size),
             "--libfuse", str(self.libfuse), *extra], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: is_mount(self.mp), f"{self.name} mount", proc=self.proc)
        self.path = self.mp / "disk"

    def stop(self) -> None:
        if self.mp is not None:
            unmount(self.mp)
        stop_process(self.proc)
        if self.mp is not None:
            with contextlib.suppress(OSError):
                self.mp.rmdir()
            self.log.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.log.name)
        if self.backing is not None:
            with contextlib.suppress(FileNotFoundError):
                self.backing.unlink()
        self.mp = None

    def server_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def info(self) -> dict:
        st = json.loads((self.mp / "stats").read_bytes())
        return {"kind": self.kind, "libfuse": st["libfuse"], "max_write": st["max_write_set"],
                "request_sizes": st["request_sizes"]}


# --- zblock (its CLI) --------------------------------------------------------------------------


def runtime_files(mp: Path) -> list[Path]:
    """A zblock server's log and pid file for mount point `mp`, as zblock.runtime names them
    (imported here: the harness measures trees where zblock may not be written yet)."""
    from zblock import runtime
    return [Path(runtime.log_file(str(mp))), Path(runtime.pid_file(str(mp)))]


class ZblockTarget(Target):
    """`zblock mount MP --backing FILE --size SIZE [opts]`; `zblock umount MP`.

    The server pid (for RSS) is the flock holder of the backing file (/proc/locks), falling back
    to the process whose cmdline has 'zblock', 'mount' and the mount point."""

    name = "zblock"
    kind = "zblock (lz4, defaults)"

    def __init__(self, size: int, options: list[str] | None = None, name: str = "zblock"):
        super().__init__(size)
        self.name = name
        self.options = options or []
        if self.options:
            self.kind = f"zblock {' '.join(self.options)}"
        self.mp: Path | None = None
        self.backing: Path | None = None
        self.pid: int | None = None
        self.cmd: list[str] = [str(ZBLOCK_CLI)]

    @staticmethod
    def command() -> tuple[list[str] | None, str]:
        """The CLI to run: the console script, else `python -m zblock` from the tree (a stale
        editable install can break the script alone). (None, why) when neither answers --help."""
        missing = [m for m in ("cli.py", "store.py", "fuse_ops.py") if not (ROOT / "zblock" / m).exists()]
        if missing:
            return None, f"zblock target skipped: zblock/{', zblock/'.join(missing)} not written yet"
        why = []
        for cmd in ([str(ZBLOCK_CLI)], [PYTHON, "-m", "zblock"]):
            p = subprocess.run(cmd + ["mount", "--help"], capture_output=True, text=True, cwd=ROOT)
            if p.returncode == 0:
                return cmd, ""
            last = ((p.stderr or p.stdout).strip().splitlines() or ["no output"])[-1]
            why.append(f"`{' '.join(cmd[-3:])} mount --help` fails: {last[:200]}")
        return None, "zblock target skipped: " + "; ".join(why)

    @staticmethod
    def availability() -> str | None:
        """None when the CLI can mount; else why not (reported as the skip reason)."""
        return ZblockTarget.command()[1] or None

    def start(self) -> None:
        self.cmd, why = self.command()
        if self.cmd is None:
            raise TargetUnavailable(why)
        self.mp = new_mountpoint(self.name)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.backing = STATE_DIR / f"{self.name}-{os.getpid()}.img"
        for p in self.backing_files():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        _run([*self.cmd, "mount", str(self.mp), "--backing", str(self.backing),
              "--size", str(self.size), *self.options], timeout=MOUNT_DEADLINE_S, cwd=ROOT)
        wait_for(lambda: is_mount(self.mp), "zblock mount", 5)
        self.path = self.mp / "disk"
        self.pid = self._find_pid()

    def _find_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            pids = [p for p in flock_holders(self.backing) if psutil.pid_exists(p)]
            if pids:
                self.pid_source = "flock holder of the backing file (/proc/locks)"
                return pids[0]
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "zblock" in cmd and " mount" in cmd and str(self.mp) in cmd:
                self.pid_source = "/proc cmdline with 'zblock mount' and the mount point"
                return proc.info["pid"]
        self.pid_source = "not found"
        return None

    def stop(self) -> None:
        if self.mp is not None and is_mount(self.mp):
            p = subprocess.run([*self.cmd, "umount", str(self.mp)], capture_output=True,
                               text=True, timeout=120, cwd=ROOT)
            if p.returncode != 0:
                subprocess.run([*self.cmd, "umount", "--force", str(self.mp)],
                               capture_output=True, timeout=60, cwd=ROOT)
            unmount(self.mp)
        if self.pid is not None and psutil.pid_exists(self.pid):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
                psutil.Process(self.pid).wait(STOP_DEADLINE_S)
        if self.mp is not None:
            with contextlib.suppress(OSError):
                self.mp.rmdir()
            for p in runtime_files(self.mp):      # the server's log and pid file
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        if self.backing is not None:
            for p in self.backing_files():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        self.mp = None

    def backing_files(self) -> list[Path]:
        """The backing file, its sidecar and (--encrypt) its seal file."""
        return [self.backing] + [Path(f"{self.backing}{s}") for s in (".zbmeta", ".zbseal")]

    def server_pids(self) -> list[int]:
        return [self.pid] if self.pid is not None and psutil.pid_exists(self.pid) else []

    def stats(self) -> dict:
        return json.loads((self.mp / "stats").read_bytes())

    def info(self) -> dict:
        out = {"kind": self.kind, "pid_source": getattr(self, "pid_source", None)}
        with contextlib.suppress(Exception):
            st = self.stats()
            out["request_sizes"] = st.get("request_sizes")
            for k in ("libfuse", "max_write", "config"):
                if k in st:
                    out[k] = st[k]
        return out


def reference_targets(size: int, kinds=("zram", "nbd", "memfile3", "memfile2", "memfile-native")
                      ) -> list[Target]:
    make = {"zram": lambda: ZramTarget(size), "nbd": lambda: NbdTarget(size),
            "memfile3": lambda: MemfileTarget(size, 3), "memfile2": lambda: MemfileTarget(size, 2),
            "memfile-native": lambda: MemfileTarget(size, "native")}
    return [make[k]() for k in kinds]


@contextlib.contextmanager
def started(targets: list[Target], skipped: dict):
    """Start every target; those that cannot run go into `skipped` {name: reason}. All started
    ones are stopped on every path, in reverse order."""
    with contextlib.ExitStack() as stack:
        live = []
        for t in targets:
            if not wanted(t.name):
                skipped[t.name] = "not in ZBLOCK_BENCH_TARGETS"
                continue
            try:
                live.append(stack.enter_context(t))
            except TargetUnavailable as e:
                skipped[t.name] = str(e)
        yield live


# =============================================================================================
# runners

_DD_RE = re.compile(r"(\d+) bytes .* copied, ([\d.]+) s")


def _dd(args: list[str], nbytes: int) -> float:
    p = _run(["dd", *args], timeout=600)
    m = _DD_RE.search(p.stderr)
    if not m or int(m.group(1)) != nbytes:
        raise BenchBroken(f"dd {' '.join(args)}: short or unparsed transfer: {p.stderr.strip()[-300:]}")
    return float(m.group(2))


def dd_write(src: Path, dst: Path, size: int) -> float:
    """Seconds for `dd bs=1M oflag=direct` of `size` bytes (conv=notrunc: a disk, not a file)."""
    return _dd([f"if={src}", f"of={dst}", "bs=1M", f"count={size >> 20}", "oflag=direct",
                "conv=notrunc"], size)


def dd_write_durable(src: Path, dst: Path, size: int) -> float:
    """dd_write, then fsync before dd exits (conv=fsync): the time until the data is durable."""
    return _dd([f"if={src}", f"of={dst}", "bs=1M", f"count={size >> 20}", "oflag=direct",
                "conv=notrunc,fsync"], size)


class DiskFileTarget(Target):
    """A preallocated file in STATE_DIR, on the filesystem that holds zblock's backing files:
    the backing disk's own speed."""

    name = "backing-disk"
    kind = "file"

    def start(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.path = STATE_DIR / f"{self.name}-{os.getpid()}.img"
        _run(["fallocate", "-l", str(self.size), str(self.path)])

    def stop(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def info(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "io": "O_DIRECT (dd oflag=direct)"}


def dd_read(src: Path, size: int) -> float:
    return _dd([f"if={src}", "of=/dev/null", "bs=1M", f"count={size >> 20}", "iflag=direct"], size)


def verify(target: Target, data: Path, size: int) -> None:
    """Read back with O_DIRECT and compare; a mismatch means the run is broken."""
    fd = os.open(target.path, os.O_RDONLY | os.O_DIRECT)
    import mmap

    buf = mmap.mmap(-1, 1 << 20)
    try:
        with open(data, "rb") as ref:
            off = 0
            while off < size:
                n = os.preadv(fd, [buf], off)
                want = ref.read(1 << 20)
                if n != len(want) or buf[:n] != want:
                    raise BenchBroken(f"{target.name}: verify mismatch in MiB {off >> 20} of {data.name}")
                off += n
    finally:
        os.close(fd)
        buf.close()


def fio(path: Path, rw: str, size: int, seconds: float, jobs: int = 2) -> float:
    """IOPS of fio rw=randwrite|randread, 4 KiB, psync, O_DIRECT, `jobs` jobs, time-based."""
    p = _run(["fio", "--name=zbb", f"--filename={path}", f"--rw={rw}", "--bs=4k", "--ioengine=psync",
              "--direct=1", f"--numjobs={jobs}", f"--size={size}", "--time_based",
              f"--runtime={seconds}", "--group_reporting", "--allow_file_create=0",
              "--randrepeat=1", "--output-format=json"], timeout=seconds * 4 + 60)
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    op = "write" if "write" in rw else "read"
    if job.get("error"):
        raise BenchBroken(f"fio {rw} on {path}: error {job['error']}")
    return float(job[op]["iops"])


def rotated(items: list, rnd: int) -> list:
    """The order for round `rnd`: rotated by one each round, so no target is always first."""
    k = rnd % len(items) if items else 0
    return items[k:] + items[:k]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# =============================================================================================
# reporting


def machine_config() -> dict:
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            **libfuse_versions(), "size_bytes": bench_size(), "rounds": bench_rounds(),
            "loop": "none (no loop device in this benchmark)"}


class Report:
    """Collects measurements, checks targets, prints one table, writes JSON."""

    def __init__(self, name: str, title: str):
        self.name = name
        self.title = title
        self.results: dict = {}       # results[target][metric] = {"samples": [...], "median": x}
        self.checks: list[dict] = []  # target-criterion rows
        self.skipped: dict = {}
        self.config = machine_config()
        self.targets_info: dict = {}
        self.notes: list[str] = []

    def add(self, target: str, metric: str, value: float) -> None:
        r = self.results.setdefault(target, {}).setdefault(metric, {"samples": []})
        r["samples"].append(value)
        r["median"] = median(r["samples"])

    def value(self, target: str, metric: str) -> float | None:
        return self.results.get(target, {}).get(metric, {}).get("median")

    def check(self, what: str, target: str, metric: str, ref: str, at_least: float | None = None,
              at_most: float | None = None, ref_metric: str | None = None) -> None:
        """Record `target/ref >= at_least` (or `<= at_most`) on `metric` (medians of the same run;
        `ref_metric` when the reference measures it under another name, e.g. zram's
        mem_used_total against an RSS). A missing side is 'n/a', not a failure."""
        a, b = self.value(target, metric), self.value(ref, ref_metric or metric)
        need = f">= {at_least}x" if at_least is not None else f"<= {at_most}x"
        row = {"what": what, "metric": metric, "target": target, "ref": ref, "need": need,
               "target_value": a, "ref_value": b, "ratio": None, "met": None}
        if a is not None and b:
            row["ratio"] = a / b
            row["met"] = row["ratio"] >= at_least if at_least is not None else row["ratio"] <= at_most
        self.checks.append(row)

    def check_value(self, what: str, target: str, metric: str, at_least: float) -> None:
        """Record an absolute criterion on one target's median (e.g. a fraction returned)."""
        a = self.value(target, metric)
        self.checks.append({"what": what, "metric": metric, "target": target, "ref": "-",
                            "need": f">= {at_least}", "target_value": a, "ref_value": None,
                            "ratio": a, "met": None if a is None else a >= at_least})

    def table(self) -> str:
        lines = [f"== {self.title} ==",
                 "config: " + ", ".join(f"{k}={v}" for k, v in self.config.items())]
        metrics = sorted({m for r in self.results.values() for m in r})
        names = list(self.results)
        w = max([len(n) for n in names] + [14])
        lines.append(f"{'target':<{w}} " + " ".join(f"{m:>16}" for m in metrics))
        for n in names:
            cells = []
            for m in metrics:
                v = self.value(n, m)
                cells.append(f"{v:16.1f}" if v is not None else f"{'-':>16}")
            lines.append(f"{n:<{w}} " + " ".join(cells))
        for n, why in self.skipped.items():
            lines.append(f"{n:<{w}} SKIPPED: {why}")
        if self.checks:
            lines.append("targets (ratio of medians, same run):")
            for c in self.checks:
                ratio = f"{c['ratio']:.2f}" if c["ratio"] is not None else "n/a"
                met = {True: "yes", False: "NO", None: "n/a"}[c["met"]]
                lines.append(f"  {c['what']:<44} {c['target']} vs {c['ref']}: {ratio:>6} "
                             f"(need {c['need']})  met: {met}")
        for n, inf in self.targets_info.items():
            lines.append(f"  [{n}] " + json.dumps(inf, default=str)[:600])
        lines.extend(f"note: {x}" for x in self.notes)
        return "\n".join(lines)

    def emit(self) -> Path:
        print("\n" + self.table(), flush=True)
        path = out_path(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"name": self.name, "title": self.title, "config": self.config,
                                    "results": self.results, "checks": self.checks,
                                    "skipped": self.skipped, "targets": self.targets_info,
                                    "notes": self.notes, "time": time.time()},
                                   indent=1, default=str))
        print(f"results written to {path}", flush=True)
        return path
