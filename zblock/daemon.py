"""Mount lifecycle: the foreground server, background start, signals, unmount.

The server is always `zblock mount --foreground` (serve()): it opens the Store, mounts, and runs
libfuse's multi-threaded loop in the calling thread until the filesystem is unmounted. libfuse
never forks (foreground=True always): a fork would lose Python's threads and memory locks.

Background mode (start_background()) starts that same command in a new session with its output
in a log file, and waits on a readiness pipe: the server writes `OK` when the kernel's INIT
arrives (the mount answers), or `ERR <exit code> <message>` when it fails before that.
The caller returns when it has read one of them, or the server died, or the deadline passed.

Shutdown: SIGTERM, SIGINT, SIGHUP (libfuse's own handlers end the loop), `umount`/`fusermount -u`
(the kernel ends the connection) all lead to the same path: libfuse unmounts, calls destroy,
and the server closes the Store, which writes everything back (nothing in swap mode). The pid
file is removed only after a clean close, so `zblock umount` can tell a clean exit from a
failed one. Signals arriving during the close are ignored: a second Ctrl-C must not cut the
write-back short.

Swap mode: the server hardens itself (zblock.hardening) before any thread exists, and hands the
Store a `release_memory` (zblock.memory) that can give locked memory back; it tells systemd
when it is ready and stopping (zblock.sdnotify). The pid and log files and the mount table are
zblock.runtime's.

Two imports wait until they are needed: the store's (after PR_SET_IO_FLUSHER: a thread an
engine library starts at import would never get the flag) and mfusepy's (FUSE_LIBRARY_NAME
picks the library before it loads).

What this module does not do: option parsing (zblock.cli), FUSE semantics (zblock.fuse_ops).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import syslog
import threading
import time

from . import hardening, memory, sdnotify
from .errors import BackingError, DeadMount, MountError, UsageError, WritebackFailed, ZblockError
from .pool import tune_malloc
from .runtime import (FSTYPE, MountEntry, abort_fuse_connection, find_mount, find_zblock_mount,
                      log_file, pid_file, read_pid_file, run_with_deadline)

log = logging.getLogger("zblock.daemon")

START_TIMEOUT = 60.0       # imports + Store.open + mount take ~0.5 s here; a big fsck-on-open may take longer
UMOUNT_TIMEOUT = 600.0     # write-back of a full pool: ~1 GiB at disk speed


# ---------------------------------------------------------------------------------------------
# logging


class _SyslogHandler(logging.Handler):
    """Writes records to the journal/syslog through libc's syslog(3): logging.handlers'
    SysLogHandler cost an idle server 1.2 MiB of modules for this."""

    PRIORITIES = {logging.CRITICAL: syslog.LOG_CRIT, logging.ERROR: syslog.LOG_ERR,
                  logging.WARNING: syslog.LOG_WARNING}

    def __init__(self, level: int):
        super().__init__(level)
        syslog.openlog("zblock", syslog.LOG_PID, syslog.LOG_USER)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            syslog.syslog(self.PRIORITIES.get(record.levelno, syslog.LOG_INFO), self.format(record))
        except Exception:
            self.handleError(record)


class _KmsgHandler(logging.Handler):
    """Writes records to the kernel log (/dev/kmsg, read with dmesg): where a machine without
    a syslog socket still keeps a server's last words after its log file is gone or unread."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with open("/dev/kmsg", "w") as f:
                f.write(f"zblock[{os.getpid()}]: {self.format(record)}\n")
        except OSError:
            pass


