"""Swap control: `zblock swapon` / `zblock swapoff` over a --swap mount (loop, mkswap, swapon).

swapon attaches a direct-I/O loop device with 4096-byte sectors over MOUNTPOINT/disk, runs
mkswap and swapon --discard; swapoff runs swapoff, blkdiscard (zblock drops the pages) and
detaches the loop device. Both refuse a mount whose stats do not say `"swap": true`: its loop
devices may hold a user's filesystem.

The state lives in the kernel (loop devices in /sys/block/loop*/loop, swap areas in /proc/swaps),
so nothing is recorded here and a second run can finish what a failed one left. A loop device
belongs to a mount when its backing_file is MOUNTPOINT/disk. Both commands hold
RUNTIME_DIR/swap.lock (flock, across processes) so that two of them cannot interleave on one
machine; no other lock.

What this module does not do: serve swap (the daemon, with zblock.hardening), or load the engine:
it asks the mount through its stats file, so `zblock swapon/swapoff` import no engine module
and no compressor.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time

from .errors import MountError, UsageError
from .runtime import ZSWAP_ENABLED, find_zblock_mount, kernel_zswap_enabled, read_stats, runtime_dir

log = logging.getLogger("zblock.swap")

SWAPON_TIMEOUT = 120.0          # losetup + mkswap + swapon of a fresh area: < 1 s here
SWAPOFF_TIMEOUT = 3600.0        # swapoff reads every swapped page back in: bounded by RAM, not us
LOOP_DETACH_TIMEOUT = 30.0      # losetup -d is deferred (autoclear) while the device is still open


# ---------------------------------------------------------------------------------------------
# kernel state: loop devices and swap areas


def swaps() -> list[dict]:
    """/proc/swaps as dicts: name, type, size_kib, used_kib, priority."""
    out = []
    with open("/proc/swaps") as f:
        for line in list(f)[1:]:
            parts = line.split()
            if len(parts) < 5:
                continue
            name = parts[0].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            out.append({"name": name, "type": parts[1], "size_kib": int(parts[2]),
                        "used_kib": int(parts[3]), "priority": int(parts[4])})
    return out


def swap_entry(device: str) -> dict | None:
    for s in swaps():
        if s["name"] == device:
            return s
    return None


def loop_backing_file(device: str) -> str | None:
    """The file behind /dev/loopN (None if the device is detached)."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            path = f.read().rstrip("\n")
    except OSError:
        return None
    return path[:-len(" (deleted)")] if path.endswith(" (deleted)") else path


def loop_dio(device: str) -> bool:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/dio") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def loops_over(path: str) -> list[str]:
    """Loop devices whose backing file is `path` (compared as written: no access to the file)."""
    found = []
    for name in sorted(os.listdir("/sys/block")):
        if name.startswith("loop") and loop_backing_file(name) == path:
            found.append(f"/dev/{name}")
    return found


# ---------------------------------------------------------------------------------------------
# swap mode of a mount


def mount_is_swap(mountpoint: str) -> bool:
    """Whether the zblock mount at `mountpoint` serves swap: its stats' "swap" flag, read within
    runtime.ANSWER_TIMEOUT so that a hung server cannot hang the command."""
    stats = read_stats(mountpoint)
    if "swap" not in stats:
        raise MountError(f"{mountpoint}: cannot tell whether it is in swap mode (its stats have "
                         "no \"swap\" flag)")
    return bool(stats["swap"])


# ---------------------------------------------------------------------------------------------
# swapon / swapoff


