"""FUSE over io_uring (Linux 6.14+): the native front end's requests through per-CPU rings.

Why: on /dev/fuse every request costs the server a read and a write system call, and the
kernel wakes whichever worker waits. With FUSE over io_uring the kernel keeps one queue per
CPU; a request goes to the queue of the CPU that issued it, into a buffer the server registered
beforehand, and the server's answer and its fetch of the next request are one io_uring entry
(COMMIT_AND_FETCH): one system call per batch of requests, on the requester's own CPU.

How, in the kernel's terms (fs/fuse/dev_uring.c, Documentation/filesystems/fuse-io-uring.rst):
  * INIT agrees on FUSE_OVER_IO_URING (the kernel offers it when the admin has set
    /sys/module/fuse/parameters/enable_uring).
  * Each queue (one per possible CPU) is served by one thread pinned to that CPU, with an
    io_uring of its own (128-byte SQEs). The thread REGISTERs `depth` entries: a header buffer
    (fuse_uring_req_header: the in/out header, the op's own struct, the entry's in_out) and a
    payload buffer of max_pages pages (what follows the op's struct: a name, a write's data).
  * Once every queue has an entry the kernel switches over; until then, and for FORGET and
    INTERRUPT always, requests still arrive on /dev/fuse, so the caller keeps a worker there.
  * A completion (CQE) is a request in that entry's buffers. The answer is written back into
    the same buffers and sent with COMMIT_AND_FETCH, which hands the entry back for the next one.
  * An unmount or abort completes the entries with ENOTCONN; stop() wakes the threads through
    an eventfd polled on each ring, as libfuse does.

The ring itself is driven with the raw system calls (io_uring_setup/enter/register) through
ctypes and the mmap module: liburing's SQE helpers are inline functions a binding cannot reach
in Debian 12's liburing 2.3, and what is needed here is a few stores into the mapped rings.
ctypes releases the GIL while a thread waits in io_uring_enter.

Requests are handed to the caller's `answer(opcode, node, request, length, file_info)` laid out
as on /dev/fuse (room for fuse_in_header, the op's struct, the rest), so both paths share every
handler; the header's fields a handler needs come as arguments, and its bytes are not copied.

Lock protocol: none. Each queue's ring and buffers belong to its one thread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import platform
import struct
import threading

from ..libc import syscall as _syscall
from . import protocol as p

log = logging.getLogger("zblock.fuse")

ENABLE_PARAM = "/sys/module/fuse/parameters/enable_uring"

# io_uring's system call numbers: the same on every architecture (they came after 5.1 unified
# the numbering of new calls)
_SYS_IO_URING_SETUP, _SYS_IO_URING_ENTER, _SYS_IO_URING_REGISTER = 425, 426, 427

IORING_SETUP_CQSIZE = 1 << 3
IORING_SETUP_SUBMIT_ALL = 1 << 7            # a command that fails does not hold back the next
IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_SINGLE_ISSUER = 1 << 12
IORING_SETUP_DEFER_TASKRUN = 1 << 13
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_OFF_SQ_RING, IORING_OFF_CQ_RING, IORING_OFF_SQES = 0, 0x8000000, 0x10000000
IORING_ENTER_GETEVENTS = 1
IORING_REGISTER_FILES = 2
IORING_OP_POLL_ADD = 6
IORING_OP_URING_CMD = 46
IOSQE_FIXED_FILE = 1
POLLIN = 0x001

FUSE_IO_URING_CMD_REGISTER = 1
FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2

SQE_SIZE = 128                              # IORING_SETUP_SQE128: room for fuse_uring_cmd_req
CQE = struct.Struct("<QiI")                 # user_data res flags
# io_uring_params: sq_entries cq_entries flags sq_thread_cpu sq_thread_idle features wq_fd
# resv[3], then io_sqring_offsets and io_cqring_offsets (8 u32 + one u64 each)
PARAMS = struct.Struct("<7I3I" + "8IQ" + "8IQ")
# the SQE fields set here: opcode flags ioprio fd | cmd_op pad | addr | len op_flags | user_data
SQE_HEAD = struct.Struct("<BBHiIIQIIQ")
CMD_AT = 48                                 # fuse_uring_cmd_req in the SQE: flags commit_id qid
CMD_REQ = struct.Struct("<QQH6x")
COMMIT_ID_AT = CMD_AT + 8
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

# fuse_uring_req_header: in_out[128] op_in[128] fuse_uring_ent_in_out
HEADER_IN_OUT, HEADER_OP_IN, HEADER_ENT = 0, 128, 256
ENT_IN_OUT = struct.Struct("<QQII8x")       # flags commit_id payload_sz padding reserved
HEADER_SIZE = 4096                          # page-aligned: the kernel pins it
STOP = (1 << 64) - 1                        # user_data of the eventfd poll


def unavailable() -> str | None:
    """Why FUSE over io_uring cannot serve here, or None: the admin allows it (the fuse module's
    enable_uring) on a machine whose memory order the rings' plain stores rely on."""
    if platform.machine() != "x86_64" or mmap.PAGESIZE != 4096:
        return "zblock drives io_uring on x86-64 with 4 KiB pages only"
    try:
        with open(ENABLE_PARAM) as f:
            if f.read().strip() in ("Y", "1"):
                return None
    except OSError:
        pass                                # a kernel without it (before 6.14) or no fuse module
    return f"not enabled in this kernel (Linux 6.14 or later; as root: echo Y > {ENABLE_PARAM})"