def setup_logging(debug: bool = False) -> None:
    """The server's logging: everything to stderr (the log file in background mode), and what
    the user must not miss (a failed write-back) to the journal/syslog too, or the kernel log."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if os.path.exists("/dev/log"):
        handler: logging.Handler = _SyslogHandler(logging.WARNING)
    elif os.access("/dev/kmsg", os.W_OK):
        handler = _KmsgHandler(logging.CRITICAL)
    else:
        return
    logging.getLogger().addHandler(handler)


# ---------------------------------------------------------------------------------------------
# checks done before starting a server (fast errors, no traceback)


def _is_dead(entry: MountEntry) -> bool:
    """A FUSE mount whose server is gone: the kernel answers ENOTCONN. Asked only when no
    server of it runs (a live but hung one would hang the question); statfs, because a stat
    of the root may be answered from the attribute cache."""
    if read_pid_file(entry.mountpoint) is not None:
        return False
    try:
        os.statvfs(entry.mountpoint)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def _dead_mount_error(mountpoint: str) -> DeadMount:
    return DeadMount(f"{mountpoint} is a dead zblock mount (its server is gone); clear it with "
                     f"`zblock umount --force {mountpoint}`")


def check_mountpoint(mountpoint: str) -> None:
    m = find_mount(mountpoint)
    if m is not None and m.fstype == FSTYPE and _is_dead(m):
        raise _dead_mount_error(mountpoint)
    if not os.path.exists(mountpoint):
        raise MountError(f"mount point {mountpoint} does not exist")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")
    m = find_mount(mountpoint)
    if m is not None and m.mountpoint == os.path.realpath(mountpoint) and os.path.realpath(mountpoint) != "/":
        if m.fstype == FSTYPE:
            raise MountError(f"{mountpoint} is already a zblock mount")
        raise MountError(f"{mountpoint} is already a mount point ({m.fstype})")
    try:
        if os.listdir(mountpoint):
            raise MountError(f"mount point {mountpoint} is not empty")
    except PermissionError:
        raise MountError(f"mount point {mountpoint} is not readable") from None


def check_backing(backing: str, size: int | None, read_only: bool = False) -> None:
    """Errors the user can fix before a server starts. The Store re-checks (and locks)."""
    if os.path.isdir(backing):
        raise BackingError(f"backing file {backing} is a directory")
    if os.path.exists(backing):
        need, what = ((os.R_OK, "readable") if read_only
                      else (os.R_OK | os.W_OK, "readable and writable"))
        if not os.access(backing, need):
            raise BackingError(f"backing file {backing} is not {what}")
    elif read_only:
        raise BackingError(f"backing file {backing} does not exist (nothing to mount read-only)")
    else:
        parent = os.path.dirname(os.path.abspath(backing))
        if not os.path.isdir(parent):
            raise BackingError(f"directory of the backing file {parent} does not exist")
        if size is None:
            raise UsageError(f"backing file {backing} does not exist: a new one needs --size")


def fuse_front_end(config) -> str:
    """The front end a mount uses: config.fuse_impl, with `auto` resolved (native where this
    process may call mount(2) itself, else mfusepy)."""
    if config.fuse_impl != "auto":
        return config.fuse_impl
    return "native" if os.geteuid() == 0 else "mfusepy"


def check_fuse(fuse_version: int, front_end: str = "mfusepy", fuse_uring: str = "auto") -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing (load the fuse module: modprobe fuse)")
    if fuse_uring == "on":
        if front_end != "native":
            raise MountError("--fuse-uring on needs the native front end (--fuse-impl native)")
        from .fuse import uring
        why = uring.unavailable()
        if why:
            raise MountError(f"--fuse-uring on: FUSE over io_uring: {why}")
    if front_end == "native":
        if os.geteuid() != 0:
            raise MountError("the native FUSE front end mounts with mount(2), which needs root; "
                             "use --fuse-impl mfusepy")
        return                          # speaks the protocol itself: no libfuse needed
    import ctypes.util                  # runs ldconfig: only for this front end
    lib = "fuse3" if fuse_version == 3 else "fuse"
    if ctypes.util.find_library(lib) is None:
        pkg = "fuse3" if fuse_version == 3 else "libfuse2"
        raise MountError(f"libfuse {fuse_version} is not installed (apt-get install {pkg})")


# ---------------------------------------------------------------------------------------------
# the foreground server


def _notify(fn, *args) -> None:
    """An sd_notify call (zblock.sdnotify); a failure is logged, never raised into the server."""
    try:
        fn(*args)
    except Exception:
        log.warning("%s failed", fn.__name__, exc_info=True)


class _Readiness:
    """The write end of the readiness pipe (or nothing when run in the foreground by hand)."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def _send(self, text: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, text.encode() + b"\n")
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None

    def progress(self, text: str) -> None:
        """A line for the user while a long start-up step runs; it also extends the wait."""
        log.info("%s", text)
        if self.fd is not None:
            try:
                os.write(self.fd, f"WAIT {text}\n".encode())
            except OSError:
                pass

    def ok(self) -> None:
        self._send("OK")

    def fail(self, code: int, message: str) -> None:
        self._send(f"ERR {code} {message.splitlines()[0] if message else 'failed'}")


