"""The native front end's protocol without a mount: a worker loop served over a SOCK_SEQPACKET
socket pair (one message per request and per reply, as /dev/fuse gives), in front of a real
Store. What the kernel would send is packed here with zblock.fuse.protocol's structs; replies
are checked field by field. Real mounts: tests/test_mount.py (native, fuse3, fuse2)."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import threading
import time

import pytest

from zblock.config import Config
from zblock.fuse import protocol as p
from zblock.disk import _page_aligned
from zblock.fuse import native
from zblock.fuse.native import ARG, BUFFER_SIZE, LEND_MIN, MAX_WRITE, NativeError, NativeFuse
from zblock.fuse import readers as readers_module
from zblock.fuse.readers import Readers
from zblock.fuse_ops import ZblockOps
from zblock.store import Store

SIZE = 4 << 20
OUT = p.OUT_HEADER.size
GETXATTR_IN = struct.Struct("<II")       # size padding, then the name


class Kernel:
    """The kernel's side of the socket: send a request, read its reply."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.unique = 0

    def send(self, opcode: int, node: int, arg: bytes = b"") -> int:
        self.unique += 2
        hdr = p.IN_HEADER.pack(ARG + len(arg), opcode, self.unique, node, 0, 0, 0, 0, 0)
        self.sock.send(hdr + arg)
        return self.unique

    def reply(self) -> tuple[int, int, bytes]:
        """(unique, errno, body) of the next reply."""
        msg = self.sock.recv(BUFFER_SIZE)
        length, err, unique = p.OUT_HEADER.unpack_from(msg)
        assert length == len(msg)
        return unique, -err, msg[OUT:]

    def call(self, opcode: int, node: int, arg: bytes = b"") -> tuple[int, bytes]:
        unique = self.send(opcode, node, arg)
        got, err, body = self.reply()
        assert got == unique
        return err, body


SPINS = native._devread is not None     # the compiled reader: one worker reads, spinning


def serve(session: NativeFuse, fd: int, workers: int,
          readers: Readers | None = None) -> list[threading.Thread]:
    """`workers` worker loops on the socket `fd`, as NativeFuse.serve starts them on the device."""
    readers = readers or Readers(workers, spins=SPINS)
    threads = [threading.Thread(target=session._worker, args=(fd, readers), daemon=True)
               for _ in range(workers)]
    for t in threads:
        t.start()
    return threads


@pytest.fixture
def served(tmp_path):
    store = Store.open(str(tmp_path / "b.img"), SIZE, Config(pool_limit=8 << 20))
    session = NativeFuse(ZblockOps(store), str(tmp_path), fsname="test")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    workers = serve(session, ours.fileno(), 1)
    try:
        yield session, Kernel(theirs)
    finally:
        theirs.close()                  # end of file: the worker returns
        for w in workers:
            w.join(timeout=10)
        ours.close()
        store.close()
    assert not any(w.is_alive() for w in workers)


def lookup(k: Kernel, parent: int, name: str) -> tuple[int, tuple]:
    err, body = k.call(p.LOOKUP, parent, name.encode() + b"\0")
    assert err == 0, os.strerror(err)
    node = p.ENTRY_OUT_HEAD.unpack_from(body)[0]
    return node, p.ATTR.unpack_from(body, p.ENTRY_OUT_HEAD.size)


def open_file(k: Kernel, node: int, flags: int = os.O_RDWR) -> tuple[int, int]:
    err, body = k.call(p.OPEN, node, p.OPEN_IN.pack(flags, 0))
    assert err == 0, os.strerror(err)
    fh, open_flags, _ = p.OPEN_OUT.unpack_from(body)
    return fh, open_flags


def read_in(fh: int, offset: int, size: int) -> bytes:
    return p.READ_IN.pack(fh, offset, size, 0) + bytes(16)


def write_in(fh: int, offset: int, data: bytes) -> bytes:
    return p.WRITE_IN.pack(fh, offset, len(data), 0) + bytes(16) + data


@pytest.mark.timeout(60)
def test_lookup_getattr_and_open_flags(served):
    _, k = served
    disk, attr = lookup(k, 1, "disk")
    assert attr[0] == disk and attr[1] == SIZE and stat.S_ISREG(attr[9]) and attr[9] & 0o777 == 0o600
    assert k.call(p.LOOKUP, 1, b"nope\0")[0] == errno.ENOENT
    err, body = k.call(p.GETATTR, disk, bytes(16))
    assert err == 0 and p.ATTR.unpack_from(body, p.ATTR_OUT_HEAD.size)[1] == SIZE
    _, flags = open_file(k, disk)
    assert flags == p.FOPEN_DIRECT_IO | p.FOPEN_PARALLEL_DIRECT_WRITES
    params, _ = lookup(k, 1, "params")
    compressor, _ = lookup(k, params, "compressor")
    fh, flags = open_file(k, compressor, os.O_RDONLY)
    assert flags == p.FOPEN_DIRECT_IO          # parallel writes for the disk only
    err, body = k.call(p.READ, compressor, read_in(fh, 0, 4096))
    assert (err, body) == (0, b"lz4\n")
    assert k.call(p.RELEASE, compressor, p.RELEASE_IN.pack(fh, 0, 0) + bytes(8))[0] == 0


