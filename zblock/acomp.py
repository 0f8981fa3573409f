"""The crypto acomp API as zswap uses it, and the per-CPU-like context sets built on it: the
only way zblock compresses or decompresses a page that serves I/O.

Kernel model (reference §1.9, §3.1): a transform (tfm) per algorithm, a request with its
source, destination capacity (dlen) and result, a completion callback with MAY_BACKLOG, and
crypto_wait_req() turning an asynchronous submit back into a synchronous wait. One request
carries a batch of pages, as the kernel's request chaining and the IAA batching series let
zswap submit several pages at once; a single page is a batch of one.

Backends, behind AcompTransform:
  - software (scomp): compress()/decompress() run the compressor's batch call inline and return
    0; the callback is not called. With software lz4 one C call checks and compresses a whole
    request with the GIL released once (zblock._lz4pages, optional; python-lz4 otherwise).
  - the simulated engine (zblock.accel), a hardware driver: in async mode (IAA async_irq)
    submit returns -EINPROGRESS, or -EBUSY when some pages were backlogged, and the callback
    runs once the whole batch has completed; in sync mode (IAA sync) the submitter polls inside
    compress() for the batch. Pages the engine failed (faults, a dead or hung engine, the
    deadline) are done in software by the context that submitted them (IAA falls back to
    deflate-generic the same way).

Results: a compress request's result is a zblock.scan.Scan (its pages' states: same-filled,
compressed, raw or rejected; zswap_compress()'s "compress poor" rule is dlen >= PAGE_SIZE). A
decompress request gives one joined destination (a read request's reply) or one result per
source (bytes, or the CompressionError it failed with).

ContextSet: each pool owns a bounded set of n contexts (n = CPUs) taken with get() and given
back with put(), like the kernel's per-CPU crypto_acomp_ctx and zram's zcomp_stream_get/put.
Per-thread contexts are not an option: libfuse's worker threads give each callback a fresh
Python thread state, so threading.local data is gone by the next request (DESIGN.md).
compress()/decompress() on the set split a large software batch of a compressor that releases
the GIL (zstd, deflate) across the contexts it can get, one chunk in the calling thread and
the others on n-1 worker threads, and wait once: FUSE writes arrive one at a time, so one
request must use both cores.

Invariants:
  - a context is owned by at most one caller between get() and put(); its mutex is held while
    its request is in use (compressor objects are not thread-safe);
  - at most n-1 worker tasks exist at once (each holds a context other than the caller's),
    so the worker task queue is bounded by construction;
  - a completion of a request generation that its waiter gave up on (the deadline) is dropped:
    it never touches a request that has been reused.

Lock protocol: ContextSet._free (a deque: a list reallocates on most pops) is popped and appended
without a lock (each is atomic under the GIL); _cond guards _closed, _waiters and the sleep of a
get() that found none free (never held across compression). AcompRequest._lock guards gen and the
completion state and is held while the completion callback runs, so a stale completion cannot race a
resubmission; callbacks must not submit (crypto_req_done only sets the wait). Lock order:
AcompContext.mutex -> AcompRequest._lock -> CryptoWait._cond -> Engine._lock.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import queue
import threading
import time
from typing import Callable, Sequence

from . import PAGE_SIZE, cpus, scan
from .accel import Engine, HwJob
from .compressors import CompressionError, get_compressor
from .errors import ZblockError

log = logging.getLogger(__name__)

__all__ = [
    "EINPROGRESS", "EBUSY", "ENOSPC", "ETIMEDOUT", "ENODEV", "CRYPTO_TFM_REQ_MAY_BACKLOG",
    "AcompTransform", "AcompRequest", "CryptoWait", "crypto_req_done", "crypto_wait_req",
    "AcompContext", "ContextSet", "AcompTimeout", "SPLIT_MIN",
]

# ---------------------------------------------------------------------------------------------
# constants

EINPROGRESS = errno.EINPROGRESS
EBUSY = errno.EBUSY
ENOSPC = errno.ENOSPC
ETIMEDOUT = errno.ETIMEDOUT
ENODEV = errno.ENODEV
EINVAL = errno.EINVAL
EIO = errno.EIO
CRYPTO_TFM_REQ_MAY_BACKLOG = 0x00000400        # include/linux/crypto.h

# Split a batch only into chunks of at least this many pages: handing a chunk to a worker
# costs a wake-up (70-470 us on the project machine), more than a few pages' compression.
SPLIT_MIN = 32
# Which software compressors a batch is split for: those that release the GIL for long enough
# (lzo never releases it; lz4's calls are too short to pay for the hand-off).
SPLITS = {"lz4": False, "lzo": False, "zstd": True, "deflate": True}

# A context is held for at most one 256-page batch (milliseconds); waiting longer than this
# for one means something is stuck, and the caller gets AcompTimeout instead of hanging.
GET_TIMEOUT = 60.0
# Deadline of one engine wait (IAA's completion poll times out too, then software takes over).
HW_TIMEOUT = 2.0


class AcompTimeout(ZblockError):
    """No acomp context, worker or engine answered before the deadline."""

    errno = errno.EIO


# ---------------------------------------------------------------------------------------------
# crypto_wait


class CryptoWait:
    """struct crypto_wait: a completion plus the error it carries. Reused across requests."""

    __slots__ = ("err", "_done", "_cond")

    def __init__(self):
        self.err = 0
        self._done = False
        self._cond = threading.Condition(threading.Lock())   # guards err and _done

    def complete(self, err: int) -> None:
        with self._cond:
            self.err = err
            self._done = True
            self._cond.notify_all()

    def reinit(self) -> None:
        with self._cond:
            self._done = False
            self.err = 0

    def wait(self, timeout: float | None) -> bool:
        with self._cond:
            ok = self._cond.wait_for(lambda: self._done, timeout)
            if ok:
                self._done = False          # reinit_completion, as crypto_wait_req does
            return ok


def crypto_req_done(data: CryptoWait, err: int) -> None:
    """The completion callback zswap installs: ignores the backlog -> HW notice, else completes."""
    if err == -EINPROGRESS:
        return
    data.complete(err)


def crypto_wait_req(ret: int, wait: CryptoWait, timeout: float | None = HW_TIMEOUT,
                    req: "AcompRequest | None" = None) -> int:
    """Turn a submit's return into the final result: wait on -EINPROGRESS/-EBUSY, else `ret`.

    With a deadline (the kernel waits forever; zblock never does): on expiry returns -ETIMEDOUT
    and, when `req` is given, abandons its generation so the late completion is dropped.
    """
    if ret != -EINPROGRESS and ret != -EBUSY:
        return ret
    if wait.wait(timeout):
        return wait.err
    if req is not None:
        req.abandon()
    wait.reinit()                 # a completion that slipped in before abandon() is erased
    return -ETIMEDOUT


# ---------------------------------------------------------------------------------------------
# transform and request


class AcompRequest:
    """acomp_req for a batch of pages: source, destination capacity (dlen), expected output
    length, flags and callback; the result of the last submission.

    Compress: `src` is n whole pages in one buffer; `detect_same` and `raw_poor` are zswap's
    same-filled check and 6.18's "store incompressible pages raw" rule, so that one backend call
    does a request's whole per-page work. Result: `scan` (zblock.scan.Scan).
    Decompress: `src` is a list of compressed streams (and, with `join`, whole pages that are
    copied as they are). Result: `dst` (one bytes, with `join`) or `results`.
    `gen` counts submissions; a completion carries the gen it was submitted with and is dropped
    when the request has moved on (abandoned by a timed-out waiter, or resubmitted).
    """

    def __init__(self, tfm: "AcompTransform"):
        self.tfm = tfm
        self.src = b""
        self.n = 0
        self.dlen = PAGE_SIZE          # destination capacity per page
        self.out_len = PAGE_SIZE       # decompress: expected output length per page
        self.detect_same = False
        self.raw_poor = True
        self.join = False
        self.scan: scan.Scan | None = None
        self.dst: bytes | None = None
        self.results: list | None = None
        self.flags = 0
        self.callback: Callable | None = None
        self.data = None
        self.gen = 0
        self.hw = None                 # the engine submission in flight (_HwSubmission)
        self._lock = threading.Lock()
        self._polled = threading.Event()   # sync-mode engine completions

    def set_compress(self, src, *, detect_same: bool = False, raw_poor: bool = True,
                     dlen: int = PAGE_SIZE) -> None:
        """acomp_request_set_params for a compress of the whole pages in `src`."""
        self.src = src
        self.n = len(src) // PAGE_SIZE
        self.dlen = dlen
        self.detect_same = detect_same
        self.raw_poor = raw_poor

    def set_decompress(self, src: Sequence, out_len: int = PAGE_SIZE, join: bool = False) -> None:
        """acomp_request_set_params for a decompress of the streams in `src`."""
        self.src = src
        self.n = len(src)
        self.out_len = out_len
        self.join = join

    def set_callback(self, flags: int, callback: Callable | None, data=None) -> None:
        """acomp_request_set_callback(req, flags, cb, data): cb(data, err) on completion."""
        self.flags = flags
        self.callback = callback
        self.data = data

    def drop_buffers(self) -> None:
        """The caller has the result: let go of the source and the result. A request lives as
        long as its context, so holding them would keep the last write's 1 MiB request buffer
        or the last read's 1 MiB reply alive per context (2 MiB of RSS after a read burst on
        2 CPUs), and a Scan's objects after their pages were overwritten or discarded. Caller
        owns the context; an engine completion still in flight does not touch these fields."""
        self.src = b""
        self.scan = self.dst = self.results = None

    def abandon(self) -> None:
        """The waiter gave up: any completion still in flight is for a dead generation."""
        with self._lock:
            self.gen += 1

    def _begin(self) -> int:
        """A new submission. Only an engine completes requests from another thread, so only
        then is the request's lock needed to move its generation."""
        if self.tfm.engine is None:
            self.scan = self.dst = self.results = None
            return self.gen
        with self._lock:
            self.gen += 1
            self.scan = self.dst = self.results = self.hw = None
            self._polled.clear()
            return self.gen

    def _hw_notice(self, job: HwJob, err: int) -> None:
        with self._lock:
            if job.cookie == self.gen and self.callback is not None and self.tfm.is_async:
                self.callback(self.data, err)

    def _hw_done(self, job: HwJob, err: int) -> None:
        """A page of the submission in flight completed (device thread). The last one
        completes the request once: the callback (async) or the submitter's poll (sync)."""
        with self._lock:
            sub = self.hw
            if job.cookie != self.gen or sub is None:
                self.tfm.stale_completions += 1      # its waiter gave up: drop it
                return
            sub.remaining -= 1
            if job.t_done > sub.t_done_max:
                sub.t_done_max = job.t_done
            if sub.remaining or sub.submitting:
                return                              # more to come, or the submitter finishes it
            if self.tfm.is_async:
                if self.callback is not None:
                    self.callback(self.data, 0)
            else:
                self._polled.set()