def _load_fuse(fuse_version: int):
    """Import mfusepy on the wanted library. FUSE_LIBRARY_NAME must be set before the import."""
    want = "fuse3" if fuse_version == 3 else "fuse"
    if "mfusepy" not in sys.modules:
        os.environ["FUSE_LIBRARY_NAME"] = want
    import mfusepy
    if mfusepy.fuse_version_major != fuse_version:
        raise MountError(f"libfuse {fuse_version} requested but libfuse {mfusepy.fuse_version_major} "
                         "is loaded in this process")
    from .fuse import libfuse
    return mfusepy, libfuse


def _open_store(backing: str, size: int | None, config, **kw):
    # Imported here, after the swap hardening: a thread that exists before PR_SET_IO_FLUSHER
    # never gets the flag, and a library may start one when it is imported.
    from .store import Store
    return Store.open(backing, size, config, **kw)


def serve(mountpoint: str, backing: str, size: int | None, config, *, fuse_version: int = 3,
          ready_fd: int | None = None, store_factory=None, debug: bool = False) -> int:
    """Run the server in this process until unmounted. Returns the exit code.

    `store_factory(backing, size, config, progress=..., release_memory=...)` opens the Store
    (default Store.open); test entry points pass one that stacks fault layers under the backing
    file. In swap mode the store gets `release_memory`, which gives the memory its pool freed
    back although the hardening locked it.
    """
    ready = _Readiness(ready_fd)
    store = None
    close_error: list[BaseException] = []
    closed = threading.Event()

    def close_store() -> None:
        # Runs in libfuse's destroy (after the unmount) and again after the loop returns;
        # idempotent. Signals are ignored from here on: a second SIGTERM must not cut the
        # write-back short (libfuse has already put SIG_DFL back).
        if closed.is_set():
            return
        closed.set()
        _notify(sdnotify.notify_stopping)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                signal.signal(sig, signal.SIG_IGN)
            except ValueError:          # not the main thread: keep going, close anyway
                pass
        t0 = time.monotonic()
        try:
            store.close()
            log.info("store closed in %.2f s", time.monotonic() - t0)
        except BaseException as e:      # reported by the exit code and the pid file left behind
            log.critical("closing the store failed: %s", e, exc_info=not isinstance(e, ZblockError))
            close_error.append(e)

    front_end = fuse_front_end(config)
    try:
        check_fuse(fuse_version, front_end, config.fuse_uring)
        check_mountpoint(mountpoint)
        if front_end == "mfusepy":
            mfusepy, libfuse = _load_fuse(fuse_version)
        release_memory = None
        if config.swap:
            # before any thread exists (the Store starts some)
            release_memory = functools.partial(memory.release_free_memory,
                                               hardening.harden_for_swap(config))
        else:
            tune_malloc()
        store = (store_factory or _open_store)(backing, size, config, progress=ready.progress,
                                               release_memory=release_memory)
    except ZblockError as e:
        ready.fail(e.exit_code, str(e))
        raise
    except Exception as e:
        ready.fail(1, f"{type(e).__name__}: {e}")
        raise

    pidf = pid_file(mountpoint)
    try:
        with open(pidf, "w") as f:
            f.write(f"{os.getpid()}\n{os.path.abspath(backing)}\n")

        mounted = threading.Event()

        def on_init() -> None:
            how = "native FUSE" if front_end == "native" else f"libfuse {fuse_version}"
            log.info("mounted %s on %s (%s)", backing, mountpoint, how)
            mounted.set()
            ready.ok()
            _notify(sdnotify.notify_ready, mountpoint)  # systemd Type=notify; a thread of its own

        from . import fuse_ops
        ops_class = fuse_ops.ZblockOps if front_end == "native" else libfuse.LibfuseOps
        ops = ops_class(store, kernel_cache=config.kernel_cache, on_init=on_init,
                        on_destroy=close_store)
        if front_end == "native":
            _serve_native(ops, mountpoint, backing, config)
        else:
            _serve_mfusepy(mfusepy, libfuse, ops, mountpoint, backing, config, mounted, debug)
    except ZblockError as e:
        ready.fail(e.exit_code, str(e))
        close_store()
        raise
    except BaseException as e:
        ready.fail(1, f"{type(e).__name__}: {e}")
        close_store()
        raise
    close_store()
    if close_error:
        return 1
    try:
        os.unlink(pidf)
    except OSError:
        pass
    return 0