@pytest.mark.timeout(60)
def test_write_read_and_discard_through_the_protocol(served):
    _, k = served
    disk, _ = lookup(k, 1, "disk")
    fh, _ = open_file(k, disk)
    data = os.urandom(3000) + b"zblock " * 1000
    err, body = k.call(p.WRITE, disk, write_in(fh, 4096 + 100, data))
    assert err == 0 and p.WRITE_OUT.unpack_from(body)[0] == len(data)
    err, body = k.call(p.READ, disk, read_in(fh, 4096, 4096 * 3))
    assert err == 0 and body == bytes(100) + data + bytes(4096 * 3 - 100 - len(data))
    # zero-range with KEEP_SIZE: zeros; an unsupported mode: EOPNOTSUPP, never ENOSYS
    err, _ = k.call(p.FALLOCATE, disk, p.FALLOCATE_IN.pack(fh, 4096, 8192, 0x10 | 0x01) + bytes(4))
    assert err == 0
    assert k.call(p.READ, disk, read_in(fh, 4096, 8192))[1] == bytes(8192)
    err, _ = k.call(p.FALLOCATE, disk, p.FALLOCATE_IN.pack(fh, 0, 4096, 0x08) + bytes(4))
    assert err == errno.EOPNOTSUPP
    assert k.call(p.FSYNC, disk, p.FSYNC_IN.pack(fh, 0, 0))[0] == 0
    # a write at the end of the disk: ENOSPC, as a block device
    assert k.call(p.WRITE, disk, write_in(fh, SIZE, b"x"))[0] == errno.ENOSPC


@pytest.mark.timeout(60)
def test_a_large_write_is_lent_and_the_worker_reads_on_into_another_buffer(served):
    """A WRITE of LEND_MIN or more reaches the Store as a read-only view of the request buffer,
    its payload page-aligned for O_DIRECT; the worker reads the next request into another
    buffer, so a payload the write-behind queue still holds is never overwritten. Smaller
    writes are copied."""
    session, k = served
    store = session.ops.store
    seen = []
    write = store.write
    store.write = lambda offset, data: (seen.append((data, bytes(data))), write(offset, data))[1]
    disk, _ = lookup(k, 1, "disk")
    fh, _ = open_file(k, disk)
    blocks = [os.urandom(LEND_MIN), os.urandom(2 * LEND_MIN), os.urandom(LEND_MIN), b"small" * 100]
    for i, block in enumerate(blocks):
        assert k.call(p.WRITE, disk, write_in(fh, i << 18, block))[0] == 0
    for (data, as_written), block in zip(seen[:3], blocks):
        assert type(data) is memoryview and data.readonly and _page_aligned(data)
        assert as_written == block and bytes(data) == block     # unchanged by later requests
    assert type(seen[3][0]) is bytes
    for i, block in enumerate(blocks):
        assert k.call(p.READ, disk, read_in(fh, i << 18, len(block)))[1] == block


@pytest.mark.timeout(60)
def test_unknown_opcodes_and_requests_without_replies(served):
    _, k = served
    assert k.call(p.GETXATTR, 1, GETXATTR_IN.pack(0, 0) + b"security.capability\0")[0] == errno.ENOSYS
    assert k.call(999, 1)[0] == errno.ENOSYS
    # FORGET and INTERRUPT get no reply: the next reply is the GETATTR's
    k.send(p.FORGET, 2, struct.pack("<Q", 1))
    k.send(p.INTERRUPT, 0, struct.pack("<Q", 1))
    unique = k.send(p.GETATTR, 1, bytes(16))
    assert k.reply()[:2] == (unique, 0)


@pytest.mark.timeout(60)
def test_readdir_pages_through_offsets(served):
    session, k = served
    names, offset = [], 0
    while True:
        err, body = k.call(p.READDIR, 1, read_in(0, offset, 80))    # room for about two entries
        assert err == 0
        if not body:
            break
        pos = 0
        while pos < len(body):
            ino, off, namelen, _ = p.DIRENT_HEAD.unpack_from(body, pos)
            names.append(body[pos + p.DIRENT_HEAD.size:pos + p.DIRENT_HEAD.size + namelen].decode())
            pos += p.dirent_size(names[-1].encode())
            offset = off
    assert names == [".", "..", "disk", "stats", "params"]
    params = session.nodes.children[1][b"params"]
    assert k.call(p.READDIR, session.nodes.children[1][b"disk"], read_in(0, 0, 4096))[0] == errno.ENOTDIR
    err, body = k.call(p.READDIRPLUS, params, read_in(0, 0, 1 << 16))
    assert err == 0 and b"compressor" in body