def queue_count() -> int:
    """The kernel makes one queue per possible CPU, and uses none until each has an entry."""
    with open("/sys/devices/system/cpu/possible") as f:
        count = 0
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
    return count


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def address(buf) -> int:
    """The address of a writable buffer (an mmap); the export ends with the expression."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def sqe(opcode: int, fd: int, user_data: int, *, flags: int = 0, cmd_op: int = 0, addr: int = 0,
        length: int = 0, op_flags: int = 0, cmd: bytes = b"") -> bytearray:
    """One 128-byte SQE, every field not named zero."""
    out = bytearray(SQE_SIZE)
    SQE_HEAD.pack_into(out, 0, opcode, flags, 0, fd, cmd_op, 0, addr, length, op_flags, user_data)
    out[CMD_AT:CMD_AT + len(cmd)] = cmd
    return out


class Ring:
    """One io_uring with 128-byte SQEs, as much of it as a FUSE queue needs.

    Each SQE slot belongs to one user (a ring entry, the eventfd poll) for the ring's life:
    set() writes a slot, submit(slot) puts it on the submission queue through the SQ array,
    so sending an entry's next command rewrites only what changed (its commit id)."""

    def __init__(self, slots: int, flags: int = 0):
        params = bytearray(PARAMS.size)
        struct.pack_into("<II", params, 4, 2 * slots, IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE
                         | IORING_SETUP_SUBMIT_ALL | flags)
        arg = (ctypes.c_char * len(params)).from_buffer(params)
        ret = _syscall(_SYS_IO_URING_SETUP, slots, ctypes.addressof(arg), 0, 0, 0, 0)
        del arg
        self.fd = _check(ret, "io_uring_setup")
        try:
            f = PARAMS.unpack(params)
            sq_entries, cq_entries, features = f[0], f[1], f[5]
            sq_head, sq_tail, sq_mask, sq_array = f[10], f[11], f[12], f[16]
            cq_head, cq_tail, cq_mask, cqes = f[19], f[20], f[21], f[24]
            sq_size = sq_array + 4 * sq_entries
            cq_size = cqes + CQE.size * cq_entries
            single = features & IORING_FEAT_SINGLE_MMAP
            if single:
                sq_size = cq_size = max(sq_size, cq_size)
            self._sq = mmap.mmap(self.fd, sq_size, offset=IORING_OFF_SQ_RING)
            self._cq = self._sq if single else \
                mmap.mmap(self.fd, cq_size, offset=IORING_OFF_CQ_RING)
            self.sqes = mmap.mmap(self.fd, SQE_SIZE * sq_entries, offset=IORING_OFF_SQES)
        except BaseException:
            os.close(self.fd)
            raise
        self._sq_mask = U32.unpack_from(self._sq, sq_mask)[0]
        self._cq_mask = U32.unpack_from(self._cq, cq_mask)[0]
        self._sq_head_at, self._sq_tail_at, self._sq_array_at = sq_head, sq_tail, sq_array
        self._cq_head_at, self._cq_tail_at, self._cqes_at = cq_head, cq_tail, cqes
        self._tail = U32.unpack_from(self._sq, sq_tail)[0]

    def register_file(self, fd: int) -> None:
        """Register `fd` as fixed file 0 (the kernel then skips a file lookup per SQE)."""
        arr = (ctypes.c_int * 1)(fd)
        _check(_syscall(_SYS_IO_URING_REGISTER, self.fd, IORING_REGISTER_FILES,
                        ctypes.addressof(arr), 1, 0, 0), "io_uring_register")

    def set(self, slot: int, entry: bytes) -> None:
        """Write SQE slot `slot` (only while the kernel holds nothing submitted from it)."""
        self.sqes[slot * SQE_SIZE:(slot + 1) * SQE_SIZE] = entry

    def submit(self, slot: int) -> None:
        """Put slot `slot` on the submission queue; the kernel takes it at the next wait()."""
        sq, tail = self._sq, self._tail
        U32.pack_into(sq, self._sq_array_at + 4 * (tail & self._sq_mask), slot)
        self._tail = tail = (tail + 1) & 0xFFFFFFFF
        # x86 keeps stores in order: the slot is written before the kernel can see the new tail
        U32.pack_into(sq, self._sq_tail_at, tail)

    def wait(self, at_least: int = 1) -> list[tuple[int, int]]:
        """Submit what is queued, wait for `at_least` completions (GIL released), and return
        every completion ready as (user_data, res), consumed."""
        while True:
            # what the kernel has not taken yet (all of it, but after an interrupted call)
            todo = (self._tail - U32.unpack_from(self._sq, self._sq_head_at)[0]) & 0xFFFFFFFF
            if _syscall(_SYS_IO_URING_ENTER, self.fd, todo, at_least, IORING_ENTER_GETEVENTS,
                        0, 0, 0) >= 0:
                break
            err = ctypes.get_errno()
            if err not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
        cq = self._cq
        head = U32.unpack_from(cq, self._cq_head_at)[0]
        tail = U32.unpack_from(cq, self._cq_tail_at)[0]
        out = []
        while head != tail:
            at = self._cqes_at + (head & self._cq_mask) * CQE.size
            user_data, res, _ = CQE.unpack_from(cq, at)
            out.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        U32.pack_into(cq, self._cq_head_at, head)
        return out

    def close(self) -> None:
        for m in {id(x): x for x in (self.sqes, self._cq, self._sq)}.values():
            m.close()
        os.close(self.fd)