class _HwSubmission:
    """The pages of one request in the engine: which items went, their jobs, and when.
    `remaining`, `submitting` and `t_done_max` are guarded by the request's _lock."""

    __slots__ = ("items", "jobs", "t0", "cpu0", "remaining", "submitting", "t_done_max")

    def __init__(self, items: list, jobs: list, t0: float, cpu0: int):
        self.items, self.jobs, self.t0, self.cpu0 = items, jobs, t0, cpu0
        self.remaining = len(jobs)
        self.submitting = True
        self.t_done_max = t0


class AcompTransform:
    """crypto_acomp tfm: one algorithm+level on a backend (software, or the simulated engine).

    compress(req)/decompress(req) submit: software returns 0 (done, scomp); the engine returns
    -EINPROGRESS/-EBUSY (async), or 0/-ETIMEDOUT after polling (sync). complete(req, ret) then
    gives the request's result, serving what the engine failed in software.
    """

    def __init__(self, alg: str, level: int | None = None, engine: Engine | None = None,
                 timeout: float = HW_TIMEOUT):
        self.alg = alg
        self.level = level
        self.codec = (alg, level)
        self.compressor = get_compressor(alg, level)      # software; not thread-safe
        self.engine = engine
        self.timeout = timeout
        self.stale_completions = 0                        # approximate (not locked)

    @property
    def is_async(self) -> bool:
        """acomp_is_async(): completions come through the callback."""
        return self.engine is not None and self.engine.mode == "async"

    def alloc_request(self) -> AcompRequest:
        """acomp_request_alloc()"""
        return AcompRequest(self)

    def compress(self, req: AcompRequest) -> int:
        """crypto_acomp_compress()"""
        gen = req._begin()
        if self.engine is None:
            req.scan = self.compressor.scan_pages(req.src, req.n, req.detect_same, req.raw_poor)
            return 0
        mv = memoryview(req.src).cast("B")
        # the same-filled check is the host's, not the engine's
        states, todo, fills = scan.classify(mv, req.n, req.detect_same)
        req.scan = scan.Scan([], states, (), fills, 0)    # completed in complete()
        return self._hw_submit(req, gen, "compress",
                               [(i, mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in todo])

    def decompress(self, req: AcompRequest) -> int:
        """crypto_acomp_decompress()"""
        if self.engine is None:
            req.scan = req.dst = req.results = None     # _begin's software half, without its call
            if req.join:
                try:
                    req.dst = self.compressor.decompress_join(req.src, req.out_len)
                except CompressionError as e:
                    req.results = [e]
                    return -errno.EINVAL
            else:
                req.results = self.compressor.decompress_many(req.src, req.out_len)
            return 0
        gen = req._begin()
        return self._hw_submit(req, gen, "decompress",
                               [(i, s) for i, s in enumerate(req.src) if len(s) != req.out_len])

    def _hw_submit(self, req: AcompRequest, gen: int, op: str, items: list) -> int:
        """Submit the items (index, source) through the engine in groups of its batch size,
        at one engine time; the request completes when its last page does."""
        eng = self.engine
        cap = req.dlen if op == "compress" else req.out_len
        jobs = [HwJob(op, src, self.codec, cap, req.out_len, on_done=req._hw_done,
                      on_notice=req._hw_notice, cookie=gen) for _, src in items]
        t0 = eng.now()
        sub = _HwSubmission(items, jobs, t0, time.thread_time_ns())
        with req._lock:
            req.hw = sub
        accepted, backlogged, refused = 0, False, 0
        may_backlog = bool(req.flags & CRYPTO_TFM_REQ_MAY_BACKLOG)
        for s in range(0, len(jobs), eng.batch):
            part = jobs[s:s + eng.batch]
            for j, r in zip(part, eng.submit_batch(part, may_backlog, t0)):
                if r == -EINPROGRESS or r == -EBUSY:
                    accepted += 1
                    backlogged |= r == -EBUSY
                else:                               # never reached the engine
                    j.err, j.cookie = r, None
                    refused = refused or r
        with req._lock:
            sub.remaining -= len(jobs) - accepted
            sub.submitting = False
            finished = sub.remaining == 0
        if finished:        # nothing in flight (refused, or done already): a synchronous return
            return refused if not accepted else 0
        if self.is_async:
            return -EBUSY if backlogged else -EINPROGRESS
        # IAA sync mode: the driver polls for the completion before returning
        if req._polled.wait(self.timeout):
            return 0
        req.abandon()
        return -ETIMEDOUT

    def complete(self, req: AcompRequest, ret: int):
        """The result of a finished submission (`ret` from crypto_wait_req): a Scan for a
        compress, dst or results for a decompress. Engine failures are done in software here,
        in the submitter's thread. Caller holds the request's context."""
        sub = req.hw
        if sub is None:                             # software: done at submit
            if req.dst is not None:
                return req.dst
            if req.scan is not None:
                return req.scan
            if req.join:
                raise req.results[0]
            return req.results
        eng = self.engine
        done, failed = [], []
        for (i, src), j in zip(sub.items, sub.jobs):
            err = j.err                             # None: still pending at the deadline
            if err == 0:
                done.append((i, j.result))
            elif err == -ENOSPC and j.cookie is not None and j.op == "compress":
                done.append((i, -ENOSPC))           # a real result: the page did not fit
            else:
                failed.append((i, src))             # fault, dead, full, the deadline
        if ret == -ETIMEDOUT:
            eng.note_timeout(sum(1 for j in sub.jobs if j.err is None))
        else:
            eng.note_wait(max(sub.t_done_max - sub.t0, 0.0))
        if failed:
            eng.note_fallback(len(failed))
            srcs = [src for _, src in failed]
            soft = (scan.compress_each(self.compressor, srcs) if req.scan is not None
                    else self.compressor.decompress_many(srcs, req.out_len))
            done += [(i, r) for (i, _), r in zip(failed, soft)]
        eng.note_host_cpu(time.thread_time_ns() - sub.cpu0, req.n)
        with req._lock:
            req.hw = None
        if req.scan is not None:                    # compress: the Scan's remaining fields
            done.sort()
            s = req.scan
            states = bytearray(s.states)
            return scan.assemble(memoryview(req.src).cast("B"), req.n, states,
                                 [i for i, _ in done], [r for _, r in done], s.fills, req.raw_poor)
        out = list(req.src)
        for i, r in done:
            out[i] = r
        if not req.join:
            return out
        for i, r in done:
            if not isinstance(r, bytes):
                raise r
        return b"".join(out)

    def free(self) -> None:
        self.compressor = None


# ---------------------------------------------------------------------------------------------
# contexts


class AcompContext:
    """struct crypto_acomp_ctx: {tfm, req, wait, mutex}, one per "CPU" of a pool. No bounce
    buffer: every result is a new bytes object (the stored object, or the read's reply)."""

    __slots__ = ("index", "tfm", "req", "wait", "mutex")

    def __init__(self, index: int, alg: str, level: int | None, engine: Engine | None,
                 hw_timeout: float):
        self.index = index
        self.tfm = AcompTransform(alg, level, engine, hw_timeout)
        self.req = self.tfm.alloc_request()
        self.wait = CryptoWait()
        self.req.set_callback(CRYPTO_TFM_REQ_MAY_BACKLOG, crypto_req_done, self.wait)
        self.mutex = threading.Lock()

    def compress(self, src, *, detect_same: bool = False, raw_poor: bool = True,
                 timeout: float | None = None) -> scan.Scan:
        """zswap_compress() of the whole pages in `src` on this context. Caller owns ctx."""
        self.mutex.acquire()        # not `with`: about 1,000 instructions less a request
        try:
            self.req.set_compress(src, detect_same=detect_same, raw_poor=raw_poor)
            return self._submit(self.tfm.compress, timeout)
        finally:
            self.mutex.release()

    def decompress(self, srcs: Sequence, join: bool = False, out_len: int = PAGE_SIZE,
                   timeout: float | None = None):
        """zswap_decompress() of `srcs`: one bytes (join; CompressionError on a bad stream) or
        a list of bytes / CompressionError. Caller owns ctx."""
        self.mutex.acquire()
        try:
            self.req.set_decompress(srcs, out_len, join)
            return self._submit(self.tfm.decompress, timeout)
        finally:
            self.mutex.release()

    def _submit(self, submit, timeout: float | None):
        """submit(req) (the transform's compress or decompress), crypto_wait_req when it did not
        finish, and the result; the request then lets go of its buffers. Caller holds mutex."""
        req, tfm = self.req, self.tfm
        try:
            ret = submit(req)
            if ret:                 # in flight on the engine (or failed): crypto_wait_req
                ret = crypto_wait_req(ret, self.wait, tfm.timeout if timeout is None else timeout,
                                      req)
            return tfm.complete(req, ret)
        finally:
            req.drop_buffers()

    def free(self) -> None:
        self.tfm.free()


# ---------------------------------------------------------------------------------------------
# worker pool for splitting one batch across cores


class _Latch:
    """Counts down worker chunks; the caller waits once on a pre-acquired lock."""

    __slots__ = ("count", "_mutex", "_gate")

    def __init__(self, count: int):
        self.count = count
        self._mutex = threading.Lock()
        self._gate = threading.Lock()
        self._gate.acquire()

    def count_down(self) -> None:
        with self._mutex:
            self.count -= 1
            last = self.count == 0
        if last:
            self._gate.release()

    def wait(self, timeout: float) -> bool:
        return self._gate.acquire(timeout=timeout)


class _Task:
    __slots__ = ("fn", "args", "latch", "exc", "tid")

    def __init__(self, fn, args, latch):
        self.fn, self.args, self.latch = fn, args, latch
        self.exc = None
        self.tid = 0


class _Workers:
    """n-1 persistent threads running chunks of a batch. Stopped by a sentinel each passes on.

    The task queue is unbounded as a type but bounded by construction: every task holds a
    context other than its submitter's, so at most n-1 are ever queued.
    """

    def __init__(self, count: int, name: str):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(count)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        cpus.unpin()                        # a new pool's, maybe made on a pinned thread
        get = self._q.get
        while True:
            task = get()
            if task is None:
                self._q.put(None)            # notice the other workers
                return
            task.tid = threading.get_ident()
            try:
                task.fn(*task.args)
            except BaseException as e:       # reaches the caller through the task
                task.exc = e
            finally:
                task.latch.count_down()

    def submit(self, task: _Task) -> None:
        self._q.put(task)

    def stop(self, timeout: float = 5.0) -> None:
        self._q.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("zblock acomp: worker %s did not stop in %.0f s", t.name, timeout)


# ---------------------------------------------------------------------------------------------
# context set


class ContextSet:
    """A pool's bounded set of n acomp contexts, and the batch calls the cache makes on it.

    get()/put() (or `with cs.context() as ctx`) hand out whole contexts; `live` counts them.
    compress()/decompress() take contexts themselves and split big software batches.
    """

    def __init__(self, alg: str, level: int | None = None, n: int | None = None,
                 engine: Engine | None = None, *, split_min: int = SPLIT_MIN,
                 hw_timeout: float = HW_TIMEOUT, get_timeout: float = GET_TIMEOUT):
        n = (os.cpu_count() or 1) if n is None else int(n)
        if n < 1:
            raise ValueError(f"n: {n} contexts; at least 1 is needed")
        if split_min < 1:
            raise ValueError(f"split_min: {split_min} must be >= 1")
        self.alg, self.level, self.n = alg, level, n
        self.engine = engine
        self.split_min = split_min
        self.get_timeout = get_timeout
        self._contexts = [AcompContext(i, alg, level, engine, hw_timeout) for i in range(n)]
        self._free = collections.deque(self._contexts)
        self._cond = threading.Condition(threading.Lock())
        self._waiters = 0                    # get() calls blocked on _cond
        self._closed = False
        self._workers: _Workers | None = None
        self._workers_lock = threading.Lock()
        # one context has nothing to split across (its single chunk waited on a latch of 0)
        self._splits = engine is None and SPLITS[alg] and n > 1
        self.worker_tids: set[int] = set()   # threads that ran chunks (tests' oracle)

    # ---- get / put ------------------------------------------------------------------------

    @property
    def live(self) -> int:
        return 0 if self._closed else len(self._contexts)

    def get(self, timeout: float | None = None) -> AcompContext:
        """Take a free context, blocking until one is put back (deadline: AcompTimeout).

        The uncontended case takes no lock: deque.pop is atomic under the GIL, and a 4 KiB
        request's whole budget is a few microseconds (see put() for the waiter protocol)."""
        if not self._closed:
            try:
                return self._free.pop()
            except IndexError:
                pass
        with self._cond:
            if self._closed:        # a pool in use is never closed: this is a bug, say so
                raise AcompTimeout("acomp context set is closed")
            t = self.get_timeout if timeout is None else timeout
            self._waiters += 1
            try:
                # counted as a waiter before looking: a put() after this look notifies us
                if not self._cond.wait_for(lambda: self._free or self._closed, t):
                    raise AcompTimeout(f"no acomp context free within {t:.1f} s")
            finally:
                self._waiters -= 1
            if self._closed and not self._free:
                raise AcompTimeout("acomp context set is closed")
            return self._free.pop()

    def try_get(self) -> AcompContext | None:
        if self._closed:
            return None
        try:
            return self._free.pop()
        except IndexError:
            return None

    def put(self, ctx: AcompContext) -> None:
        self._free.append(ctx)
        # A waiter counts itself under _cond before it looks at _free, so either it sees this
        # context or we see it counted and notify (after it has released _cond by waiting).
        if self._waiters:
            with self._cond:
                self._cond.notify()

    @contextlib.contextmanager
    def context(self, timeout: float | None = None):
        ctx = self.get(timeout)
        try:
            yield ctx
        finally:
            self.put(ctx)

    # ---- the batch calls ------------------------------------------------------------------

    def compress(self, buf, *, detect_same: bool = False, raw_poor: bool = True) -> scan.Scan:
        """The whole pages of `buf` through contexts of this set (see AcompContext.compress)."""
        mv = memoryview(buf).cast("B")
        n = len(mv) // PAGE_SIZE
        if self._splits and n >= 2 * self.split_min:
            calls = [(AcompContext.compress, (mv[a * PAGE_SIZE:b * PAGE_SIZE],),
                      {"detect_same": detect_same, "raw_poor": raw_poor}) for a, b in self._split(n)]
            return scan.concat(self._run_split(calls))
        ctx = self.get()
        try:
            return ctx.compress(mv, detect_same=detect_same, raw_poor=raw_poor)
        finally:
            self.put(ctx)

    def decompress(self, srcs: Sequence, *, join: bool = False, out_len: int = PAGE_SIZE):
        """`srcs` through contexts of this set (see AcompContext.decompress)."""
        if self._splits and len(srcs) >= 2 * self.split_min:
            calls = [(AcompContext.decompress, (srcs[a:b],), {"out_len": out_len, "join": join})
                     for a, b in self._split(len(srcs))]
            outs = self._run_split(calls)
            return b"".join(outs) if join else [r for out in outs for r in out]
        ctx = self.get()
        try:
            return ctx.decompress(srcs, join, out_len)
        finally:
            self.put(ctx)

    def _split(self, n: int) -> list[tuple[int, int]]:
        """How a splittable batch of n items is cut: one chunk per context it may use."""
        k = min(self.n, n // self.split_min)
        return [(n * i // k, n * (i + 1) // k) for i in range(k)]

    def _run_split(self, calls: list) -> list:
        """Run calls (method, args, kwargs) each on its own context: the first in this
        thread, the others on the workers; wait once. Fewer contexts free: fewer, bigger
        chunks are not made, the calls queue for contexts instead (bounded by get())."""
        ctxs = [self.get()]
        try:
            while len(ctxs) < len(calls):
                c = self.try_get()
                if c is None:
                    break
                ctxs.append(c)
            out: list = [None] * len(calls)
            if len(ctxs) < len(calls):              # the others are busy: do it all here
                for i, (fn, args, kw) in enumerate(calls):
                    out[i] = fn(ctxs[0], *args, **kw)
                return out
            latch = _Latch(len(calls) - 1)
            tasks = []
            workers = self._get_workers()
            for i in range(1, len(calls)):
                t = _Task(_call_into, (out, i, ctxs[i]) + calls[i], latch)
                tasks.append(t)
                workers.submit(t)
            fn, args, kw = calls[0]
            out[0] = fn(ctxs[0], *args, **kw)
            if not latch.wait(self.get_timeout):
                # a worker is stuck: its contexts stay out of the set rather than be shared
                del ctxs[1:]
                raise AcompTimeout(f"acomp worker did not finish within {self.get_timeout:.0f} s")
            tids = self.worker_tids
            tids.add(threading.get_ident())
            for t in tasks:
                tids.add(t.tid)
                if t.exc is not None:
                    raise t.exc
            return out
        finally:
            for c in ctxs:
                self.put(c)

    def _get_workers(self) -> _Workers:
        w = self._workers
        if w is None:
            with self._workers_lock:
                if self._closed:
                    raise AcompTimeout("acomp context set is closed")
                if self._workers is None:
                    self._workers = _Workers(self.n - 1, f"zblock-acomp-{self.alg}")
                w = self._workers
        return w

    # ---- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers (bounded joins) and free the contexts. Idempotent. The engine is
        not closed here: it is shared by every pool and belongs to its creator."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        with self._workers_lock:
            w, self._workers = self._workers, None
        if w is not None:
            w.stop()
        for c in self._contexts:
            c.free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _call_into(out: list, i: int, ctx: AcompContext, fn, args, kw) -> None:
    out[i] = fn(ctx, *args, **kw)