@pytest.mark.timeout(60)
def test_a_request_that_waits_lets_another_worker_answer_meanwhile(tmp_path):
    """An fsync stuck on the disk must not hold up reads: the parked workers go and read the
    device once it is about to wait (zblock.fuse.readers), and they all end with the connection."""
    store = Store.open(str(tmp_path / "b.img"), SIZE, Config(pool_limit=8 << 20))
    ops = ZblockOps(store)
    session = NativeFuse(ops, str(tmp_path), fsname="test")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    entered, release = threading.Event(), threading.Event()
    fsync = store.fsync

    def stuck_fsync():
        entered.set()
        assert release.wait(30)
        fsync()

    store.fsync = stuck_fsync
    workers = serve(session, ours.fileno(), 3)
    try:
        k = Kernel(theirs)
        theirs.settimeout(20)
        disk, _ = lookup(k, 1, "disk")
        fh, _ = open_file(k, disk)
        assert k.call(p.WRITE, disk, write_in(fh, 0, b"z" * 4096))[0] == 0
        stuck = k.send(p.FSYNC, disk, p.FSYNC_IN.pack(fh, 0, 0))
        assert entered.wait(20)
        err, body = k.call(p.READ, disk, read_in(fh, 0, 4096))      # answered by another worker
        assert err == 0 and body == b"z" * 4096
        release.set()
        assert k.reply()[:2] == (stuck, 0)
    finally:
        release.set()
        theirs.close()                  # end of file: the reading worker returns, the parked too
        for w in workers:
            w.join(timeout=10)
        ours.close()
        store.close()
    assert not any(w.is_alive() for w in workers)


@pytest.mark.skipif(not SPINS, reason="one reader only with the compiled zblock.fuse._devread")
@pytest.mark.timeout(60)
def test_after_an_fsync_the_workers_go_back_to_one_reader(tmp_path, monkeypatch):
    """An fsync lets every worker read for a while; then all but one park again (else they
    would all spin)."""
    monkeypatch.setattr(readers_module, "SHARED_S", 0.05)
    store = Store.open(str(tmp_path / "b.img"), SIZE, Config(pool_limit=8 << 20))
    session = NativeFuse(ZblockOps(store), str(tmp_path), fsname="test")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    readers = Readers(3, spins=True)
    workers = serve(session, ours.fileno(), 3, readers)
    try:
        k = Kernel(theirs)
        theirs.settimeout(20)
        disk, _ = lookup(k, 1, "disk")
        fh, _ = open_file(k, disk)
        assert k.call(p.FSYNC, disk, p.FSYNC_IN.pack(fh, 0, 0))[0] == 0
        assert readers.limit == 3
        time.sleep(0.1)
        for _ in range(20):                     # each worker answers one at least, then parks
            assert k.call(p.READ, disk, read_in(fh, 0, 4096))[0] == 0
            time.sleep(0.01)
        assert readers.limit == 1 and len(readers.holders) == 1
    finally:
        theirs.close()
        for w in workers:
            w.join(timeout=10)
        ours.close()
        store.close()
    assert not any(w.is_alive() for w in workers)


@pytest.mark.timeout(60)
def test_init_agrees_on_what_both_sides_know(tmp_path):
    store = Store.open(str(tmp_path / "b.img"), SIZE, Config())
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        session = NativeFuse(ZblockOps(store), str(tmp_path), fsname="test")
        kflags = p.FUSE_ASYNC_READ | p.FUSE_BIG_WRITES | p.FUSE_MAX_PAGES | p.FUSE_WRITEBACK_CACHE
        init = p.IN_HEADER.pack(0, p.INIT, 2, 0, 0, 0, 0, 0, 0) + \
            p.INIT_IN.pack(7, 44, 1 << 20, kflags, 0) + bytes(44)
        session._init(ours.fileno(), memoryview(init))
        msg = theirs.recv(4096)
        major, minor, readahead, flags, _, _, max_write, _, max_pages, *_ = \
            p.INIT_OUT.unpack_from(msg, OUT)
        assert (major, minor) == (7, p.KERNEL_MINOR) and max_write == MAX_WRITE and max_pages == 256
        assert flags == p.FUSE_ASYNC_READ | p.FUSE_BIG_WRITES | p.FUSE_MAX_PAGES   # no writeback cache
        assert session.info["protocol"] == f"7.{p.KERNEL_MINOR}"
        old = p.IN_HEADER.pack(0, p.INIT, 4, 0, 0, 0, 0, 0, 0) + p.INIT_IN.pack(7, 20, 0, 0, 0)
        with pytest.raises(NativeError):
            session._init(ours.fileno(), memoryview(old + bytes(44)))
        assert p.OUT_HEADER.unpack_from(theirs.recv(4096))[1] == -errno.EPROTO
    finally:
        ours.close()
        theirs.close()
        store.close()