def _serve_mfusepy(mfusepy, libfuse, ops, mountpoint: str, backing: str, config, mounted,
                   debug: bool) -> None:
    """libfuse's loop until unmounted; libfuse handles the signals and calls ops.destroy."""
    opts = libfuse.mount_options(os.path.realpath(backing), kernel_cache=config.kernel_cache,
                                  read_only=config.read_only)
    if debug:
        opts["debug"] = True
    try:
        mfusepy.FUSE(ops, mountpoint, raw_fi=True, **opts)
    except RuntimeError as e:
        if not mounted.is_set():
            # libfuse printed why (it goes to the log in background mode).
            raise MountError(f"libfuse could not mount {mountpoint} (code {e})") from None
        # After a signal libfuse's loop returns non-zero (3.14: 8): a normal end.
        log.info("loop ended by a signal (libfuse code %s)", e)


def _serve_native(ops, mountpoint: str, backing: str, config) -> None:
    """zblock.fuse.native's loop until unmounted or aborted. SIGTERM, SIGINT and SIGHUP end it
    as they end libfuse's: a lazy unmount, then the connection is aborted."""
    from .fuse import native, uring
    workers = native.SWAP_WORKERS if config.swap else native.DEFAULT_WORKERS
    depth = 0
    if config.fuse_uring == "on" or (config.fuse_uring == "auto" and not uring.unavailable()):
        depth = native.URING_SWAP_DEPTH if config.swap else native.URING_DEPTH
    session = native.NativeFuse(ops, mountpoint, fsname=os.path.realpath(backing),
                                read_only=config.read_only, workers=workers,
                                on_init=lambda: ops.negotiated(session.info, session.counters),
                                uring_depth=depth)
    try:
        session.mount()
    except OSError as e:
        raise MountError(f"could not mount {mountpoint}: {e.strerror}") from None
    # Left installed after the loop (stop() is idempotent) until close_store() ignores them:
    # the default action in between would kill the server before its write-back.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: session.stop())
    try:
        session.serve()
    finally:
        session.stop()                  # an error in serve() must not leave the mount behind
    log.info("native FUSE loop ended")


# ---------------------------------------------------------------------------------------------
# background start


def start_background(argv: list[str], mountpoint: str, timeout: float = START_TIMEOUT, *,
                     program: list[str] | None = None) -> int:
    """Start `zblock mount --foreground` (argv: the arguments after `zblock`) in a new session,
    wait for the readiness pipe. Returns the server's pid. Raises MountError with its message.

    `program` is what runs in place of `zblock` (a test entry point that serves with its own
    store factory); by default this interpreter's `-P -m zblock`.
    """
    logpath = log_file(mountpoint)
    r, w = os.pipe()
    try:
        with open(logpath, "ab") as logf:
            log_start = logf.tell()     # this attempt's lines only, in any error message
            # -P: the current directory must not shadow the installed package (a `zblock/`
            # folder there would be imported instead)
            proc = subprocess.Popen(
                [*(program or [sys.executable, "-P", "-m", "zblock"]), *argv,
                 "--foreground", "--ready-fd", str(w)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,),
                start_new_session=True, close_fds=True)
    finally:
        os.close(w)
    try:
        line = _read_line(r, timeout, proc)
    finally:
        os.close(r)
    if line == "OK":
        return proc.pid
    if line.startswith("ERR "):
        _, code, msg = (line.split(" ", 2) + [""])[:3]
        proc.wait(timeout=10)
        err = MountError(msg)
        err.exit_code = int(code) if code.isdigit() else 1
        raise err
    if line == "":
        rc = proc.wait(timeout=10)
        if rc < 0:
            name = signal.Signals(-rc).name
            why = " (out of memory? see dmesg)" if -rc == signal.SIGKILL else ""
            raise MountError(f"the server was killed by {name}{why} before the mount answered "
                             f"(log: {logpath})")
        raise MountError(f"the server exited (code {rc}) before the mount answered: "
                         f"{_log_tail(logpath, log_start)}")
    proc.kill()
    raise MountError(f"the mount did not answer within {timeout:.0f} s (see {logpath})")


