"""Swap: the memory hog (tests/hog.py) in a memory-limited cgroup, swapping onto each target in turn.

Targets (one swap device active at a time, each set up fresh for every run and torn down after):
  zblock               `zblock mount MP --backing F --size S --swap`, then `zblock swapon MP`
                       (loop --direct-io=on --sector-size 4096, mkswap, swapon --discard)
  zram-lz4             kernel zram (hot_added, lz4), mkswap + swapon --discard on /dev/zramN
  disk-loop            a preallocated file on / (STATE_DIR) behind the same loop settings
  zswap+disk-loop      the same, with kernel zswap enabled in front of it (compressor lz4 when the
                       kernel's crypto API offers it, else the kernel's current one; max_pool_percent
                       raised only if the pool could not hold the swap area)
  zblock-encrypt       the same with `--encrypt` (a random key of the mount's own)
  zblock-uring         the same with `--fuse-uring on` (the fuse module's enable_uring set for it)
  zblock-far           the same with a far tier: a local 6-node Redis Cluster (tests/rediscluster.py)
                       started for the run, `--far URL --far-limit SWAP_AREA`
  memfile-loop         the bare Python FUSE memory file (tests/perf/memfile.py, libfuse 3) behind
                       the same loop settings: the ceiling zblock is measured against
  memfile-native-loop  the same file on zblock's own front end (`--libfuse native`): the new ceiling

Measured: wall time of the hog process (start to exit) writing its working set, one verify +
rewrite pass in random 1 MiB chunks, and a final verify of every page. Rounds rotate the order;
medians. Target (issue "Performance"): zblock <= 1.15x memfile-loop. Reported, not failed; the run
fails only when it is broken (a page the hog could not verify, a set-up step that failed, a hog
that did not swap, or swapped somewhere else).

Global state and how it is given back on every path (finally blocks, innermost first): swap areas
this test enabled are swapped off (never one it did not create; it refuses to start while any
other swap is on), loop devices it attached are detached, mounts unmounted, the zram device reset
and hot_removed, the child memory cgroup removed (its hog killed by pid), and every kernel zswap
parameter restored to the value read before the test (enabled first when it was N).

Knobs: ZBLOCK_BENCH_SWAP_MIB (working set, default 512), ZBLOCK_BENCH_SWAP_LIMIT_MIB (cgroup
limit, default 160), ZBLOCK_BENCH_SWAP_PASSES (verify+rewrite passes, default 1),
ZBLOCK_BENCH_ROUNDS (default 3 here), ZBLOCK_BENCH_TARGETS (names above).
Kernel fidelity under a limit: ZBLOCK_BENCH_POOL_PERCENT=N gives zblock `--pool-limit N%` and
kernel zswap max_pool_percent=N (instead of a pool that holds the whole area), and
ZBLOCK_BENCH_LIMIT_POLICY=evict|zswap zblock's limit policy, ZBLOCK_BENCH_POOL_LIMIT=SIZE zblock's
`--pool-limit` (the far tier's benchmark: a quarter of the swapped data); both report their counters
(zblock's stats, the kernel's /sys/kernel/debug/zswap) beside the times.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import time
from pathlib import Path

import pytest

import cgroups
import harness as h
import rediscluster
from zblock import swapctl as zswap_util

MiB = 1 << 20
HOG = h.ROOT / "tests" / "hog.py"
POOL_PERCENT = int(os.environ["ZBLOCK_BENCH_POOL_PERCENT"]) \
    if os.environ.get("ZBLOCK_BENCH_POOL_PERCENT") else None
LIMIT_POLICY = os.environ.get("ZBLOCK_BENCH_LIMIT_POLICY")
POOL_LIMIT = os.environ.get("ZBLOCK_BENCH_POOL_LIMIT")      # e.g. 128M: --pool-limit for zblock*
ZSWAP_DIR = Path("/sys/module/zswap/parameters")
LOOP_FLAGS = ["--direct-io=on", "--sector-size", "4096"]      # what `zblock swapon` uses
SWAPON = ["swapon", "--discard"]                                 # likewise
HOG_DEADLINE_S = 900.0
SWAPOFF_DEADLINE_S = 600.0
LOOP_DETACH_DEADLINE_S = 30.0
CGROUP_PREFIX = "zblock-bench-swap-"
DISK_PREFIX = "swap-disk-"
MEMFILE_REF = "memfile-loop"
TARGET_NEED = 1.15
RUN_ATTEMPTS = 3
OTHER_SWAP_DEADLINE_S = 900.0
BenchBroken = h.BenchBroken


def _env_int(name: str, default: int) -> int:
    return max(1, int(os.environ.get(name, str(default))))


def vmstat() -> dict[str, int]:
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k in ("pswpin", "pswpout", "zswpin", "zswpout", "zswpwb"):
                out[k] = int(v)
    return out


# =============================================================================================
# kernel zswap parameters: saved once, restored on every path


class KernelZswap:
    """Every file of /sys/module/zswap/parameters read on entry; on restore() (and exit) each one
    that now differs is written back, `enabled` first when it was N (no new stores while the
    others change) and last when it was Y. restore() raises BenchBroken if a value did not take."""

    def __init__(self):
        self.saved: dict[str, str] = {}

    def __enter__(self) -> "KernelZswap":
        if ZSWAP_DIR.is_dir():
            self.saved = {p.name: p.read_text().strip() for p in sorted(ZSWAP_DIR.iterdir())}
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def get(self, name: str) -> str:
        return (ZSWAP_DIR / name).read_text().strip()

    def set(self, name: str, value: str) -> bool:
        """Write a parameter; False (nothing changed) when the kernel refuses the value."""
        try:
            (ZSWAP_DIR / name).write_text(value)
            return True
        except OSError:
            return False

    def enabled(self) -> bool:
        return bool(self.saved) and self.get("enabled").upper() in ("Y", "1")

    def restore(self) -> None:
        if not self.saved:
            return
        was_on = self.saved.get("enabled", "N").upper() in ("Y", "1")
        order = [k for k in self.saved if k != "enabled"]
        order = order + ["enabled"] if was_on else ["enabled"] + order
        failed = []
        for name in order:
            with contextlib.suppress(OSError):
                if self.get(name) != self.saved[name]:
                    self.set(name, self.saved[name])
            with contextlib.suppress(OSError):
                if self.get(name) != self.saved[name]:
                    failed.append(f"{name}={self.get(name)} (was {self.saved[name]})")
        if failed:
            raise BenchBroken(f"kernel zswap not restored: {', '.join(failed)}")

    def force_off(self) -> None:
        """zswap must be off for every target but zswap+disk-loop (it would take their pages)."""
        if self.saved and self.enabled() and not self.set("enabled", "N"):
            raise BenchBroken("cannot disable kernel zswap for the runs without it")


@contextlib.contextmanager
def zswap_in_front(zs: KernelZswap, swap_size: int):
    """Enable kernel zswap (lz4 if offered) with a pool able to hold the swap area; restores all."""
    if not zs.saved:
        raise h.TargetUnavailable("kernel zswap not built in (/sys/module/zswap/parameters missing)")
    # zswap's counters are in debugfs: mounted for the run if it is not, unmounted after
    debugfs = Path("/sys/kernel/debug")
    mounted_debugfs = not os.path.ismount(debugfs) and subprocess.run(
        ["mount", "-t", "debugfs", "none", str(debugfs)], capture_output=True).returncode == 0
    try:
        info = {}
        if zs.get("compressor") != "lz4" and not zs.set("compressor", "lz4"):
            info["lz4"] = "not offered by the kernel crypto API (CONFIG_CRYPTO_LZ4 off): kept"
        ram = h.psutil.virtual_memory().total
        pct = int(zs.get("max_pool_percent"))
        need = min(100, -(-swap_size * 100 // ram) + 1)
        if POOL_PERCENT is not None:
            if not zs.set("max_pool_percent", str(POOL_PERCENT)):
                raise BenchBroken(f"zswap: max_pool_percent={POOL_PERCENT} refused")
        elif pct * ram // 100 < swap_size:
            if not zs.set("max_pool_percent", str(need)):
                raise BenchBroken(f"zswap: max_pool_percent={need} refused")
        if not zs.set("enabled", "Y") or not zs.enabled():
            raise BenchBroken("zswap: enabled=Y refused")
        info.update({k: zs.get(k) for k in zs.saved})
        info["max_pool_bytes"] = int(info["max_pool_percent"]) * ram // 100
        before = _kernel_zswap_counters()
        yield info
        # what kernel zswap did during the run (beside zblock's server_stats, for the reader)
        after = _kernel_zswap_counters()
        info["counters"] = {k: v - before.get(k, 0) if k in _ZSWAP_EVENTS else v
                            for k, v in after.items()}
    finally:
        zs.restore()
        if mounted_debugfs:
            subprocess.run(["umount", str(debugfs)], capture_output=True)


_ZSWAP_EVENTS = {"pool_limit_hit", "written_back_pages", "reject_compress_poor",
                 "reject_compress_fail", "reject_alloc_fail", "reject_reclaim_fail",
                 "reject_kmemcache_fail", "decompress_fail", "zswpout", "zswpin", "zswpwb"}


def _kernel_zswap_counters() -> dict:
    """Kernel zswap's debugfs counters and gauges, and its /proc/vmstat events."""
    out = {}
    d = Path("/sys/kernel/debug/zswap")
    if d.is_dir():
        for f in d.iterdir():
            with contextlib.suppress(OSError, ValueError):
                out[f.name] = int(f.read_text())
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k in ("zswpout", "zswpin", "zswpwb"):
                out[k] = int(v)
    return out


