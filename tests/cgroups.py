"""A child memory cgroup for a memory hog (tests/test_swap.py and tests/perf/test_swap.py)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

REMOVE_DEADLINE_S = 30.0


class MemCgroup:
    """A child memory cgroup of this process's own (v1: memory.limit_in_bytes; v2: memory.max).

    `procs` is the file a process writes its pid to in order to join. On exit, processes still in
    it (only ours can be: the test's hog) are killed by pid and the directory is removed.
    `unavailable(message)` is called, and must raise, when no memory cgroup can be made here (a
    test skips or fails, a benchmark reports itself broken).
    """

    def __init__(self, limit: int, *, prefix: str, unavailable):
        self.limit = limit
        self.prefix = prefix
        self._unavailable = unavailable
        self.path: Path | None = None
        own_v1 = own_v2 = None
        with open("/proc/self/cgroup") as f:
            for line in f:
                hid, ctrls, path = line.rstrip("\n").split(":", 2)
                if "memory" in ctrls.split(","):
                    own_v1 = path
                elif hid == "0" and ctrls == "":
                    own_v2 = path
        if own_v1 is not None and Path("/sys/fs/cgroup/memory").is_dir():
            self.version, self.parent = 1, Path("/sys/fs/cgroup/memory" + own_v1.rstrip("/"))
        elif own_v2 is not None and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            self.version, self.parent = 2, Path("/sys/fs/cgroup" + own_v2.rstrip("/"))
        else:
            unavailable("no memory cgroup (v1 or v2) for this process")

    def __enter__(self) -> "MemCgroup":
        path = self.parent / f"{self.prefix}{os.getpid()}-{time.monotonic_ns() % 10**9}"
        try:
            path.mkdir()
        except OSError as e:
            self._unavailable(f"cannot create a memory cgroup under {self.parent}: {e}")
        self.path = path
        self.procs = path / "cgroup.procs"
        try:
            if self.version == 1:
                self._write("memory.limit_in_bytes", self.limit)
                # memsw (if accounted) must stay above the limit or the hog is OOM-killed
                # instead of swapping; -1 = unlimited, bounded by the parent's own memsw.
                if (path / "memory.memsw.limit_in_bytes").exists():
                    self._write("memory.memsw.limit_in_bytes", -1)
                self._write("memory.swappiness", 100)
            else:
                with contextlib.suppress(OSError):
                    (self.parent / "cgroup.subtree_control").write_text("+memory")
                if not (path / "memory.max").exists():
                    self._unavailable("cgroup v2: the memory controller is not enabled for "
                                      "children here")
                self._write("memory.max", self.limit)
                self._write("memory.swap.max", "max")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _write(self, name: str, value) -> None:
        (self.path / name).write_text(str(value))

    def pids(self) -> list[int]:
        return cgroup_pids(self.path) if self.path is not None else []

    def __exit__(self, *exc) -> None:
        if self.path is None:
            return
        remove_cgroup(self.path)
        self.path = None


def cgroup_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def remove_cgroup(path: Path) -> None:
    """Kill (by pid) what is still in the cgroup, then remove it. TimeoutError if the kernel
    still holds it after REMOVE_DEADLINE_S."""
    for pid in cgroup_pids(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    end = time.monotonic() + REMOVE_DEADLINE_S
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError(f"cgroup {path} still busy after {REMOVE_DEADLINE_S:.0f} s")
            time.sleep(0.1)     # the kernel frees the cgroup once its last task is reaped