class _Entry:
    """One registered ring entry: its header page, and a request buffer whose second page on is
    the payload the kernel fills. The handlers get the request laid out as /dev/fuse delivers
    it (in_header, the op's struct, the payload): the op's struct is copied in just before the
    payload, so the payload never moves. Its SQE slot is its index."""

    __slots__ = ("header", "request", "view", "iov", "register", "commit", "committing")

    def __init__(self, index: int, qid: int, payload_size: int):
        self.header = mmap.mmap(-1, HEADER_SIZE)
        self.request = mmap.mmap(-1, HEADER_SIZE + payload_size)
        self.view = memoryview(self.request)
        self.iov = (ctypes.c_uint64 * 4)(address(self.header), HEADER_SIZE,
                                         address(self.request) + HEADER_SIZE, payload_size)
        self.register = sqe(IORING_OP_URING_CMD, 0, index, flags=IOSQE_FIXED_FILE,
                            cmd_op=FUSE_IO_URING_CMD_REGISTER, addr=ctypes.addressof(self.iov),
                            length=2, cmd=CMD_REQ.pack(0, 0, qid))
        # the answer to a request and the fetch of the next: the commit id is set per request
        self.commit = sqe(IORING_OP_URING_CMD, 0, index, flags=IOSQE_FIXED_FILE,
                          cmd_op=FUSE_IO_URING_CMD_COMMIT_AND_FETCH, cmd=CMD_REQ.pack(0, 0, qid))
        self.committing = False

    def close(self) -> None:
        self.view.release()
        self.header.close()
        self.request.close()