# =============================================================================================
# swap areas: set up, yield the device, undo on every path


def _swapoff(dev: str) -> None:
    if zswap_util.swap_entry(dev) is not None:
        h._run(["swapoff", dev], timeout=SWAPOFF_DEADLINE_S)


def _mkswap_swapon(dev: str) -> None:
    h._run(["mkswap", "--label", "zbbench", dev], timeout=120)
    h._run([*SWAPON, dev], timeout=120)
    if zswap_util.swap_entry(dev) is None:
        raise BenchBroken(f"swapon {dev}: not in /proc/swaps afterwards")


@contextlib.contextmanager
def loop_over(path: Path):
    """A loop device over `path` with zblock swapon's settings; swapped off and detached after."""
    loop = h._run(["losetup", "--find", "--show", *LOOP_FLAGS, str(path)], timeout=60).stdout.strip()
    if not loop.startswith("/dev/loop"):
        raise BenchBroken(f"losetup printed {loop!r}")
    try:
        yield loop
    finally:
        _detach(loop)


def _detach(loop: str) -> None:
    _swapoff(loop)
    if zswap_util.loop_backing_file(loop) is None:
        return
    h._run(["losetup", "--detach", loop], timeout=60, check=False)
    h.wait_for(lambda: zswap_util.loop_backing_file(loop) is None, f"{loop} detach",
               LOOP_DETACH_DEADLINE_S)


