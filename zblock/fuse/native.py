"""zblock's own FUSE front end: the kernel protocol spoken directly on /dev/fuse.

Why: libfuse's high-level layer and a ctypes callback sit in front of every request on the
mfusepy path, and Debian's libfuse (3.14) cannot ask for FOPEN_PARALLEL_DIRECT_WRITES, so the
kernel sends writes to one file one at a time. Here each worker thread reads requests into its
own preallocated buffer on its own clone of the device fd and answers with one writev; `disk`
is opened with direct I/O and parallel direct writes. With the compiled zblock.fuse._devread one
worker at a time reads the device and spins for its next request before it sleeps, the others
parked, until requests wait on I/O (zblock.fuse.readers, zblock.handoff).

What it serves is zblock.fuse_ops.ZblockOps, the same object the mfusepy path serves: paths,
errnos and block-device semantics live there, not here. This module only maps the protocol
onto it: node ids to paths, structs to arguments, results and OSErrors to replies.

Lifecycle: mount() (mount(2) with the device fd; root only), then serve() answers INIT on the
calling thread, starts the workers and returns when the connection ends: an unmount or an
abort makes every read fail with ENODEV. stop() (the daemon's signal handler) unmounts lazily
and aborts the connection, as libfuse does when a signal ends its loop.

With FUSE over io_uring (`uring_depth`, zblock.fuse.uring) the same handlers also serve the
requests of one ring a CPU, through `_answer`; one /dev/fuse worker stays for what the kernel
sends there (anything before every ring has registered, FORGET, INTERRUPT).

Node ids are fixed: the filesystem is one directory of files that never change (see _Nodes).
Lock protocol: none of its own after INIT; workers and rings share only read-only tables.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import threading

from .. import PAGE_SIZE, handoff, libc, pagemem
from ..extensions import optional
from ..runtime import abort_fuse_connection, find_mount
from . import protocol as p
from . import uring
from .readers import Readers

log = logging.getLogger("zblock.fuse")
_devread = optional("fuse._devread")

MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE >> 12
# With the compiled zblock.fuse._devread one worker at a time reads the device while no request
# waits on I/O, and polls it for SPIN_NS after answering a READ before it sleeps in read(2):
# waking a sleeping worker costs about 20 us here, and the swap hog's next swap-in comes 35-70 us
# after the last one's answer. Not after a WRITE: its pages are compressed on the other core
# meanwhile (spinning there cost dd 7% of its write speed). The others are parked, and all read
# once requests wait on the disk or the network (zblock.fuse.readers).
SPIN_NS = 100_000
# Workers: when all read the device (without the compiled reader, or while requests wait on
# I/O), each one more waits on the device and on the GIL, and costs CPU per request (fio 2 jobs,
# 4 KiB: 2 workers 12.5 us a read, 4 workers 16-24 us), but swap's loop device keeps many
# requests in flight: there four ran the hog 5-10% faster than two (tenth session).
DEFAULT_WORKERS = 2
SWAP_WORKERS = 4
# Request buffer: the largest WRITE (header, fuse_write_in, max_write bytes), with room to spare.
BUFFER_SIZE = MAX_WRITE + 4096
# Entries per io_uring queue (one queue per CPU): requests the kernel can hand over before the
# queue's thread answers; each has a max_write payload buffer, resident once used.
URING_DEPTH = 2
URING_SWAP_DEPTH = 4
RING_JOIN_S = 60                # a ring's thread answering a slow request (a long fsync) ends after it
# Entries and attributes are cached by the kernel this long: libfuse's high-level default.
TTL_S = 1
ROOT_ID = 1
_RETRY = (errno.ENOENT, errno.EINTR, errno.EAGAIN)
ARG = p.IN_HEADER.size                 # where a request's own struct starts
WRITE_DATA = ARG + p.WRITE_IN_SIZE     # where a WRITE's payload starts
# A /dev/fuse worker lends the Store a WRITE payload at least this large (the write-behind
# queue's minimum) instead of copying it, and reads its next request into a new buffer.
LEND_MIN = 64 << 10
_NO_REPLY = (p.FORGET, p.BATCH_FORGET, p.INTERRUPT)   # nothing of ours to forget or stop


class NativeError(OSError):
    pass


class _FileInfo:
    """What ZblockOps reads and sets on an open file (the fields of libfuse's fuse_file_info
    it uses), and whether the request's buffer may be lent: `lendable` for a /dev/fuse worker's
    buffers (not an io_uring entry's, which the kernel fills again), `lent` once a WRITE kept it."""

    __slots__ = ("fh", "flags", "direct_io", "parallel_direct_writes", "lendable", "lent")

    def __init__(self, fh: int = 0, flags: int = 0, lendable: bool = False):
        self.fh = fh
        self.flags = flags
        self.direct_io = 0
        self.parallel_direct_writes = 0
        self.lendable = lendable
        self.lent = False


# A bytearray whose bytes are not cleared: the C API's constructor given no bytes to copy.
_uncleared_bytearray = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_char_p, ctypes.c_ssize_t)(
    ("PyByteArray_FromStringAndSize", ctypes.pythonapi))


