"""The crypto acomp API as zswap uses it, and the per-CPU-like context sets built on it.

Kernel model (reference §1.9, §3.1): a transform (tfm) per algorithm, a request with
src / dst capacity (dlen in) / dlen out, a completion callback with MAY_BACKLOG, and
crypto_wait_req() turning an asynchronous submit back into a synchronous wait. Software
compressors behave like scomp: compress() runs inline and returns 0 (the callback is not
called). The simulated engine (zblock.accel) behaves like a hardware driver: in async mode
(IAA async_irq) submit returns -EINPROGRESS, or -EBUSY when backlogged (the callback gets the
-EINPROGRESS notice first, then the result), or -ENOSPC when the queues are full without
MAY_BACKLOG; in sync mode (IAA sync) the submitter polls inside compress() and gets the result.

Error returns are negative errnos, as in the kernel (`ret == -EINPROGRESS`); the constants
below are the positive values. A compressed result that does not fit the destination
(dlen >= capacity, zswap 6.18's "compress poor" rule with capacity PAGE_SIZE) is -ENOSPC:
the caller stores the page raw or rejects it per policy.

ContextSet: each pool owns a bounded set of n contexts (n = CPUs) taken with get() and given
back with put(), like the kernel's per-CPU crypto_acomp_ctx and zram's zcomp_stream_get/put.
Per-thread contexts are not an option: libfuse's worker threads give each callback a fresh
Python thread state, so threading.local data is gone by the next request (DESIGN.md).

The batch path (compress_pages, decompress_pages) is the hot path: FUSE writes arrive one at
a time (the kernel serialises them), so one call of up to 256 pages must use both cores. It
splits the pages across the contexts it can get, runs one chunk in the calling thread and the
others on a persistent pool of n-1 worker threads, and waits once. lz4, zstd and zlib release
the GIL while compressing; python-lzo does not (measured: 2 threads ran lzo at 0.9x one
thread), so lzo is never split. With the engine, the pages go through the engine queues in
batches of hw_batch, submitted at one engine time, and the call waits once.

Invariants:
  - a context is owned by at most one caller between get() and put(); its mutex is held while
    its compressor or request is in use (the compressor objects are not thread-safe);
  - at most n-1 worker tasks exist at once (each holds a context other than the caller's),
    so the worker task queue is bounded by construction;
  - a completion for a request generation that its waiter gave up on (timeout) is dropped:
    it never writes into a context that has been reused.

Lock protocol: ContextSet._free is popped and appended without a lock (each is atomic under the
GIL); _cond guards _closed, _waiters and the sleep of a get() that found none free (never held
across compression).
AcompRequest._lock guards gen/result/dlen/err and is held while the completion callback runs,
so a stale completion cannot race a resubmission; callbacks must not submit (crypto_req_done
only sets the wait). Lock order: AcompRequest._lock -> CryptoWait._cond -> Engine._lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import threading
import time
from typing import Callable, Sequence

from . import PAGE_SIZE
from .accel import Engine, HwBatch, HwJob
from .compressors import CompressionError, get_compressor
from .errors import ZblockError

log = logging.getLogger(__name__)

__all__ = [
    "EINPROGRESS", "EBUSY", "ENOSPC", "ETIMEDOUT", "ENODEV", "CRYPTO_TFM_REQ_MAY_BACKLOG",
    "AcompTransform", "AcompRequest", "CryptoWait", "crypto_req_done", "crypto_wait_req",
    "acomp_request_alloc", "AcompContext", "ContextSet", "AcompTimeout", "SPLIT_MIN",
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

# Split a batch only into chunks of at least this many pages (so from 2 x SPLIT_MIN pages on):
# handing a chunk to a worker costs a wake-up, and every page then costs GIL hand-offs (each C
# call releases and re-takes the GIL). Measured on the idle 2-core machine, one cache, a
# 256-page batch of 1/4 zero, 1/4 random, 1/2 text pages, 6 interleaved rounds, medians, MB/s,
# split in 2 vs one thread:
#   compress     lz4 468 vs 449 (a wash); zstd-1 271 vs 218; deflate 92 vs 61
#   decompress   lz4 1039 vs 2032 (a 1-3 us call loses to the hand-offs); zstd-1 657 vs 502;
#                deflate 367 vs 216
# and through a mount (store.py's write-behind queue compressing while the next FUSE request
# arrives), dd 256 MiB bs=1M, medians of 3, lz4 write mix / usr: split 332 / 250 MB/s, one
# thread 366 / 324. So lz4 uses the second core by pipelining, not by splitting; lzo holds the
# GIL while compressing, so splitting it only adds contention.
# Measured again once lz4 ran through zblock/_lz4pages.c (the GIL released once per list, not
# per page): 256-page /usr reads in-process, split vs one thread, 3 runs: 356/422/518 vs
# 462/452/504 us a batch. Waking the worker took 70-470 us on this VM (timestamps taken in the
# chunks), so splitting is a wash at best and stays off for lz4.
SPLIT_MIN = 32
SPLIT_COMPRESS = {"lz4": False, "lzo": False, "zstd": True, "deflate": True}
SPLIT_DECOMPRESS = {"lz4": False, "lzo": False, "zstd": True, "deflate": True}

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


class AcompTransform:
    """crypto_acomp tfm: one algorithm+level on a backend (software, or the simulated engine).

    Software: compress()/decompress() run inline and return 0 or -errno (scomp).
    Engine async: return -EINPROGRESS / -EBUSY / -ENOSPC (full, no MAY_BACKLOG) / -ENODEV.
    Engine sync: the submitter polls until the result (deadline `timeout`, then -ETIMEDOUT).
    """

    def __init__(self, alg: str, level: int | None = None, engine: Engine | None = None,
                 timeout: float = HW_TIMEOUT):
        self.alg = alg
        self.level = level
        self.codec = (alg, level)
        self.compressor = get_compressor(alg, level)      # software path; not thread-safe
        self.engine = engine
        self.timeout = timeout
        self.stale_completions = 0                        # approximate (not locked)

    @property
    def is_async(self) -> bool:
        """acomp_is_async(): completions come through the callback."""
        return self.engine is not None and self.engine.mode == "async"

    def alloc_request(self) -> "AcompRequest":
        return AcompRequest(self)

    def compress(self, req: "AcompRequest") -> int:
        return self._run(req, "compress")

    def decompress(self, req: "AcompRequest") -> int:
        return self._run(req, "decompress")

    def _run(self, req: "AcompRequest", op: str) -> int:
        if self.engine is None:
            return req._run_soft(op)
        with req._lock:
            req.gen += 1
            gen = req.gen
            req.err = None
            req.result = None
            req._polled.clear()
        job = HwJob(op, req.src, self.codec, req.cap, req.out_len,
                    on_done=req._hw_done, on_notice=req._hw_notice, cookie=gen)
        ret = self.engine.submit(job, bool(req.flags & CRYPTO_TFM_REQ_MAY_BACKLOG))
        if self.engine.mode == "async" or ret not in (-EINPROGRESS, -EBUSY):
            return ret
        # IAA sync mode: the driver polls for the completion before returning
        if req._polled.wait(self.timeout):
            return req.err
        req.abandon()
        self.engine.note_timeout()
        return -ETIMEDOUT

    def free(self) -> None:
        self.compressor = None


class AcompRequest:
    """acomp_req: src, destination capacity (dlen in), dlen out and result, flags, callback.

    `gen` counts submissions; a completion carries the gen it was submitted with and is dropped
    when the request has moved on (abandoned by a timed-out waiter, or resubmitted).
    """

    def __init__(self, tfm: AcompTransform):
        self.tfm = tfm
        self.src = b""
        self.cap = PAGE_SIZE           # dlen in: destination capacity
        self.out_len = PAGE_SIZE       # decompress: expected output length
        self.dlen = 0                  # dlen out
        self.result: bytes | None = None
        self.err: int | None = None
        self.flags = 0
        self.callback: Callable | None = None
        self.data = None
        self.gen = 0
        self._lock = threading.Lock()
        self._polled = threading.Event()   # sync-mode engine completions

    def set_params(self, src, dlen: int = PAGE_SIZE, out_len: int = PAGE_SIZE) -> None:
        """acomp_request_set_params: input, destination capacity, (decompress) expected length."""
        self.src = src
        self.cap = dlen
        self.out_len = out_len

    def set_callback(self, flags: int, callback: Callable | None, data=None) -> None:
        """acomp_request_set_callback(req, flags, cb, data): cb(data, err) on completion."""
        self.flags = flags
        self.callback = callback
        self.data = data

    def abandon(self) -> None:
        """The waiter gave up: any completion still in flight is for a dead generation."""
        with self._lock:
            self.gen += 1

    def _run_soft(self, op: str) -> int:
        """scomp: synchronous, inline; the callback is not called."""
        comp = self.tfm.compressor
        with self._lock:
            self.gen += 1
            try:
                if op == "compress":
                    out = comp.compress(self.src)
                    if len(out) >= self.cap:
                        self.result, self.dlen, self.err = None, 0, -ENOSPC
                        return -ENOSPC
                else:
                    out = comp.decompress(self.src, self.out_len)
            except CompressionError:
                self.result, self.dlen, self.err = None, 0, -EINVAL
                return -EINVAL
            self.result, self.dlen, self.err = out, len(out), 0
            return 0

    def _hw_notice(self, job: HwJob, err: int) -> None:
        with self._lock:
            if job.cookie != self.gen:
                return
            if self.callback is not None and self.tfm.is_async:
                self.callback(self.data, err)

    def _hw_done(self, job: HwJob, err: int) -> None:
        with self._lock:
            if job.cookie != self.gen:
                self.tfm.stale_completions += 1      # its waiter gave up: drop it
                return
            self.err = err
            self.result = job.result if err == 0 else None
            self.dlen = len(job.result) if err == 0 else 0
            if self.tfm.is_async:
                if self.callback is not None:
                    self.callback(self.data, err)
            else:
                self._polled.set()


def acomp_request_alloc(tfm: AcompTransform) -> AcompRequest:
    return AcompRequest(tfm)


# ---------------------------------------------------------------------------------------------
# contexts


class AcompContext:
    """struct crypto_acomp_ctx: {tfm, req, wait, buffer, mutex}, one per "CPU" of a pool.

    `comp` is the software compressor of the tfm, used directly by the batch path (scomp runs
    inline, so the request machinery would only add per-page Python work).
    """

    __slots__ = ("index", "tfm", "req", "wait", "buffer", "mutex", "comp")

    def __init__(self, index: int, alg: str, level: int | None, engine: Engine | None,
                 hw_timeout: float):
        self.index = index
        self.tfm = AcompTransform(alg, level, engine, hw_timeout)
        self.req = self.tfm.alloc_request()
        self.wait = CryptoWait()
        self.req.set_callback(CRYPTO_TFM_REQ_MAY_BACKLOG, crypto_req_done, self.wait)
        self.buffer = bytearray(PAGE_SIZE)
        self.mutex = threading.Lock()
        self.comp = self.tfm.compressor

    def compress(self, src, timeout: float | None = None) -> tuple[int, bytes | None]:
        """zswap_compress() on this context: (0, bytes) or (-errno, None). Caller owns ctx."""
        with self.mutex:
            req = self.req
            req.set_params(src, PAGE_SIZE)
            ret = crypto_wait_req(self.tfm.compress(req), self.wait,
                                  self.tfm.timeout if timeout is None else timeout, req)
            return ret, (req.result if ret == 0 else None)

    def decompress(self, src, out_len: int = PAGE_SIZE,
                   timeout: float | None = None) -> tuple[int, bytes | None]:
        with self.mutex:
            req = self.req
            req.set_params(src, out_len, out_len)
            ret = crypto_wait_req(self.tfm.decompress(req), self.wait,
                                  self.tfm.timeout if timeout is None else timeout, req)
            return ret, (req.result if ret == 0 else None)

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
# chunk kernels (run in the caller or a worker; the context's mutex is held by the caller)


def _compress_chunk(comp, pages, lo: int, hi: int, out: list) -> None:
    try:
        res = comp.compress_many(pages[lo:hi])        # the fast path: one comprehension
    except Exception:
        res = []
        for p in pages[lo:hi]:                        # find the page that failed
            try:
                res.append(comp.compress(p))
            except Exception:
                res.append(-EINVAL)
    # len() of anything but bytes or an errno is a bug that must reach the caller (TypeError)
    out[lo:hi] = [c if type(c) is int or len(c) < PAGE_SIZE else -ENOSPC for c in res]


def _decompress_chunk(comp, srcs, lo: int, hi: int, out: list, out_len: int) -> None:
    try:
        out[lo:hi] = comp.decompress_many(srcs[lo:hi], out_len)
        return
    except Exception:
        pass
    res = []
    for s in srcs[lo:hi]:                             # find the source that failed
        try:
            res.append(comp.decompress(s, out_len))
        except Exception as e:
            res.append(e if isinstance(e, CompressionError) else CompressionError(repr(e)))
    out[lo:hi] = res


def _locked(ctx: AcompContext, fn, *args):
    with ctx.mutex:
        fn(ctx.comp, *args)


# ---------------------------------------------------------------------------------------------
# context set


class ContextSet:
    """A pool's bounded set of n acomp contexts plus the batch API the cache calls.

    get()/put() (or `with cs.context() as ctx`) hand out whole contexts; `live` counts them.
    compress_pages / decompress_pages / decompress_page take contexts themselves.
    """

    def __init__(self, alg: str, level: int | None = None, n: int | None = None,
                 engine: Engine | None = None, *, split_min: int = SPLIT_MIN,
                 hw_batch: int | None = None, hw_timeout: float = HW_TIMEOUT,
                 get_timeout: float = GET_TIMEOUT):
        n = (os.cpu_count() or 1) if n is None else int(n)
        if n < 1:
            raise ValueError(f"n: {n} contexts; at least 1 is needed")
        if split_min < 1:
            raise ValueError(f"split_min: {split_min} must be >= 1")
        self.alg, self.level, self.n = alg, level, n
        self.engine = engine
        self.split_min = split_min
        self.hw_batch = int(hw_batch or (engine.batch if engine is not None else 8))
        self.hw_timeout = hw_timeout
        self.get_timeout = get_timeout
        self._contexts = [AcompContext(i, alg, level, engine, hw_timeout) for i in range(n)]
        self._free = list(self._contexts)
        self._cond = threading.Condition(threading.Lock())
        self._waiters = 0                    # get() calls blocked on _cond
        self._closed = False
        self._workers: _Workers | None = None
        self._workers_lock = threading.Lock()
        self.fallbacks = 0                   # engine faults served by software (approximate)
        self.worker_tids: set[int] = set()   # threads that ran chunks (tests' oracle)

    # ---- get / put ------------------------------------------------------------------------

    @property
    def live(self) -> int:
        return 0 if self._closed else len(self._contexts)

    def get(self, timeout: float | None = None) -> AcompContext:
        """Take a free context, blocking until one is put back (deadline: AcompTimeout).

        The uncontended case takes no lock: list.pop is atomic under the GIL, and a 4 KiB
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

    # ---- batch API ------------------------------------------------------------------------

    def compress_pages(self, pages: Sequence, *, wait_each: bool = False) -> list:
        """Compress whole pages: each item is bytes (len < PAGE_SIZE) or a negative errno
        (-ENOSPC: did not fit; other: compressor error). `wait_each` (engine only) submits and
        waits page by page, the seed's model, for comparisons."""
        if self.engine is not None:
            return self._hw_pages("compress", pages, PAGE_SIZE, wait_each)
        return self._split(pages, _compress_chunk, (), SPLIT_COMPRESS[self.alg])

    def decompress_pages(self, srcs: Sequence, out_len: int = PAGE_SIZE) -> list:
        """Decompress; each item is bytes of out_len or a CompressionError (not raised)."""
        if self.engine is not None:
            return self._hw_pages("decompress", srcs, out_len, False)
        return self._split(srcs, _decompress_chunk, (out_len,), SPLIT_DECOMPRESS[self.alg])

    def compress_page(self, src) -> bytes | int:
        """compress_pages for one page without the batch machinery (a 4 KiB write's path)."""
        if self.engine is not None:
            return self._hw_pages("compress", (src,), PAGE_SIZE, False)[0]
        ctx = self.get()
        try:
            with ctx.mutex:
                c = ctx.comp.compress(src)
        except Exception:
            return -EINVAL
        finally:
            self.put(ctx)
        return c if len(c) < PAGE_SIZE else -ENOSPC

    def decompress_page(self, src, out_len: int = PAGE_SIZE) -> bytes:
        """One page; raises CompressionError on corrupt data."""
        if self.engine is not None:
            r = self._hw_pages("decompress", (src,), out_len, True)[0]
            if isinstance(r, Exception):
                raise r
            return r
        ctx = self.get()
        try:
            with ctx.mutex:
                return ctx.comp.decompress(src, out_len)
        finally:
            self.put(ctx)

    @property
    def joins(self) -> bool:
        """decompress_join is one library call here (software lz4): worth it for a request."""
        return self.engine is None and self._contexts[0].comp.joins

    def decompress_join(self, items: Sequence, out_len: int = PAGE_SIZE) -> bytes:
        """Compressor.decompress_join in one context; raises CompressionError."""
        ctx = self.get()
        try:
            with ctx.mutex:
                return ctx.comp.decompress_join(items, out_len)
        finally:
            self.put(ctx)

    @property
    def stateless_compressor(self):
        """The compressor itself where a page needs no context (software, Compressor.stateless):
        the cache's one-page paths call it directly. None otherwise."""
        comp = self._contexts[0].comp
        return comp if self.engine is None and comp.stateless else None

    @property
    def scans(self) -> bool:
        """scan_pages is one library call here (software lz4)."""
        return self.engine is None and self._contexts[0].comp.scans

    def scan_pages(self, buf, detect_same: bool, raw_poor: bool) -> tuple:
        """Compressor.scan_pages in one context: a write request's pages, GIL released once."""
        ctx = self.get()
        try:
            with ctx.mutex:
                return ctx.comp.scan_pages(buf, detect_same, raw_poor)
        finally:
            self.put(ctx)

    def _split(self, items: Sequence, chunk_fn, extra: tuple, split: bool = True) -> list:
        n_items = len(items)
        ctx0 = self.get()
        ctxs = [ctx0]
        try:
            if split and self.n > 1:
                want = min(self.n, n_items // self.split_min) - 1
                while want > 0:
                    c = self.try_get()
                    if c is None:
                        break
                    ctxs.append(c)
                    want -= 1
            k = len(ctxs)
            if k == 1:
                out = [None] * n_items
                with ctx0.mutex:
                    chunk_fn(ctx0.comp, items, 0, n_items, out, *extra)
                return out
            out = [None] * n_items
            bounds = [n_items * i // k for i in range(k + 1)]
            latch = _Latch(k - 1)
            tasks = []
            workers = self._get_workers()
            for i in range(1, k):
                t = _Task(_locked, (ctxs[i], chunk_fn, items, bounds[i], bounds[i + 1], out) + extra,
                          latch)
                tasks.append(t)
                workers.submit(t)
            with ctx0.mutex:
                chunk_fn(ctx0.comp, items, bounds[0], bounds[1], out, *extra)
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

    # ---- engine path ------------------------------------------------------------------------

    def _hw_pages(self, op: str, items: Sequence, out_len: int, wait_each: bool) -> list:
        """Submit through the engine in batches of hw_batch, wait once; faults -> software."""
        ctx = self.get()      # bounds concurrent submitters to n, as zswap's per-CPU ctx does
        try:
            with ctx.mutex:
                return self._hw_pages_locked(ctx, op, items, out_len, wait_each)
        finally:
            self.put(ctx)

    def _hw_pages_locked(self, ctx: AcompContext, op: str, items: Sequence, out_len: int,
                         wait_each: bool) -> list:
        """Caller owns ctx and holds its mutex."""
        eng = self.engine
        codec = (self.alg, self.level)
        n_items = len(items)
        cpu0 = time.thread_time_ns()
        out: list = [None] * n_items
        failed: list[int] = []
        groups = [range(i, i + 1) for i in range(n_items)] if wait_each else \
            [range(0, n_items)]
        for group in groups:
            jobs = []
            batch = HwBatch(len(group))
            t0 = eng.now()
            for i in group:
                jobs.append(HwJob(op, items[i], codec, PAGE_SIZE, out_len, on_done=batch.job_done))
            hb = self.hw_batch
            for s in range(0, len(jobs), hb):
                part = jobs[s:s + hb]
                rets = eng.submit_batch(part, True, t0)
                for j, r in zip(part, rets):
                    if r == -EINPROGRESS or r == -EBUSY:
                        j.cookie = True               # accepted
                    else:
                        j.err = r                     # never reached the engine
                        batch.job_done(j, r)
            ok = batch.wait(self.hw_timeout)
            if not ok:
                eng.note_timeout(sum(1 for j in jobs if j.err is None))
            else:
                eng.note_wait(max(batch.t_done_max - t0, 0.0))
            for j, i in zip(jobs, group):
                err = j.err
                if err == 0:
                    out[i] = j.result
                elif err == -ENOSPC and j.cookie and op == "compress":
                    out[i] = -ENOSPC                  # a real result: the page did not fit
                else:
                    failed.append(i)                  # fault, dead, full, timeout
        eng.note_host_cpu(time.thread_time_ns() - cpu0, n_items)
        if failed:
            self._fallback_locked(ctx, op, items, failed, out, out_len)
        return out

    def _fallback_locked(self, ctx, op, items, idx: list[int], out: list, out_len: int) -> None:
        """Serve engine failures in software (IAA falls back to deflate-generic).
        Caller owns ctx and holds its mutex."""
        self.fallbacks += len(idx)
        self.engine.note_fallback(len(idx))
        sub = [items[i] for i in idx]
        res = [None] * len(sub)
        if op == "compress":
            _compress_chunk(ctx.comp, sub, 0, len(sub), res)
        else:
            _decompress_chunk(ctx.comp, sub, 0, len(sub), res, out_len)
        for i, r in zip(idx, res):
            out[i] = r

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