@contextlib.contextmanager
def swap_zram(swap_size: int, zs: KernelZswap):
    zs.force_off()
    with h.ZramTarget(swap_size) as z:
        dev = str(z.path)
        try:
            _mkswap_swapon(dev)
            yield {"device": dev, "algorithm": z.algorithm}
        finally:
            _swapoff(dev)


@contextlib.contextmanager
def swap_disk_loop(swap_size: int, zs: KernelZswap, with_zswap: bool):
    zs.force_off()
    h.STATE_DIR.mkdir(parents=True, exist_ok=True)
    img = h.STATE_DIR / f"{DISK_PREFIX}{os.getpid()}.img"
    with contextlib.suppress(FileNotFoundError):
        img.unlink()
    try:
        h._run(["fallocate", "-l", str(swap_size), str(img)], timeout=120)
        with loop_over(img) as loop:
            _mkswap_swapon(loop)
            info = {"device": loop, "backing": str(img), "loop_dio": zswap_util.loop_dio(loop),
                    "backing_fs": _fs_of(img)}
            if not with_zswap:
                yield info
                return
            with zswap_in_front(zs, swap_size) as zinfo:
                yield {**info, "zswap": zinfo}
    finally:
        with contextlib.suppress(FileNotFoundError):
            img.unlink()