def _request_buffer() -> memoryview:
    """A request buffer placed so that a WRITE's payload starts on a page boundary: O_DIRECT
    writes it to the backing file as it is, without a bounce copy. Not zeroed: the kernel writes
    each request before it is read, and bytearray(n)'s clearing took a lent 64 KiB WRITE's new
    buffer from 2 to 18 us. Heap memory, not a mapping of its own: a new mapping's page faults
    cost a lent 1 MiB WRITE 350 us instead of 40."""
    buf = _uncleared_bytearray(None, BUFFER_SIZE + PAGE_SIZE)
    lead = -(pagemem.address(memoryview(buf)) + WRITE_DATA) % PAGE_SIZE
    return memoryview(buf)[lead:lead + BUFFER_SIZE]


class _Nodes:
    """Node id <-> path for the tree the ops serve, read once at start through their readdir
    and getattr (zblock's: /, /disk, /stats, /params, /params/*; nothing is ever created).
    LOOKUP of a name that is not there is ENOENT."""

    def __init__(self, ops):
        self.path = {ROOT_ID: "/"}
        self.children: dict[int, dict[bytes, int]] = {}
        self._walk(ops, ROOT_ID)

    def _walk(self, ops, node: int) -> None:
        self.children[node] = {}
        base = self.path[node].rstrip("/")
        for name in ops.readdir(self.path[node], 0):
            if name in (".", ".."):
                continue
            child = len(self.path) + 1
            self.path[child] = f"{base}/{name}"
            self.children[node][name.encode()] = child
            if stat.S_ISDIR(ops.getattr(self.path[child])["st_mode"]):
                self._walk(ops, child)

    def path_of(self, node: int) -> str:
        path = self.path.get(node)
        if path is None:
            raise OSError(errno.ENOENT, "no such node")
        return path

    def dir_entries(self, ops, node: int) -> list[tuple[bytes, int, int]]:
        """(name, node id or 0, DT_*) of a directory, in the ops' readdir order."""
        path = self.path_of(node)
        kids = self.children.get(node)
        if kids is None:
            raise OSError(errno.ENOTDIR, "not a directory")
        out = []
        for name in ops.readdir(path, 0):
            b = name.encode()
            child = kids.get(b, 0)
            if b in (b".", b".."):
                out.append((b, 0, p.DT_DIR))
            else:
                out.append((b, child, p.DT_DIR if child in self.children else p.DT_REG))
        return out