class UringQueue:
    """The thread serving one CPU's queue.

    `answer(opcode, node, request, length, file_info)` is the /dev/fuse loop's: it returns
    (error, reply bytes), or None for a request without a reply (the kernel sends none of those
    through the ring). `file_info` is this thread's own, as each /dev/fuse worker has one."""

    def __init__(self, dev_fd: int, qid: int, depth: int, payload_size: int, answer, file_info,
                 on_failure=None):
        """`on_failure()` runs if the thread ends with an error once serving: the kernel would
        keep sending this CPU's requests to a queue nobody answers, so the caller ends the
        connection instead."""
        self.dev_fd = dev_fd
        self.on_failure = on_failure
        self.qid = qid
        self.answer = answer
        self.file_info = file_info
        self.payload_size = payload_size
        self.ring: Ring | None = None
        self.entries = [_Entry(i, qid, payload_size) for i in range(depth)]
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.error: BaseException | None = None
        self.served = 0                     # requests answered (the stats' fuse.uring_requests)
        self._set_up = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"fuse-ring-{qid}", daemon=True)

    def start(self) -> None:
        """Start the thread; raises what kept it from setting up its ring."""
        self.thread.start()
        self._set_up.wait()
        if self.error is not None:
            self.thread.join()
            raise self.error

    def stop(self) -> None:
        """Wake the thread to end (an unmount ends it too, with ENOTCONN)."""
        if self.stop_fd >= 0:
            try:
                os.eventfd_write(self.stop_fd, 1)
            except OSError:
                pass

    def close(self) -> None:
        """After the thread ended: the ring first (closing it cancels the commands the kernel
        still holds, which point into the entries' buffers), then the buffers."""
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        for e in self.entries:
            e.close()
        self.entries = []
        fd, self.stop_fd = self.stop_fd, -1     # stop() from a signal must not see a closed fd
        if fd >= 0:
            os.close(fd)

    def _run(self) -> None:
        try:
            # the kernel queues a CPU's requests here: answering on that CPU keeps them local
            os.sched_setaffinity(0, {self.qid})
        except OSError:
            pass                            # a CPU this process may not use: served anyway
        try:
            # made here: a single-issuer ring belongs to the thread that creates it, and with
            # deferred task work the kernel hands requests over only when this thread waits
            ring = self.ring = Ring(len(self.entries) + 1,     # + the eventfd poll
                                    IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN)
            ring.register_file(self.dev_fd)
            stop_slot = len(self.entries)
            ring.set(stop_slot, sqe(IORING_OP_POLL_ADD, self.stop_fd, STOP, op_flags=POLLIN))
            ring.submit(stop_slot)
            for slot, e in enumerate(self.entries):
                ring.set(slot, e.register)
                ring.submit(slot)
            # the registrations go in now: one the kernel refuses completes at once with its
            # error; a request may complete one too, once every queue has registered
            first = ring.wait(at_least=0)
            for slot, res in first:
                if res < 0:
                    raise OSError(-res, f"FUSE ring {self.qid}: register: {os.strerror(-res)}")
        except BaseException as e:          # noqa: BLE001 - start() raises it
            self.error = e
            return
        finally:
            self._set_up.set()
        try:
            self._serve(first)
        except BaseException as e:          # noqa: BLE001 - the caller ends the connection
            self.error = e
            log.error("FUSE ring %d failed, ending the connection: %s", self.qid, e)
            if self.on_failure is not None:
                self.on_failure()

    def _serve(self, first: list[tuple[int, int]]) -> None:
        """Wait, answer every request that came, commit the answers with the next wait. Written
        flat, as the /dev/fuse loop is: at 4 KiB this Python is a good part of a request."""
        ring, entries, answer, fi = self.ring, self.entries, self.answer, self.file_info
        submit, sqes, pack_commit_id = ring.submit, ring.sqes, U64.pack_into
        ent_unpack, ent_pack = ENT_IN_OUT.unpack_from, ENT_IN_OUT.pack_into
        in_head, out_header = p.IN_HEAD.unpack_from, p.OUT_HEADER.pack_into
        head_size, out_size, limit = p.IN_HEADER.size, p.OUT_HEADER.size, self.payload_size
        done = first
        while True:
            for slot, res in done:
                if slot == STOP:
                    return
                e = entries[slot]
                if res < 0:
                    if -res in (errno.EINTR, errno.EAGAIN):
                        submit(slot)        # the same command once more
                        continue
                    if -res in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV):
                        return              # unmounted or aborted
                    raise OSError(-res, f"FUSE ring {self.qid}: {os.strerror(-res)}")
                header, view = e.header, e.view
                _, commit_id, payload_sz = ent_unpack(header, HEADER_ENT)[:3]
                length, opcode, unique, node = in_head(header, HEADER_IN_OUT)
                # the handlers read the op's struct at its /dev/fuse offset (not the in_header)
                op_size = length - head_size - payload_sz
                if op_size:
                    view[HEADER_SIZE - op_size:HEADER_SIZE] = \
                        header[HEADER_OP_IN:HEADER_OP_IN + op_size]
                error, out = answer(opcode, node, view[HEADER_SIZE - head_size - op_size:], length,
                                    fi) or (0, b"")
                n = len(out)
                if n > limit:
                    error, n = -errno.EIO, 0
                elif n:
                    view[HEADER_SIZE:HEADER_SIZE + n] = out
                out_header(header, HEADER_IN_OUT, out_size + n, error, unique)
                ent_pack(header, HEADER_ENT, 0, commit_id, n, 0)
                if not e.committing:
                    ring.set(slot, e.commit)
                    e.committing = True
                pack_commit_id(sqes, slot * SQE_SIZE + COMMIT_ID_AT, commit_id)
                submit(slot)
                self.served += 1
            done = ring.wait()