@contextlib.contextmanager
def swap_memfile_loop(swap_size: int, zs: KernelZswap, libfuse: int | str = 3):
    zs.force_off()
    with h.MemfileTarget(swap_size, libfuse) as m:
        with loop_over(m.path) as loop:
            _mkswap_swapon(loop)
            yield {"device": loop, "loop_dio": zswap_util.loop_dio(loop), "libfuse": libfuse,
                   "server_pid": m.proc.pid}


@contextlib.contextmanager
def far_cluster():
    """A local 6-node Redis Cluster for the zblock-far target, stopped (by pid) after."""
    if not h.shutil.which("redis-server"):
        raise h.TargetUnavailable("redis-server not installed")
    cluster = rediscluster.RedisCluster(h.STATE_DIR / f"far-cluster-{os.getpid()}").start()
    try:
        yield cluster
    finally:
        cluster.stop()
        h.shutil.rmtree(cluster.dir, ignore_errors=True)


@contextlib.contextmanager
def swap_zblock(swap_size: int, zs: KernelZswap, far: bool = False, encrypt: bool = False,
                uring: bool = False):
    zs.force_off()
    options = ["--swap"] + (["--encrypt"] if encrypt else []) + \
        (["--fuse-uring", "on"] if uring else [])
    if POOL_PERCENT is not None:
        options += ["--pool-limit", f"{POOL_PERCENT}%"]
    if POOL_LIMIT:
        options += ["--pool-limit", POOL_LIMIT]
    if LIMIT_POLICY:
        options += ["--limit-policy", LIMIT_POLICY]
    with contextlib.ExitStack() as stack:
        if uring:
            stack.enter_context(h.fuse_uring_enabled())
        if far:
            cluster = stack.enter_context(far_cluster())
            options += ["--far", cluster.url, "--far-limit", str(swap_size)]
        with _swap_zblock(swap_size, options) as info:
            yield info


@contextlib.contextmanager
def _swap_zblock(swap_size: int, options: list[str]):
    with h.ZblockTarget(swap_size, options=options, name="zblock") as z:
        loop = None
        try:
            p = h._run([*z.cmd, "swapon", str(z.mp)], timeout=180, cwd=h.ROOT)
            loop = p.stdout.strip().splitlines()[-1]
            if zswap_util.swap_entry(loop) is None:
                raise BenchBroken(f"zblock swapon printed {loop!r}, which is not an active swap area")
            info = {"device": loop, "loop_dio": zswap_util.loop_dio(loop), "server_pid": z.pid,
                    "options": " ".join(options) + " (defaults otherwise)"}
            yield info
            # what the server saw during the run (its counters: for the reader, not a measurement)
            with contextlib.suppress(Exception):
                st = z.stats()
                info["server_stats"] = {k: st.get(k) for k in (
                    "zswpout", "zswpin", "written_back_pages", "discarded_pages", "pool_limit_hit",
                    "reject_compress_poor", "reject_pool_limit", "stored_incompressible_pages",
                    "bd_writes", "bd_reads", "bd_read_ios", "bd_read_us", "bd_write_ios",
                    "bd_readahead_pages", "bd_readahead_hits",
                    "bd_write_us", "pool_total_size", "orig_data_size", "compr_data_size",
                    "request_sizes", "far_writes", "far_reads", "far_stored_pages", "far_bytes",
                    "far_errors", "far_latency_us")}
        finally:
            p = subprocess.run([*z.cmd, "swapoff", str(z.mp)], capture_output=True, text=True,
                               timeout=SWAPOFF_DEADLINE_S + 120, cwd=h.ROOT)
            # the loop this test saw is torn down even if `zblock swapoff` failed or never ran
            disk = str(z.mp / "disk")
            for dev in sorted(set(zswap_util.loops_over(disk)) | ({loop} if loop else set())):
                if zswap_util.loop_backing_file(dev) in (disk, "/disk"):
                    _detach(dev)
            if p.returncode != 0 and loop is not None:
                raise BenchBroken(f"zblock swapoff: exit {p.returncode}: {p.stderr.strip()[-300:]}")


