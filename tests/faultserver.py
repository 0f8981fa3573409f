"""A zblock server whose backing disks follow a fault script: the test entry point for faulty mounts.

    python tests/faultserver.py mount MOUNTPOINT --backing PATH [zblock mount options]

is `zblock mount` with one difference: the server opens its Store with `open_fault_store`, which
stacks the layers of tests/faultdisk.py under the real Backing as ZBLOCK_TEST_FAULTS says. A
background start (no --foreground) starts this same script again in the foreground, so the
faults reach the server. tests/mountutil.Mount(faults=True) starts mounts this way; every other
command (umount, stats, fsck) is the plain `zblock` one.

A mounted server cannot be handed Python objects, so a test describes faults in a JSON file and
sets `ZBLOCK_TEST_FAULTS=/path/to/rules.json` in the server's environment. The disks are then

    FileDisk  ->  CrashDisk (only with a "crash" rule)  ->  EnvFaultDisk (FaultyDisk + reload)

The rules file (every key optional):

    {"rules": [{"op": "write", "err": "EIO", "nth": 3, "pages": [7, 8], "times": 1,
                "torn": false, "role": "data"}, ...],
     "crash": {"stop_at": 40, "ops": ["write", "fsync", "punch"], "power_cut": true}}

- `rules` are faultdisk.Fault rules (`err` a name such as "EIO"/"ENOSPC" or a number) plus
  `role`: "data" (default), "meta" (the .zbmeta sidecar) or "any". `nth` counts the calls of
  that op on that file from the moment the rule set was loaded, so a test that rewrites the file
  while mounted means "the N-th write from now". The file is re-read whenever its mtime, size or
  inode changes (checked on every disk call: one stat, test mode only); a file that does not
  parse keeps the previous rules and logs why. An absent file means no rules.
- `crash` (read once, at open): a CrashPlan shared by the data file and its sidecar. At the
  `stop_at`-th counted operation the server process dies: with `power_cut` (default) everything
  not fsynced is first undone in both files (CrashDisk.cut_power), as a power cut would; then
  `os._exit(EXIT_CRASH)`. A plain SIGKILL proves little: the backing file's page cache would
  outlive the process, this does not.

FUSE over io_uring faults (ZBLOCK_TEST_RING_FAULT, read at start, native front end):
    register:Q     queue Q registers a payload buffer too small for the kernel (EINVAL)
    serve:Q:N      queue Q's thread fails after answering N requests

Only this script reads ZBLOCK_TEST_FAULTS and ZBLOCK_TEST_RING_FAULT: a plain `zblock` server
never does. Thread-safety: the
rule swap happens under the FaultyDisk's own lock, a reload under `_reload_lock` (order:
reload -> _lock).
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import sys
import threading

from faultdisk import OPS, Crash, CrashDisk, CrashPlan, Fault, FaultyDisk
from zblock import cli
from zblock.disk import FileDisk

log = logging.getLogger("faultserver")

ENV_FAULTS = "ZBLOCK_TEST_FAULTS"
ENV_RING_FAULT = "ZBLOCK_TEST_RING_FAULT"
EXIT_CRASH = 86          # exit status of a server stopped by a crash rule (tests look for it)
ROLES = ("data", "meta", "any")
SCRIPT = os.path.abspath(__file__)


# ---------------------------------------------------------------------------------------------
# the rules file


def parse_err(value) -> int:
    """'EIO' / 'ENOSPC' / 5 -> errno number; ValueError on anything else."""
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str) and value.isupper() and isinstance(getattr(errno, value, None), int):
        return getattr(errno, value)
    raise ValueError(f"err: {value!r} is not an errno name or number")


def rules_from_json(spec: dict, role: str, base_calls: dict[str, int] | None = None) -> list[Fault]:
    """The Fault rules of `spec` that apply to a disk of `role`; `nth` made absolute by adding
    `base_calls[op]` (the calls that disk had seen when the rules were loaded)."""
    out = []
    for r in spec.get("rules", []) or []:
        r = dict(r)
        want = r.pop("role", "data")
        if want not in ROLES:
            raise ValueError(f"role: {want!r} is not one of {ROLES}")
        if want not in (role, "any"):
            continue
        op = r.pop("op")
        if op not in OPS:
            raise ValueError(f"op: {op!r} is not one of {OPS}")
        nth = r.pop("nth", None)
        if nth is not None:
            nth = int(nth) + (base_calls or {}).get(op, 0)
        unknown = set(r) - {"err", "pages", "times", "torn"}
        if unknown:
            raise ValueError(f"unknown rule keys {sorted(unknown)}")
        out.append(Fault(op=op, err=parse_err(r.get("err", "EIO")), nth=nth,
                         pages=r.get("pages"), times=r.get("times", 1),
                         torn=bool(r.get("torn", False))))
    return out


def write_rules(path: str, rules: list[dict] | None = None, crash: dict | None = None) -> None:
    """Replace the rules file atomically (a new inode: the server notices on its next call)."""
    spec = {"rules": list(rules or [])}
    if crash is not None:
        spec["crash"] = crash
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(spec, f)
    os.replace(tmp, path)


def _read_spec(path: str) -> dict:
    with open(path) as f:
        spec = json.load(f)
    if not isinstance(spec, dict):
        raise ValueError("the rules file must hold a JSON object")
    return spec


# ---------------------------------------------------------------------------------------------
# disk layers


class EnvFaultDisk(FaultyDisk):
    """A FaultyDisk whose rules come from a JSON file, re-read when the file changes."""

    def __init__(self, inner, rules_path: str, role: str):
        super().__init__(inner)
        self.rules_path = rules_path
        self.role = role
        self._stamp = None                    # (ino, size, mtime_ns) of the loaded file
        self._reload_lock = threading.Lock()  # one reload at a time; order: reload -> _lock
        self._maybe_reload()

    def _maybe_reload(self) -> None:
        try:
            st = os.stat(self.rules_path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        with self._reload_lock:
            if stamp == self._stamp:
                return
            try:
                spec = _read_spec(self.rules_path) if stamp is not None else {}
                with self._lock:
                    base = dict(self.calls)
                rules = rules_from_json(spec, self.role, base)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("%s: rules not reloaded: %s", self.rules_path, e)
                self._stamp = stamp
                return
            with self._lock:
                self.rules = rules
            self._stamp = stamp
            log.warning("test faults for %s (%s): %d rule(s) loaded", self.inner_path(), self.role,
                        len(rules))

    def inner_path(self) -> str:
        d = self.inner
        while not hasattr(d, "path"):
            d = d.inner
        return d.path

    def pread(self, offset, length):
        self._maybe_reload()
        return super().pread(offset, length)

    def pwritev(self, offset, bufs):
        self._maybe_reload()
        return super().pwritev(offset, bufs)

    def fsync(self):
        self._maybe_reload()
        return super().fsync()

    def punch(self, offset, length):
        self._maybe_reload()
        return super().punch(offset, length)

    # FileDisk extras the backing may look at
    @property
    def mode(self):
        return getattr(self.inner, "mode", "test")


class ExitingCrashPlan(CrashPlan):
    """A CrashPlan for a real server: the crash point ends the process (after the power cut)."""

    def __init__(self, stop_at: int | None, ops=("write", "fsync", "punch"), power_cut: bool = True):
        super().__init__(stop_at, ops)
        self.power_cut = power_cut

    def tick(self, op: str) -> None:
        try:
            super().tick(op)
        except Crash as e:
            log.critical("test crash point reached: %s; %s", e,
                         "cutting power" if self.power_cut else "exiting")
            try:
                if self.power_cut:
                    self.cut_power()
            finally:
                logging.shutdown()
                os._exit(EXIT_CRASH)


def make_disk_factory(rules_path: str | None = None, crash: CrashPlan | None = None, *,
                      direct: bool = True):
    """A Backing disk_factory(path, role) stacking FileDisk -> CrashDisk -> EnvFaultDisk.
    `direct` applies to the data file (the sidecar is always buffered, as Backing does)."""

    def factory(path: str, role: str):
        disk = FileDisk(path, direct=direct and role == "data")
        if crash is not None:
            disk = CrashDisk(disk, crash)
        if rules_path is not None:
            disk = EnvFaultDisk(disk, rules_path, role)
        return disk

    return factory


def disk_factory_from_env(environ=None):
    """The disk factory ZBLOCK_TEST_FAULTS asks for, or None (default disks) when it is unset."""
    environ = os.environ if environ is None else environ
    path = environ.get(ENV_FAULTS)
    if not path:
        return None
    path = os.path.abspath(path)
    plan = None
    try:
        spec = _read_spec(path)
    except FileNotFoundError:
        spec = {}
    crash = spec.get("crash")
    if crash:
        plan = ExitingCrashPlan(crash.get("stop_at"), tuple(crash.get("ops", ("write", "fsync", "punch"))),
                                bool(crash.get("power_cut", True)))
    log.warning("%s=%s: backing disks wrapped with test faults%s", ENV_FAULTS, path,
                f" (crash at op {plan.stop_at})" if plan else "")
    return make_disk_factory(path, plan)


def open_fault_store(backing_path, size, config, **kw):
    """Store.open with the disks ZBLOCK_TEST_FAULTS asks for: the daemon's store factory."""
    # imported late, as zblock.daemon does: numpy's OpenBLAS thread must start after the hardening
    from zblock.store import Store
    return Store.open(backing_path, size, config, disk_factory=disk_factory_from_env(), **kw)


