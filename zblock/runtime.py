"""Lookups: where a server's runtime files are, which zblock mounts exist, what a mount says.

- Runtime files: RUNTIME_DIR/<quoted mount point>.pid ("PID\\nBACKING\\n") and .log (server
  output), and RUNTIME_DIR/swap.lock. RUNTIME_DIR is $ZBLOCK_RUNTIME_DIR, else /run/zblock for
  root, else $XDG_RUNTIME_DIR/zblock or /tmp/zblock-UID.
- The mount table: /proc/self/mountinfo, parsed, never touching the mounts themselves.
- A mount's files (stats, params/NAME), read under a deadline: a hung server must not hang the
  command that asks.
- Kernel zswap's switch, which decides whether swapped pages reach zblock at all.

Invariant: nothing here waits on a mount without a deadline (read_mount_file runs the whole
lookup, the path resolution included, in a thread it gives up on). No locks.

What this module does not do: start, stop or change anything (zblock.daemon, zblock.swapctl),
or know about the engine: the daemon, the CLI and swapctl use it without loading the engine or
the compressors.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
from dataclasses import dataclass

from . import libc
from .errors import MountError, NotAZblockMount

FSTYPE = "fuse.zblock"
ZSWAP_ENABLED = "/sys/module/zswap/parameters/enabled"
# How long stats and set wait for a mount to answer: a hung server must not hang the command.
ANSWER_TIMEOUT = 30.0


# ---------------------------------------------------------------------------------------------
# runtime files


def runtime_dir() -> str:
    d = os.environ.get("ZBLOCK_RUNTIME_DIR")
    if not d:
        if os.geteuid() == 0:
            d = "/run/zblock"
        elif os.environ.get("XDG_RUNTIME_DIR"):
            d = os.path.join(os.environ["XDG_RUNTIME_DIR"], "zblock")
        else:
            d = f"/tmp/zblock-{os.getuid()}"
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _runtime_path(mountpoint: str, ext: str) -> str:
    return os.path.join(runtime_dir(), urllib.parse.quote(os.path.realpath(mountpoint), safe="") + ext)


def pid_file(mountpoint: str) -> str:
    return _runtime_path(mountpoint, ".pid")


def log_file(mountpoint: str) -> str:
    return _runtime_path(mountpoint, ".log")


def read_pid_file(mountpoint: str) -> int | None:
    """The server's pid if its pid file names a live zblock process, else None."""
    try:
        with open(pid_file(mountpoint)) as f:
            pid = int(f.readline())
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return None
    return pid if b"zblock" in cmd else None


def pid_file_backing(mountpoint: str) -> str | None:
    """The backing file the server wrote into its pid file ("PID\\nBACKING\\n")."""
    try:
        with open(pid_file(mountpoint)) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return lines[1] if len(lines) > 1 and lines[1] else None


# ---------------------------------------------------------------------------------------------
# mount table


@dataclass
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    major: int
    minor: int       # for FUSE: the connection number under /sys/fs/fuse/connections/


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountEntry]:
    """/proc/self/mountinfo, parsed. Never touches the mounts themselves (a dead one would hang)."""
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            major, minor = parts[2].split(":")
            entries.append(MountEntry(_unescape(parts[4]), parts[sep + 1], _unescape(parts[sep + 2]),
                                      int(major), int(minor)))
    return entries


FUSECTL = "/sys/fs/fuse/connections"


def abort_fuse_connection(minor: int) -> bool:
    """Abort FUSE connection `minor` (its requests fail, its server's reads get ENODEV) through
    the fuse control filesystem, mounting that for the moment when nobody has (systemd does at
    boot; a bare machine may not). True if the abort was written."""
    mounted_here = False
    if not os.path.exists(f"{FUSECTL}/{minor}") and os.path.isdir(FUSECTL):
        try:
            libc.mount("fusectl", FUSECTL, "fusectl", 0, "")
            mounted_here = True
        except OSError:
            pass
    try:
        with open(f"{FUSECTL}/{minor}/abort", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False
    finally:
        if mounted_here:
            try:
                libc.umount2(FUSECTL, libc.MNT_DETACH)
            except OSError:
                pass


def find_mount(mountpoint: str) -> MountEntry | None:
    path = os.path.realpath(mountpoint)
    found = None
    for m in mounts():
        if m.mountpoint == path:
            found = m           # the last one is on top
    return found


def find_zblock_mount(mountpoint: str) -> MountEntry:
    m = find_mount(mountpoint)
    if m is None or m.fstype != FSTYPE:
        what = "not mounted" if m is None else f"a {m.fstype} mount"
        raise NotAZblockMount(f"{mountpoint}: not a zblock mount ({what})")
    return m


# ---------------------------------------------------------------------------------------------
# a mount's files, under a deadline


def run_with_deadline(fn, timeout: float, what: str):
    """Run fn in a daemon thread; a hung FUSE server must not hang the command."""
    result: list = []
    error: list = []

    def run():
        try:
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=run, daemon=True, name=what)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise MountError(f"{what}: no answer from the server within {timeout:.0f} s (try --force)")
    if error:
        raise error[0]
    return result[0] if result else None


def read_mount_file(mountpoint: str, name: str, timeout: float = ANSWER_TIMEOUT) -> str:
    """The text of MOUNTPOINT/NAME on a zblock mount, within a deadline. The check that it is a
    zblock mount runs under the deadline too: resolving the path stats the mount's root, which
    waits on a hung server like any read (measured: lstat of a stopped server's mount point
    blocks once the kernel's cached attributes have expired)."""

    def read():
        find_zblock_mount(mountpoint)
        with open(os.path.join(mountpoint, name)) as f:
            return f.read()
    return run_with_deadline(read, timeout, name)


def read_stats(mountpoint: str, timeout: float = ANSWER_TIMEOUT) -> dict:
    text = read_mount_file(mountpoint, "stats", timeout)
    try:
        return json.loads(text)
    except ValueError:
        raise MountError(f"{mountpoint}/stats is not JSON") from None


# ---------------------------------------------------------------------------------------------
# the kernel


def kernel_zswap_enabled() -> bool:
    """True when kernel zswap would take swapped pages before they reach any swap device."""
    try:
        with open(ZSWAP_ENABLED) as f:
            return f.read().strip().upper() in ("Y", "1")
    except OSError:
        return False            # no zswap in this kernel