def _read_line(fd: int, timeout: float, proc) -> str:
    """The server's answer on the readiness pipe; "" on EOF (server gone); "TIMEOUT" when
    `timeout` passes without a line. "WAIT text" lines (progress) go to a terminal on stderr
    and restart the wait."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            text = line.decode(errors="replace").strip()
            if not text.startswith("WAIT "):
                return text
            deadline = time.monotonic() + timeout
            if sys.stderr.isatty():
                print(f"zblock: {text[5:]}", file=sys.stderr)
        left = deadline - time.monotonic()
        if left <= 0:
            return "TIMEOUT"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return buf.decode(errors="replace").strip()
        buf += chunk


def _log_tail(path: str, start: int = 0) -> str:
    """What the server said last in its log since offset `start`: its CRITICAL lines if any
    (the reason it failed), else its last line."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(start, f.tell() - 8000))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"no log at {path}"
    critical = [ln.split(" CRITICAL ", 1)[1] for ln in lines if " CRITICAL " in ln]
    if critical:
        return "; ".join(critical[-3:])
    return lines[-1] if lines else f"no output (see {path})"


# ---------------------------------------------------------------------------------------------
# unmount


def wait_pid_exit(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to exit (pidfd, no polling). True if it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        return bool(ready)
    finally:
        os.close(fd)


def _fsync_disk(mountpoint: str) -> None:
    fd = os.open(os.path.join(mountpoint, "disk"), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umount_cmd(mountpoint: str, lazy: bool = False) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        # -i: not through umount.fuse.zblock (mount/), which would call zblock umount again
        cmd = ["umount", "-i"] + (["-l"] if lazy else []) + [mountpoint]
    else:
        tool = "fusermount3" if shutil.which("fusermount3") else "fusermount"
        cmd = [tool, "-u"] + (["-z"] if lazy else []) + [mountpoint]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def umount(mountpoint: str, force: bool = False, timeout: float = UMOUNT_TIMEOUT) -> str | None:
    """Write back, fsync, unmount, return when the server has exited. Returns a note for the
    user when it cleared a dead mount instead."""
    entry = find_zblock_mount(mountpoint)
    pid = read_pid_file(mountpoint)
    note = None
    if not force and _is_dead(entry):
        # Safely dead: no server is left to write anything back; clear it as --force would.
        force = True
        note = (f"{mountpoint} was a dead mount (its server had exited); cleared it. Pages the "
                f"server had not written back are not in the backing file: run `zblock fsck` on it")
    if force:
        abort_fuse_connection(entry.minor)
        res = _umount_cmd(entry.mountpoint, lazy=True)
        if res.returncode != 0 and find_mount(entry.mountpoint) is not None:
            raise MountError(f"umount -l {mountpoint} failed: {res.stderr.strip()}")
    else:
        # fsync through the mount first: write-back errors reach the user while the mount is
        # still there, and the unmount's own write-back has nothing left but the clean pages.
        try:
            run_with_deadline(lambda: _fsync_disk(entry.mountpoint), 300.0, "fsync")
        except OSError as e:
            raise WritebackFailed(
                f"writing back {mountpoint} failed ({e.strerror}); the mount stays up and keeps "
                f"the data: make room on the backing file's filesystem or fix the disk, then run "
                f"`zblock umount` again (`zblock stats` shows io_errors, pool_over_limit; log: "
                f"{log_file(entry.mountpoint)})") from None
        res = _umount_cmd(entry.mountpoint)
        if res.returncode != 0:
            msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
            raise MountError(f"unmounting {mountpoint} failed: {msg}")
    if pid is None:
        return note
    if not wait_pid_exit(pid, timeout):
        raise MountError(f"the server (pid {pid}) did not exit within {timeout:.0f} s after the unmount")
    if os.path.exists(pid_file(entry.mountpoint)) and not force:
        raise MountError(f"the server exited without a clean write-back: "
                         f"{_log_tail(log_file(entry.mountpoint))}")
    return note