def ring_faults() -> None:
    """Patch zblock.fuse.uring as ZBLOCK_TEST_RING_FAULT says (see the module docstring)."""
    spec = os.environ.get(ENV_RING_FAULT)
    if not spec:
        return
    from zblock.fuse import uring
    kind, qid, *rest = spec.split(":")
    qid = int(qid)
    if kind == "register":
        entry_init = uring._Entry.__init__

        def small_payload(self, index, q, payload_size):
            entry_init(self, index, q, payload_size)
            if q == qid:
                self.iov[3] = 4096          # the iovec's payload length the kernel checks
        uring._Entry.__init__ = small_payload
    elif kind == "serve":
        limit, serve = int(rest[0]), uring.UringQueue._serve

        def failing_serve(self, first):
            if self.qid == qid:
                answer, count = self.answer, itertools.count(1)

                def answer_then_fail(*args):
                    if next(count) > limit:
                        raise RuntimeError(f"injected failure of FUSE ring {qid}")
                    return answer(*args)
                self.answer = answer_then_fail
            return serve(self, first)
        uring.UringQueue._serve = failing_serve
    else:
        raise SystemExit(f"{ENV_RING_FAULT}={spec!r}: register:Q or serve:Q:N")


def main(argv: list[str] | None = None) -> int:
    ring_faults()
    return cli.main(argv, store_factory=open_fault_store, program=[sys.executable, SCRIPT])


if __name__ == "__main__":
    sys.exit(main())