@contextlib.contextmanager
def _swap_lock(timeout: float = 60.0):
    """One swapon/swapoff at a time on this machine (flock with a deadline)."""
    fd = os.open(os.path.join(runtime_dir(), "swap.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MountError("another zblock swapon/swapoff is running") from None
                time.sleep(0.1)     # another process holds it; flock has no timed wait
        yield
    finally:
        os.close(fd)


def _run(cmd: list[str], timeout: float) -> str:
    """Run a system tool; MountError naming the tool and its last stderr line on failure."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise MountError(f"{cmd[0]} is not installed (apt-get install util-linux)") from None
    except subprocess.TimeoutExpired:
        raise MountError(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from None
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines()
        raise MountError(f"{' '.join(cmd)} failed: {lines[-1] if lines else f'exit {res.returncode}'}")
    return res.stdout


def _zblock_disk(mountpoint: str) -> tuple[str, str]:
    """(mount point as in the mount table, its disk path); MountError if not a zblock mount."""
    entry = find_zblock_mount(mountpoint)
    return entry.mountpoint, os.path.join(entry.mountpoint, "disk")


def swapon(mountpoint: str, priority: int | None = None, *, timeout: float = SWAPON_TIMEOUT) -> str:
    """Attach a direct-I/O loop device over MOUNTPOINT/disk, mkswap, swapon --discard.

    Returns the loop device. Refuses a mount that is not in swap mode or already has a loop
    device. On any failure, what this call set up is undone before the error is raised.
    """
    if priority is not None and not -1 <= priority <= 32767:
        raise UsageError(f"swapon: --priority {priority} is out of range (-1..32767)")
    mp, disk = _zblock_disk(mountpoint)
    if not mount_is_swap(mp):
        raise MountError(f"{mountpoint} is not mounted in swap mode (mount it with --swap or -o swap)")
    if kernel_zswap_enabled():
        log.warning("kernel zswap is enabled: it will take swapped pages before they reach zblock")
    with _swap_lock():
        existing = loops_over(disk)
        if existing:
            active = [d for d in existing if swap_entry(d)]
            what = "swap is already on" if active else "a loop device is attached"
            raise MountError(f"{mountpoint}: {what} ({', '.join(existing)}); "
                             f"run zblock swapoff {mountpoint} first")
        # 4096-byte sectors: every request is whole pages (no read-modify-write in zblock);
        # direct I/O: no second copy of each page in the page cache above FUSE.
        loop = _run(["losetup", "--find", "--show", "--direct-io=on", "--sector-size", "4096", disk],
                    timeout).strip()
        if not loop.startswith("/dev/loop"):
            raise MountError(f"losetup printed {loop!r}, not a loop device")
        try:
            if not loop_dio(loop):
                raise MountError(f"{loop} did not get direct I/O (/sys/block/{os.path.basename(loop)}"
                                 "/loop/dio = 0): refusing buffered swap over FUSE")
            _run(["mkswap", "--label", "zblock", loop], timeout)
            cmd = ["swapon", "--discard"]
            if priority is not None:
                cmd += ["--priority", str(priority)]
            _run(cmd + [loop], timeout)
        except BaseException:
            _teardown(loop, discard=False)
            raise
        log.info("swap on %s over %s", loop, disk)
        return loop


def swapoff(mountpoint: str, *, timeout: float = SWAPOFF_TIMEOUT) -> list[str]:
    """swapoff, blkdiscard and detach every loop device over MOUNTPOINT/disk. Returns them.

    Refuses a mount that is not in swap mode (its loop devices may hold a user's filesystem)
    and a mount with no loop device over it.
    """
    mp, disk = _zblock_disk(mountpoint)
    if not mount_is_swap(mp):
        raise MountError(f"{mountpoint} is not mounted in swap mode: not touching its loop devices")
    with _swap_lock():
        loops = loops_over(disk)
        if not loops:
            raise MountError(f"{mountpoint}: swap is not on (no loop device over {disk})")
        for loop in loops:
            _teardown(loop, discard=True, timeout=timeout)
        return loops


def _teardown(loop: str, *, discard: bool, timeout: float = SWAPOFF_TIMEOUT) -> None:
    """swapoff if active, optionally blkdiscard (zblock drops the pages), detach, wait for it."""
    errors = []
    if swap_entry(loop) is not None:
        _run(["swapoff", loop], timeout)        # a failure here must stop us: the area is live
    if discard:
        try:
            _run(["blkdiscard", "--force", loop], 600.0)
        except MountError as e:
            errors.append(str(e))               # still detach: the pages die with the mount
    try:
        _run(["losetup", "--detach", loop], 60.0)
    except MountError as e:
        errors.append(str(e))
    deadline = time.monotonic() + LOOP_DETACH_TIMEOUT
    while loop_backing_file(loop) is not None:
        if time.monotonic() > deadline:
            errors.append(f"{loop} still attached {LOOP_DETACH_TIMEOUT:.0f} s after losetup -d "
                          "(something keeps it open)")
            break
        time.sleep(0.05)            # the kernel detaches when the last opener closes
    if errors:
        raise MountError("; ".join(errors))


# ---------------------------------------------------------------------------------------------
# command line (zblock.cli calls register_cli)


def cmd_swapon(args, argv) -> int:
    if kernel_zswap_enabled():
        print(f"zblock: warning: kernel zswap is enabled, it takes the pages first: echo N > {ZSWAP_ENABLED}",
              file=sys.stderr)
    print(swapon(args.mountpoint, args.priority))
    return 0


def cmd_swapoff(args, argv) -> int:
    swapoff(args.mountpoint)
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("swapon", help="use a --swap mount as swap (loop device, mkswap, swapon)",
                       description="Attach a direct-I/O loop device over MOUNTPOINT/disk, mkswap it "
                                   "and swapon --discard it; prints the loop device.")
    p.add_argument("mountpoint")
    p.add_argument("--priority", "-p", type=int, help="swap priority (-1..32767; default: the kernel's)")
    p.set_defaults(func=cmd_swapon)
    p = sub.add_parser("swapoff", help="undo zblock swapon (swapoff, blkdiscard, detach)",
                       description="swapoff the loop device over MOUNTPOINT/disk, discard it and "
                                   "detach it.")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_swapoff)