class NativeFuse:
    """One FUSE connection served by `workers` threads. See the module docstring."""

    def __init__(self, ops, mountpoint: str, *, fsname: str, read_only: bool = False,
                 allow_other: bool = True, workers: int = DEFAULT_WORKERS, on_init=None,
                 uring_depth: int = 0):
        self.ops = ops
        self.mountpoint = os.path.realpath(mountpoint)
        self.fsname = fsname
        self.read_only = read_only
        self.allow_other = allow_other
        self.workers = workers
        self.on_init = on_init
        # 0: /dev/fuse only; else FUSE over io_uring with this many entries a queue, if the
        # kernel offers it at INIT (zblock.fuse.uring)
        self.uring_depth = uring_depth
        self.rings: list[uring.UringQueue] = []
        self.nodes = _Nodes(ops)
        self.fd = -1
        self.info: dict = {"impl": "native"}
        self._stopping = threading.Event()
        self._handlers = {
            p.LOOKUP: self._lookup, p.GETATTR: self._getattr, p.SETATTR: self._setattr,
            p.OPEN: self._open, p.READ: self._read, p.WRITE: self._write, p.STATFS: self._statfs,
            p.RELEASE: self._release, p.FSYNC: self._fsync, p.FLUSH: self._ok,
            p.OPENDIR: self._opendir, p.READDIR: self._readdir, p.READDIRPLUS: self._readdirplus,
            p.RELEASEDIR: self._ok, p.FSYNCDIR: self._ok, p.ACCESS: self._ok,
            p.CREATE: self._create, p.FALLOCATE: self._fallocate, p.DESTROY: self._ok,
        }

    # ---- mount and stop -------------------------------------------------------------------

    def mount(self) -> None:
        """Open /dev/fuse and mount it on the mount point (mount(2): root only)."""
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        opts = f"fd={self.fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}"
        if self.allow_other:
            # as on the mfusepy path: root mounts serve loop devices and other users, and the
            # kernel checks the files' modes (default_permissions)
            opts += ",allow_other,default_permissions"
        flags = libc.MS_NOSUID | libc.MS_NODEV | (libc.MS_RDONLY if self.read_only else 0)
        try:
            libc.mount(self.fsname, self.mountpoint, "fuse.zblock", flags, opts)
        except OSError as e:
            os.close(self.fd)
            self.fd = -1
            raise NativeError(e.errno, f"mount {self.mountpoint}: {e.strerror}") from None

    def stop(self) -> None:
        """End the connection from inside (a signal): unmount lazily, then abort, so every
        worker's read fails with ENODEV. Safe to call more than once."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        entry = find_mount(self.mountpoint)
        try:
            libc.umount2(self.mountpoint, libc.MNT_DETACH)
        except OSError:
            pass                                # not mounted (any more): the abort still ends it
        if entry is not None and entry.fstype == "fuse.zblock":
            abort_fuse_connection(entry.minor)
        for q in self.rings:
            q.stop()

    # ---- the loop -------------------------------------------------------------------------

    def serve(self) -> None:
        """Answer INIT, then serve with the workers until the connection ends. The device fds
        are closed on every way out."""
        fds = [self.fd]
        try:
            buf = _request_buffer()
            while True:
                n = self._read_request(self.fd, buf)
                if n is None:
                    return                      # unmounted before INIT
                if n and p.IN_HEADER.unpack_from(buf)[1] == p.INIT:
                    self._init(self.fd, buf[:n])
                    break
                # nothing else may come before INIT; answer it anyway so nobody waits
                if n:
                    self._reply_error(self.fd, p.IN_HEADER.unpack_from(buf)[2], errno.EIO)
            if self.info.get("uring"):
                self._start_rings()
            # with the rings, /dev/fuse carries only what comes before they are all registered,
            # FORGET and INTERRUPT: one worker
            workers = 1 if self.rings else self.workers
            spin = _devread is not None and not self.rings
            self.info["workers"] = workers
            self.info["spin_us"] = SPIN_NS // 1000 if spin else 0
            readers = Readers(workers, spins=spin)
            fds += [self._clone() for _ in range(workers - 1)]
            threads = [threading.Thread(target=self._worker, args=(fd, readers), name=f"fuse-{i}",
                                        daemon=True) for i, fd in enumerate(fds)]
            for t in threads:
                t.start()
            if self.on_init is not None:
                self.on_init()
            for t in threads:
                t.join()
        finally:
            self._end_rings()                   # the connection has ended (or serve failed)
            for fd in fds:
                os.close(fd)
            self.fd = -1

    def counters(self) -> dict:
        """What moves while serving (the stats' fuse, beside what INIT agreed)."""
        return {"uring_requests": sum(q.served for q in self.rings)}

    def _start_rings(self) -> None:
        """One io_uring queue a CPU. If they cannot be set up, /dev/fuse serves everything: the
        kernel switches to the rings only once every queue has registered."""
        try:
            for qid in range(uring.queue_count()):
                self.rings.append(uring.UringQueue(self.fd, qid, self.uring_depth, MAX_WRITE,
                                                   self._answer, _FileInfo(), self.stop))
                self.rings[-1].start()
        except OSError as e:
            log.warning("FUSE over io_uring could not be set up (%s): serving on /dev/fuse", e)
            self._end_rings()
            self.info["uring"] = False

    def _end_rings(self) -> None:
        """Stop the rings' threads, then free their buffers, which the kernel may write into
        while a thread waits: a thread that does not end keeps its buffers mapped."""
        for q in self.rings:
            q.stop()
            q.thread.join(RING_JOIN_S)
            if q.thread.is_alive():
                log.error("FUSE ring %d did not end; its buffers stay mapped", q.qid)
            else:
                q.close()
        self.rings = []

    def _clone(self) -> int:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, p.FUSE_DEV_IOC_CLONE, struct.pack("I", self.fd))
        return fd

    @staticmethod
    def _read_request(fd: int, buf: bytearray) -> int | None:
        """One request into `buf` (before the workers run): its length, 0 for nothing (retry),
        None once the connection has ended."""
        try:
            return os.readv(fd, [buf])
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            if e.errno in _RETRY:
                return 0
            raise

    def _worker(self, fd: int, readers: Readers) -> None:
        """Read, dispatch, reply until the connection ends, while holding a reader's place
        (`readers`; where it spins, polling the device for SPIN_NS before sleeping on it)."""
        try:
            self._serve_requests(fd, readers)
        finally:
            readers.close()                     # the connection has ended: wake the parked

    def _serve_requests(self, fd: int, readers: Readers) -> None:
        """_worker's loop. Written flat: at 4 KiB, its own Python is a good part of a request's
        cost."""
        mv = _request_buffer()
        bufs = [mv]
        readv, writev = os.readv, os.writev
        spins = readers.spins
        spin_ns = SPIN_NS if spins else 0
        read_request = _devread.read_request if spins else None
        header, out_header = p.IN_HEAD.unpack_from, p.OUT_HEADER.pack
        answer = self._answer
        fi = _FileInfo(lendable=True)
        me, holders, take, hand_off = threading.get_ident(), readers.holders, readers.take, \
            readers.hand_off
        READ, WRITE, FSYNC = p.READ, p.WRITE, p.FSYNC
        disk = self.nodes.children[ROOT_ID].get(b"disk")
        spin_next = 0                           # after a READ only (see SPIN_NS)
        handoff.set_hook(hand_off)
        while True:
            if me not in holders or (spins and (readers.limit != 1 or len(holders) != 1)):
                take()                          # not the one reader going on: maybe park
            try:
                if spins and readers.limit == 1:
                    n = read_request(fd, mv, spin_next)
                else:
                    n = readv(fd, bufs)
            except OSError as e:
                if e.errno == errno.ENODEV:
                    return                      # unmounted or aborted
                if e.errno in _RETRY:
                    continue                    # the request went away before we read it
                raise
            if not n:
                return                          # end of file: the device never, a test's socket
            _, opcode, unique, node = header(mv)
            spin_next = spin_ns if opcode == READ else 0
            if opcode == FSYNC or (opcode == WRITE and node != disk):
                hand_off()                      # an fsync or a param write may wait long
            reply = answer(opcode, node, mv, n, fi)
            if fi.lent:                         # the Store keeps the payload: a new buffer
                fi.lent = False
                mv = _request_buffer()
                bufs = [mv]
            if reply is None:
                continue
            error, out = reply
            try:
                writev(fd, [out_header(16 + len(out), error, unique), out] if out else
                       [out_header(16, error, unique)])
            except OSError as e:
                # ENOENT: the request was interrupted or aborted meanwhile; ENODEV: the
                # connection ended. Either way nobody waits for this answer any more.
                if e.errno not in (errno.ENOENT, errno.ENODEV):
                    raise

    def _answer(self, opcode: int, node: int, mv, n: int, fi) -> tuple[int, bytes] | None:
        """(error, reply) of one request laid out as /dev/fuse delivers it; None for the
        requests that take no reply. Shared by the /dev/fuse workers and the io_uring queues."""
        handler = self._handlers.get(opcode)
        try:
            if handler is None:
                if opcode in _NO_REPLY:
                    return None
                raise OSError(errno.ENOSYS, "not implemented")
            return 0, handler(node, mv, n, fi)
        except OSError as e:
            return -(e.errno if isinstance(e.errno, int) and e.errno > 0 else errno.EIO), b""
        except Exception:
            log.exception("FUSE opcode %d failed", opcode)
            return -errno.EIO, b""

    def _reply_error(self, fd: int, unique: int, err: int) -> None:
        self._send(fd, p.OUT_HEADER.pack(p.OUT_HEADER.size, -err, unique))

    @staticmethod
    def _send(fd: int, reply: bytes) -> None:
        """A reply outside the workers' loop (which does the same inline)."""
        try:
            os.write(fd, reply)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    # ---- INIT -----------------------------------------------------------------------------

    def _init(self, fd: int, req: memoryview) -> None:
        unique = p.IN_HEADER.unpack_from(req)[2]
        major, minor, max_readahead, kflags, kflags2 = p.INIT_IN.unpack_from(req, p.IN_HEADER.size)
        if major != p.KERNEL_VERSION or minor < p.MIN_KERNEL_MINOR:
            log.error("FUSE protocol %d.%d is not supported (need %d.%d or later)", major, minor,
                      p.KERNEL_VERSION, p.MIN_KERNEL_MINOR)
            self._reply_error(fd, unique, errno.EPROTO)
            raise NativeError(errno.EPROTO, f"kernel FUSE protocol {major}.{minor} is too old")
        want = (p.FUSE_ASYNC_READ | p.FUSE_ATOMIC_O_TRUNC | p.FUSE_BIG_WRITES | p.FUSE_ASYNC_DIO
                | p.FUSE_PARALLEL_DIROPS | p.FUSE_MAX_PAGES)
        flags = want & kflags
        flags2 = 0
        use_uring = bool(self.uring_depth and kflags2 & p.FUSE_OVER_IO_URING)
        if use_uring:
            flags, flags2 = flags | p.FUSE_INIT_EXT, p.FUSE_OVER_IO_URING
        minor = min(minor, p.KERNEL_MINOR)
        readahead = min(max_readahead, MAX_WRITE)
        out = p.INIT_OUT.pack(p.KERNEL_VERSION, minor, readahead, flags, 0, 0, MAX_WRITE, 1,
                              MAX_PAGES, 0, flags2, 0)
        self._send(fd, p.OUT_HEADER.pack(p.OUT_HEADER.size + len(out), 0, unique) + out)
        self.info = {"impl": "native", "protocol": f"{p.KERNEL_VERSION}.{minor}",
                     "max_write": MAX_WRITE, "max_pages": MAX_PAGES if flags & p.FUSE_MAX_PAGES else 32,
                     "max_readahead": readahead, "workers": self.workers,
                     "uring": {"queues": uring.queue_count(), "depth": self.uring_depth}
                     if use_uring else False,
                     "flags": sorted(name for bit, name in p.INIT_FLAG_NAMES.items() if flags & bit)}
        log.info("FUSE %d.%d: %s", p.KERNEL_VERSION, minor, self.info)

    # ---- metadata -------------------------------------------------------------------------

    def _path(self, node: int) -> str:
        return self.nodes.path_of(node)

    def _attr(self, node: int) -> bytes:
        """fuse_attr of a node from the ops' getattr (fusepy's st_* dict, times in ns)."""
        a = self.ops.getattr(self._path(node))
        size = a.get("st_size", 0)
        ns = (a.get("st_atime", 0), a.get("st_mtime", 0), a.get("st_ctime", 0))
        return p.ATTR.pack(node, size, a.get("st_blocks", (size + 511) // 512),
                           *(t // 10**9 for t in ns), *(t % 10**9 for t in ns), a["st_mode"],
                           a.get("st_nlink", 1), a.get("st_uid", 0), a.get("st_gid", 0), 0,
                           a.get("st_blksize", 4096), 0)

    def _entry(self, node: int) -> bytes:
        return p.ENTRY_OUT_HEAD.pack(node, 0, TTL_S, TTL_S, 0, 0) + self._attr(node)

    def _lookup(self, node, mv, n, fi):
        name = bytes(mv[ARG:n]).split(b"\0", 1)[0]
        child = self.nodes.children.get(node, {}).get(name)
        if child is None:
            raise OSError(errno.ENOENT, "no such file")
        return self._entry(child)

    def _getattr(self, node, mv, n, fi):
        return p.ATTR_OUT_HEAD.pack(TTL_S, 0, 0) + self._attr(node)

    def _setattr(self, node, mv, n, fi):
        valid, _, _, size = p.SETATTR_IN.unpack_from(mv, ARG)
        path = self._path(node)
        if valid & (p.FATTR_MODE | p.FATTR_UID | p.FATTR_GID):
            raise OSError(errno.EROFS, "modes and owners are fixed")    # as mfusepy's chmod/chown
        if valid & p.FATTR_SIZE:
            self.ops.truncate(path, size)
        return p.ATTR_OUT_HEAD.pack(TTL_S, 0, 0) + self._attr(node)

    def _statfs(self, node, mv, n, fi):
        s = self.ops.statfs("/")
        return p.KSTATFS.pack(*(s.get(k, 0) for k in ("f_blocks", "f_bfree", "f_bavail", "f_files",
                                                      "f_ffree", "f_bsize", "f_namemax", "f_frsize")))

    # ---- open and release -----------------------------------------------------------------

    def _open(self, node, mv, n, fi):
        flags, _ = p.OPEN_IN.unpack_from(mv, ARG)
        f = _FileInfo(flags=flags)
        self.ops.open(self._path(node), f)
        oflags = p.FOPEN_DIRECT_IO if f.direct_io else 0
        if f.direct_io and f.parallel_direct_writes:
            oflags |= p.FOPEN_PARALLEL_DIRECT_WRITES
        return p.OPEN_OUT.pack(f.fh, oflags, 0)

    def _create(self, node, mv, n, fi):
        name = bytes(mv[ARG + 16:n]).split(b"\0", 1)[0].decode(errors="replace")
        self.ops.create(self._path(node).rstrip("/") + "/" + name, 0)
        raise OSError(errno.EACCES, "no new files")

    def _opendir(self, node, mv, n, fi):
        self._path(node)
        return p.OPEN_OUT.pack(0, 0, 0)

    def _release(self, node, mv, n, fi):
        fi.fh, fi.flags, _ = p.RELEASE_IN.unpack_from(mv, ARG)
        self.ops.release(self._path(node), fi)
        return b""

    # ---- data -----------------------------------------------------------------------------

    def _read(self, node, mv, n, fi):
        fi.fh, offset, size, _ = p.READ_IN.unpack_from(mv, ARG)
        return self.ops.read(self.nodes.path.get(node), size, offset, fi)

    def _write(self, node, mv, n, fi):
        fi.fh, offset, size, _ = p.WRITE_IN.unpack_from(mv, ARG)
        # the Store may queue the data (write-behind): lent read-only (the worker moves on to a
        # new buffer), or copied
        payload = mv[WRITE_DATA:WRITE_DATA + size]
        if fi.lendable and size >= LEND_MIN:
            data = payload.toreadonly()
            fi.lent = True
        else:
            data = bytes(payload)
        n = self.ops.write(self.nodes.path.get(node), data, offset, fi)
        return p.WRITE_OUT.pack(n, 0)

    def _fsync(self, node, mv, n, fi):
        fi.fh, fsync_flags, _ = p.FSYNC_IN.unpack_from(mv, ARG)
        self.ops.fsync(self._path(node), fsync_flags & p.FSYNC_FDATASYNC, fi)
        return b""

    def _fallocate(self, node, mv, n, fi):
        fi.fh, offset, length, mode = p.FALLOCATE_IN.unpack_from(mv, ARG)
        self.ops.fallocate(self._path(node), mode, offset, length, fi)
        return b""

    @staticmethod
    def _ok(node, mv, n, fi):
        return b""

    # ---- directories ----------------------------------------------------------------------

    def _readdir(self, node, mv, n, fi, plus: bool = False):
        _, offset, size, _ = p.READ_IN.unpack_from(mv, ARG)
        parts, used = [], 0
        entries = self.nodes.dir_entries(self.ops, node)
        for i in range(offset, len(entries)):
            name, child, kind = entries[i]
            ent = p.DIRENT_HEAD.pack(child or ROOT_ID, i + 1, len(name), kind) + name
            ent += b"\0" * (p.dirent_size(name) - len(ent))
            if plus:
                # "." and ".." carry no entry (the kernel skips them); the others their own
                head = self._entry(child) if child else bytes(p.ENTRY_OUT_HEAD.size + p.ATTR.size)
                ent = head + ent
            if used + len(ent) > size:
                break
            parts.append(ent)
            used += len(ent)
        return b"".join(parts)

    def _readdirplus(self, node, mv, n, fi):
        return self._readdir(node, mv, n, fi, plus=True)