def _fs_of(path: Path) -> str:
    p = h._run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", str(path)], check=False)
    return p.stdout.strip()


SWAP_TARGETS = {
    "zblock": lambda size, zs: swap_zblock(size, zs),
    "zblock-uring": lambda size, zs: swap_zblock(size, zs, uring=True),
    "zblock-far": lambda size, zs: swap_zblock(size, zs, far=True),
    "zblock-encrypt": lambda size, zs: swap_zblock(size, zs, encrypt=True),
    "zram-lz4": lambda size, zs: swap_zram(size, zs),
    "disk-loop": lambda size, zs: swap_disk_loop(size, zs, with_zswap=False),
    "zswap+disk-loop": lambda size, zs: swap_disk_loop(size, zs, with_zswap=True),
    MEMFILE_REF: lambda size, zs: swap_memfile_loop(size, zs),
    "memfile-native-loop": lambda size, zs: swap_memfile_loop(size, zs, "native"),
}


# =============================================================================================
# the memory cgroup and the hog


def _broken(message: str):
    raise BenchBroken(message)


def MemCgroup(limit: int) -> cgroups.MemCgroup:
    return cgroups.MemCgroup(limit, prefix=CGROUP_PREFIX, unavailable=_broken)


def run_hog(device: str, mib: int, limit: int, passes: int, seed: int) -> dict:
    """Run the hog in a fresh cgroup; wall time from spawn to exit, peak use of `device` sampled
    from /proc/swaps, vmstat deltas. BenchBroken on any verify error or a non-zero exit."""
    with MemCgroup(limit) as cg:
        before = vmstat()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        hog = subprocess.Popen([h.PYTHON, str(HOG), "--mib", str(mib), "--passes", str(passes),
                                "--seed", str(seed), "--cgroup-procs", str(cg.procs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = 0
        others: set[str] = set()
        try:
            deadline = t0 + HOG_DEADLINE_S
            while True:
                # the hog's progress is outside this process: sample /proc/swaps until it exits
                try:
                    hog.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                for s in zswap_util.swaps():
                    if s["name"] == device:
                        peak = max(peak, s["used_kib"])
                    else:
                        others.add(s["name"])
                if time.monotonic() > deadline:
                    raise BenchBroken(f"hog on {device} did not finish within {HOG_DEADLINE_S:.0f} s")
            wall = time.monotonic() - t0
            out, err = hog.communicate(timeout=30)
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        finally:
            if hog.poll() is None:
                hog.kill()      # our own child, by pid
                hog.communicate(timeout=30)
        after = vmstat()
    lines = [ln for ln in out.splitlines() if ln.strip().startswith("{")]
    if not lines:
        raise BenchBroken(f"hog on {device}: exit {hog.returncode}, no result: {err.strip()[-1500:]}")
    res = json.loads(lines[-1])
    if hog.returncode != 0 or res["errors"] or res["verified"] != res["pages"]:
        raise BenchBroken(f"hog on {device}: exit {hog.returncode}, verify failed: {res}")
    delta = {k: after[k] - before.get(k, 0) for k in after}
    return {"wall_s": wall, "hog_s": res["seconds"], "hog_phase_s": res["phase_seconds"],
            "peak_swap_kib": peak, "vmstat": delta,
            # the hog's CPU: user (its own work) and system (faults, reclaim, swap I/O submission)
            "hog_user_s": cpu1.ru_utime - cpu0.ru_utime, "hog_sys_s": cpu1.ru_stime - cpu0.ru_stime,
            "other_swaps_seen": sorted(others)}


def wait_for_no_swap() -> None:
    """Each run needs its swap area to be the only one. Another project's test may have one on
    for a while (its own hog): wait for it to go, never touch it; broken after the deadline."""
    end = time.monotonic() + OTHER_SWAP_DEADLINE_S
    others = zswap_util.swaps()
    if others:
        print(f"waiting up to {OTHER_SWAP_DEADLINE_S:.0f} s for swap areas this benchmark did not "
              f"create to go: {[s['name'] for s in others]}", flush=True)
    while others:
        if time.monotonic() > end:
            raise BenchBroken(f"other swap areas stayed on for {OTHER_SWAP_DEADLINE_S:.0f} s: {others}; "
                              "this benchmark needs its own to be the only one")
        time.sleep(1.0)     # another process's swapoff: nothing to wait on but /proc/swaps
        others = zswap_util.swaps()


# =============================================================================================
# leftovers of an earlier, killed run of this benchmark (only ours)


OWN_PREFIXES = (str(h.MNT_PREFIX) + "/", str(h.STATE_DIR / DISK_PREFIX))


def _creator_pid(path: str) -> int | None:
    """The pid in a harness path: MNT_PREFIX/NAME-PID/disk, STATE_DIR/swap-disk-PID.img."""
    rel = path[len(str(h.MNT_PREFIX)) + 1:].split("/")[0] if path.startswith(OWN_PREFIXES[0]) \
        else Path(path).name.split(".")[0]
    tail = rel.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _leftover(path: str | None) -> bool:
    """A harness path whose creating run is gone (or is this run): ours to clean up."""
    return path is not None and path.startswith(OWN_PREFIXES) and not h.owned_by_live_run(_creator_pid(path))


def own_swaps() -> list[str]:
    """Active swap areas of this harness not owned by another live run: loops over its mounts or
    disk files, zram devices it hot_added."""
    out = []
    zram = [d for d, pid in h._zram_state() if not h.owned_by_live_run(pid)]
    for s in zswap_util.swaps():
        dev = s["name"]
        back = zswap_util.loop_backing_file(dev) if dev.startswith("/dev/loop") else None
        if _leftover(back) or dev.removeprefix("/dev/zram") in zram:
            out.append(dev)
    return out


def sweep_own_leftovers() -> list[str]:
    """What a killed earlier run of this benchmark left (never another live run's, never a swap
    area, loop or cgroup this harness did not create)."""
    done = []
    for dev in own_swaps():
        subprocess.run(["swapoff", dev], capture_output=True, timeout=SWAPOFF_DEADLINE_S)
        done.append(f"swapoff {dev}")
    for name in sorted(os.listdir("/sys/block")):
        back = zswap_util.loop_backing_file(name) if name.startswith("loop") else None
        if _leftover(back) and not zswap_util.swap_entry(f"/dev/{name}"):
            subprocess.run(["losetup", "--detach", f"/dev/{name}"], capture_output=True, timeout=60)
            done.append(f"detached /dev/{name}")
    with contextlib.suppress(OSError):
        for cg in MemCgroup(1).parent.iterdir():
            pid = cg.name[len(CGROUP_PREFIX):].split("-")[0]
            if cg.name.startswith(CGROUP_PREFIX) and pid.isdigit() and not h.owned_by_live_run(int(pid)):
                with contextlib.suppress(OSError):
                    cgroups.remove_cgroup(cg)
                    done.append(f"removed cgroup {cg.name}")
    for img in h.STATE_DIR.glob(f"{DISK_PREFIX}*.img") if h.STATE_DIR.exists() else []:
        if _leftover(str(img)) and not zswap_util.loops_over(str(img)):
            img.unlink()
            done.append(f"removed {img}")
    return done


# =============================================================================================
# the benchmark


@pytest.mark.timeout(5400)
def test_swap_hog():
    mib = _env_int("ZBLOCK_BENCH_SWAP_MIB", 512)
    limit = _env_int("ZBLOCK_BENCH_SWAP_LIMIT_MIB", 160) * MiB
    passes = _env_int("ZBLOCK_BENCH_SWAP_PASSES", 1)
    rounds = _env_int("ZBLOCK_BENCH_ROUNDS", 3)
    swap_size = 2 * mib * MiB               # room for the whole working set, whatever the limit
    for tool in ("losetup", "mkswap", "swapon", "swapoff", "fallocate", "findmnt"):
        if not h.shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    if not HOG.exists():
        pytest.skip(f"{HOG} missing")
    for line in sweep_own_leftovers():
        print(f"swap sweep: {line}")
    wait_for_no_swap()

    rep = h.Report("swap", f"Swap hog: {mib} MiB working set in a {limit >> 20} MiB cgroup, "
                           f"{passes} rewrite pass(es), wall s, median of {rounds}")
    skipped = rep.skipped
    names = []
    for n in SWAP_TARGETS:
        if h.wanted(n):
            names.append(n)
        else:
            skipped[n] = "not in ZBLOCK_BENCH_TARGETS"
    if "zblock" in names and h.ZblockTarget.availability():
        skipped["zblock"] = h.ZblockTarget.availability()
        names.remove("zblock")
    runs = []
    with KernelZswap() as zs:
        rep.config.update({
            "size_bytes": swap_size, "rounds": rounds, "working_set_MiB": mib,
            "cgroup_limit_MiB": limit >> 20, "cgroup": f"v{MemCgroup(limit).version}, swappiness 100",
            "hog_passes": passes, "swap_area_MiB": swap_size >> 20,
            "loop": f"losetup {' '.join(LOOP_FLAGS)}; {' '.join(SWAPON)} on every target",
            "kernel_zswap_before": dict(zs.saved),
        })
        loop_dio = {}
        for rnd in range(rounds):
            for name in h.rotated(list(names), rnd):
                if name in skipped:
                    continue
                for attempt in range(RUN_ATTEMPTS):
                    wait_for_no_swap()
                    try:
                        with SWAP_TARGETS[name](swap_size, zs) as info:
                            if name != "zswap+disk-loop" and zs.enabled():
                                raise BenchBroken(f"{name}: kernel zswap is on")
                            r = run_hog(info["device"], mib, limit, passes, seed=1 + rnd)
                    except h.TargetUnavailable as e:
                        skipped[name] = str(e)
                        break
                    if not r["other_swaps_seen"]:
                        break
                    # someone else's swap area came up during the run: pages may have gone there
                    print(f"round {rnd} {name}: other swap areas appeared during the run "
                          f"({r['other_swaps_seen']}); measuring again", flush=True)
                    rep.notes.append(f"round {rnd} {name} measured again: other swap areas "
                                     f"{r['other_swaps_seen']} appeared during attempt {attempt + 1}")
                else:
                    raise BenchBroken(f"{name}: other swap areas kept appearing in {RUN_ATTEMPTS} attempts")
                if name in skipped:
                    continue
                _check_where_pages_went(name, r, mib, limit)
                if "loop_dio" in info:
                    loop_dio[name] = info["loop_dio"]
                rep.add(name, "wall_s", r["wall_s"])
                rep.add(name, "hog_s", r["hog_s"])
                rep.add(name, "peak_swap_MiB", r["peak_swap_kib"] / 1024)
                out = r["vmstat"]["pswpout"] + r["vmstat"]["zswpout"]
                rep.add(name, "swapped_out_MiB", out * 4096 / MiB)
                rep.targets_info[name] = {k: v for k, v in info.items() if k != "device"}
                runs.append({"round": rnd, "target": name, **r})
                print(f"round {rnd} {name:<16} wall {r['wall_s']:6.2f} s  hog {r['hog_s']:6.2f} s  "
                      f"peak swap {r['peak_swap_kib'] >> 10} MiB  vmstat {r['vmstat']}", flush=True)
        zs.restore()
        rep.config["loop_dio"] = loop_dio
        rep.config["kernel_zswap_after"] = {k: zs.get(k) for k in zs.saved}
    assert not own_swaps(), f"swap left on: {own_swaps()}"

    rep.check("swap wall time vs memfile behind a loop", "zblock", "wall_s", MEMFILE_REF,
              at_most=TARGET_NEED)
    rep.notes.append("wall_s: hog spawn to exit (write, rewrite pass, verify); hog_s: the hog's own "
                     "clock; swapped_out_MiB: vmstat pswpout + zswpout during the run")
    rep.notes.append("every target is set up fresh for each run (mount/zram/loop, mkswap, swapon) "
                     "and torn down after; only the hog is timed")
    print("\n" + ratio_table(rep))
    rep.emit()
    _append_runs(runs)
    if "zblock" in skipped:
        pytest.skip(f"references measured; zblock: {skipped['zblock']}")


def _check_where_pages_went(name: str, r: dict, mib: int, limit: int) -> None:
    """A run that did not swap, or swapped past the target, measured nothing: broken."""
    need = (mib * MiB - limit) // 2 // 4096
    v = r["vmstat"]
    if name == "zswap+disk-loop":
        if v["zswpout"] < need:
            raise BenchBroken(f"{name}: kernel zswap stored only {v['zswpout']} pages (need {need})")
    else:
        if v["zswpout"]:
            raise BenchBroken(f"{name}: kernel zswap stored {v['zswpout']} pages while it should be off")
        if v["pswpout"] < need or r["peak_swap_kib"] * 1024 < need * 4096:
            raise BenchBroken(f"{name}: swapped out only {v['pswpout']} pages, peak on the device "
                              f"{r['peak_swap_kib']} KiB (need {need} pages)")


def ratio_table(rep: h.Report) -> str:
    ref = rep.value(MEMFILE_REF, "wall_s")
    lines = [f"{'target':<18} {'wall s':>8} {'vs memfile-loop':>16} {'met (<= 1.15x)':>15}   samples"]
    for name in rep.results:
        v = rep.value(name, "wall_s")
        ratio = v / ref if ref else None
        met = "-"
        if name == "zblock":
            met = "n/a" if ratio is None else ("yes" if ratio <= TARGET_NEED else "NO")
        samples = ", ".join(f"{x:.2f}" for x in rep.results[name]["wall_s"]["samples"])
        lines.append(f"{name:<18} {v:8.2f} {(f'{ratio:.2f}x' if ratio else 'n/a'):>16} {met:>15}   {samples}")
    cfg = rep.config
    lines.append(f"config: working set {cfg['working_set_MiB']} MiB, cgroup {cfg['cgroup_limit_MiB']} MiB "
                 f"({cfg['cgroup']}), swap area {cfg['swap_area_MiB']} MiB, loop dio {cfg.get('loop_dio')}, "
                 f"kernel zswap before {cfg['kernel_zswap_before']}, after {cfg.get('kernel_zswap_after')}")
    zi = rep.targets_info.get("zswap+disk-loop", {}).get("zswap")
    if zi:
        lines.append(f"kernel zswap during zswap+disk-loop: {zi}")
    return "\n".join(lines)


def _append_runs(runs: list[dict]) -> None:
    """Every single run into the JSON beside the medians (Report writes medians and samples)."""
    path = h.out_path("swap")
    data = json.loads(path.read_text())
    data["runs"] = runs
    path.write_text(json.dumps(data, indent=1, default=str))
