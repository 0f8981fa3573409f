"""The crypto acomp API model and the context sets: semantics, bounds, real concurrency.

Tier: engine with fakes (a FakeClock engine; compressor wrappers that wait on a Barrier).
"""

import errno
import os
import threading
import time

import pytest

from zblock import PAGE_SIZE, scan
from zblock.accel import Engine, FakeClock
from zblock.acomp import (CRYPTO_TFM_REQ_MAY_BACKLOG, EBUSY, EINPROGRESS, ENOSPC,
                          AcompTimeout, AcompTransform, ContextSet, CryptoWait, crypto_req_done,
                          crypto_wait_req)
from zblock.compressors import CompressionError, Compressor, get_compressor
from pages import text_page

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def closing():
    things = []
    yield things.append
    for t in reversed(things):
        t.close()


# ---- crypto API semantics ----------------------------------------------------------------------


def compressed(cs_or_ctx, pages, **kw) -> list:
    """Each page's compress result from one request: the stream, or -ENOSPC (did not fit)."""
    sc = cs_or_ctx.compress(b"".join(pages), raw_poor=False, **kw)
    return [o if st == scan.COMP else -ENOSPC for st, o in zip(sc.states, sc.objs)]


def test_software_tfm_is_synchronous_scomp():
    tfm = AcompTransform("lz4")
    assert not tfm.is_async
    req = tfm.alloc_request()
    calls = []
    req.set_callback(CRYPTO_TFM_REQ_MAY_BACKLOG, lambda d, e: calls.append(e), None)
    req.set_compress(text_page(1) + os.urandom(PAGE_SIZE) + bytes(PAGE_SIZE), detect_same=True,
                     raw_poor=False)
    assert tfm.compress(req) == 0
    sc = tfm.complete(req, 0)
    # compressed; did not fit (dlen >= PAGE_SIZE: poor, rejected); same-filled
    assert list(sc.states) == [scan.COMP, scan.NONE, scan.SAME]
    assert 0 < sc.lengths[0] < PAGE_SIZE and sc.objs[1:] == [None, None]
    req.set_decompress([sc.objs[0], text_page(2)], join=True)     # a whole page is copied
    assert tfm.decompress(req) == 0 and tfm.complete(req, 0) == text_page(1) + text_page(2)
    req.set_decompress([b"\xff" * 50], join=True)
    assert tfm.decompress(req) == -errno.EINVAL
    with pytest.raises(CompressionError):
        tfm.complete(req, -errno.EINVAL)
    req.set_decompress([b"\xff" * 50, sc.objs[0]])
    assert tfm.decompress(req) == 0
    bad, good = tfm.complete(req, 0)
    assert isinstance(bad, CompressionError) and good == text_page(1)
    assert calls == []                       # scomp never calls the callback
    wait = CryptoWait()
    assert crypto_wait_req(0, wait) == 0 and crypto_wait_req(-ENOSPC, wait) == -ENOSPC


def test_crypto_req_done_ignores_the_backlog_notice():
    wait = CryptoWait()
    crypto_req_done(wait, -EINPROGRESS)
    assert not wait.wait(0.01)
    crypto_req_done(wait, 0)
    assert crypto_wait_req(-EBUSY, wait, 1.0) == 0


def test_async_engine_inprogress_backlog_and_full(closing):
    clock = FakeClock()
    eng = Engine(queues=1, depth=1, latency_us=10, throughput_mbps=1e9, mode="async", clock=clock)
    closing(eng)
    tfm = AcompTransform("lz4", engine=eng)
    assert tfm.is_async
    events = {0: [], 1: [], 2: []}
    reqs = []
    for i in range(3):
        r = tfm.alloc_request()
        flags = CRYPTO_TFM_REQ_MAY_BACKLOG if i < 2 else 0
        r.set_callback(flags, lambda d, e: events[d].append(e), i)
        r.set_compress(text_page(i))
        reqs.append(r)
    assert tfm.compress(reqs[0]) == -EINPROGRESS
    assert tfm.compress(reqs[1]) == -EBUSY          # queue full, MAY_BACKLOG: backlogged
    assert tfm.compress(reqs[2]) == -ENOSPC         # queue full, no MAY_BACKLOG: refused
    assert events == {0: [], 1: [], 2: []}
    clock.advance(20)
    clock.advance(20)
    assert events[0] == [0]
    assert events[1] == [-EINPROGRESS, 0]           # notice first, then the result
    assert events[2] == []
    st = eng.stats()
    assert (st["backlogged"], st["rejected_full"], st["completed"]) == (1, 1, 2)
    # the refused page is done in software by complete(), as IAA falls back
    soft = get_compressor("lz4")
    for i in range(3):
        sc = tfm.complete(reqs[i], 0 if i < 2 else -ENOSPC)
        assert list(sc.states) == [scan.COMP]
        assert soft.decompress(sc.objs[0]) == text_page(i)
    assert eng.stats()["fallbacks"] == 1


def test_crypto_wait_req_waits_for_the_engine(closing):
    clock = FakeClock()
    eng = Engine(queues=2, latency_us=5, mode="async", clock=clock)
    closing(eng)
    cs = ContextSet("lz4", n=1, engine=eng)
    closing(cs)
    ctx = cs.get()
    got = []
    t = threading.Thread(target=lambda: got.append(compressed(ctx, [text_page(5)], timeout=10)))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while eng.stats()["submitted"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)                   # the submitter is another thread
        assert not got
        clock.advance(100)
    finally:
        t.join(10)
    cs.put(ctx)
    assert get_compressor("lz4").decompress(got[0][0]) == text_page(5)
    assert eng.stats()["fallbacks"] == 0


def test_sync_engine_polls_inside_compress(closing):
    eng = Engine(queues=2, latency_us=3, mode="sync")
    closing(eng)
    tfm = AcompTransform("zstd", 3, engine=eng)
    assert not tfm.is_async
    req = tfm.alloc_request()
    req.set_compress(text_page(9))
    assert tfm.compress(req) == 0                # IAA sync: the result, not -EINPROGRESS
    sc = tfm.complete(req, 0)
    assert get_compressor("zstd", 3).decompress(sc.objs[0]) == text_page(9)
    assert eng.stats()["fallbacks"] == 0


def test_late_completion_does_not_corrupt_a_reused_context(closing):
    clock = FakeClock()
    eng = Engine(queues=1, depth=8, latency_us=10, throughput_mbps=1e9, mode="async", clock=clock)
    closing(eng)
    cs = ContextSet("lz4", n=1, engine=eng)
    closing(cs)
    with cs.context() as ctx:
        # nobody advances the clock: the deadline passes and software does the page
        first = compressed(ctx, [text_page(1)], timeout=0.05)
        assert get_compressor("lz4").decompress(first[0]) == text_page(1)
        assert eng.stats()["fallbacks"] == 1
        gen_a = ctx.req.gen
        # reuse the context for page 2 while page 1's completion is still in the engine
        got = []
        t = threading.Thread(target=lambda: got.append(compressed(ctx, [text_page(2)], timeout=10)))
        t.start()
        try:
            deadline = time.monotonic() + 10
            while eng.stats()["submitted"] < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
            clock.advance(15)               # page 1 completes first (10 us + 3.6 us irq): stale
            assert ctx.tfm.stale_completions == 1 and not got
            clock.advance(10)
        finally:
            t.join(10)
        assert ctx.req.gen > gen_a and ctx.wait.err == 0
        assert get_compressor("lz4").decompress(got[0][0]) == text_page(2)
        assert eng.stats()["fallbacks"] == 1    # page 2 came from the engine


# ---- context sets ------------------------------------------------------------------------------


def test_get_put_is_bounded(closing):
    cs = ContextSet("lz4", n=2)
    closing(cs)
    assert cs.live == 2
    a, b = cs.get(), cs.get()
    assert a is not b
    with pytest.raises(AcompTimeout):
        cs.get(timeout=0.05)
    got = []
    t = threading.Thread(target=lambda: got.append(cs.get(timeout=10)))
    t.start()
    try:
        t.join(0.1)
        assert not got                      # the third get blocks ...
        cs.put(a)
    finally:
        t.join(10)
    assert got == [a]                       # ... until a put
    cs.put(b)
    cs.put(got[0])
    cs.close()
    assert cs.live == 0


def test_get_put_under_contention_loses_no_wakeup(closing):
    """get() pops and put() appends without a lock; a get() that found none free must still be
    woken by the next put (it counts itself as a waiter before it looks). 6 threads share 2
    contexts 3000 times; a lost wake-up would hang a getter until its timeout (AcompTimeout)."""
    cs = ContextSet("lz4", n=2)
    closing(cs)
    owners: dict[int, int] = {}
    errors: list[BaseException] = []
    owners_lock = threading.Lock()

    def worker():
        try:
            for _ in range(500):
                ctx = cs.get(timeout=5)
                with owners_lock:
                    assert id(ctx) not in owners, "one context handed to two threads"
                    owners[id(ctx)] = threading.get_ident()
                time.sleep(0)               # let another thread find the set empty
                with owners_lock:
                    del owners[id(ctx)]
                cs.put(ctx)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    assert sorted(map(id, (cs.get(), cs.get()))) == sorted(map(id, cs._contexts))


class BarrierCompressor(Compressor):
    """A compressor fake: each compress() waits for another thread's compress() to arrive."""

    name = "lz4"

    def __init__(self, barrier):
        self.inner = get_compressor("lz4")
        self.barrier = barrier
        self.tids = set()

    def compress(self, src):
        self.tids.add(threading.get_ident())
        self.barrier.wait()                 # raises BrokenBarrierError after its timeout
        return self.inner.compress(src)

    def _decompress(self, src, out_len):
        return self.inner.decompress(src, out_len)


def test_two_threads_compress_at_the_same_time(closing):
    cs = ContextSet("lz4", n=2)
    closing(cs)
    barrier = threading.Barrier(2, timeout=5)
    results = []

    def one(i):
        with cs.context() as ctx:
            real, ctx.tfm.compressor = ctx.tfm.compressor, BarrierCompressor(barrier)
            try:
                results.append(compressed(ctx, [text_page(i)]))
            finally:
                ctx.tfm.compressor = real
    ts = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert len(results) == 2 and not barrier.broken


def test_one_compress_call_uses_two_threads(closing):
    # zstd: lz4 is not split (it uses the second core through the store's write-behind pipeline)
    cs = ContextSet("zstd", n=2, split_min=8)
    closing(cs)
    barrier = threading.Barrier(2, timeout=5)
    fakes = []
    reals = []
    for ctx in cs._contexts:
        reals.append(ctx.tfm.compressor)
        ctx.tfm.compressor = BarrierCompressor(barrier)
        fakes.append(ctx.tfm.compressor)
    pages = [text_page(i) for i in range(32)]
    comp = compressed(cs, pages)             # each page meets one page of the other chunk
    assert all(isinstance(c, bytes) for c in comp), comp
    assert len(set().union(*(f.tids for f in fakes))) == 2
    assert cs.decompress(comp) == pages
    # below the split threshold the caller's thread does it all (no barrier partner: the real
    # compressors again)
    for ctx, real in zip(cs._contexts, reals):
        ctx.tfm.compressor = real
    cs.worker_tids.clear()
    assert cs.decompress(compressed(cs, pages[:4]), join=True) == b"".join(pages[:4])
    assert cs.worker_tids == set()


def test_compress_results_and_errors(closing):
    cs = ContextSet("lz4", n=2)
    closing(cs)
    pages = [text_page(i) for i in range(200)] + [os.urandom(PAGE_SIZE), bytes(PAGE_SIZE)]
    comp = compressed(cs, pages)
    assert comp[200] == -ENOSPC
    assert all(isinstance(c, bytes) and len(c) < PAGE_SIZE for i, c in enumerate(comp) if i != 200)
    srcs = [c for c in comp if isinstance(c, bytes)] + [b"\x00garbage"]
    back = cs.decompress(srcs)
    assert back[:-1] == [p for i, p in enumerate(pages) if i != 200]
    assert isinstance(back[-1], CompressionError)
    with pytest.raises(CompressionError):
        cs.decompress([b"\x00garbage"], join=True)
    assert cs.decompress([comp[0]], join=True) == pages[0]


@pytest.mark.parametrize("accelerator", ["none", "sim"])
def test_contexts_hold_no_buffer_after_a_request(closing, accelerator):
    """A context's request lets go of its source and result once the caller has them: a 1 MiB
    write buffer or read reply must not stay alive per context until the context's next use."""
    eng = None
    if accelerator == "sim":
        eng = Engine(queues=2, latency_us=3, mode="sync")
        closing(eng)
    cs = ContextSet("lz4", n=2, engine=eng)
    closing(cs)
    buf = b"".join(text_page(i) for i in range(64))
    sc = cs.compress(buf)
    assert cs.decompress(sc.objs, join=True) == buf
    assert cs.decompress(sc.objs[:2]) == [buf[:PAGE_SIZE], buf[PAGE_SIZE:2 * PAGE_SIZE]]
    with pytest.raises(CompressionError):
        cs.decompress([b"\x00garbage"], join=True)
    for ctx in cs._contexts:
        req = ctx.req
        assert (req.src, req.scan, req.dst, req.results) == (b"", None, None, None)


class BrokenCompressor(Compressor):
    """Returns a non-bytes object: a bug that must reach the caller, not vanish in a worker."""

    def compress(self, src):
        return None


def test_worker_exception_reaches_the_caller(closing):
    cs = ContextSet("zstd", n=2, split_min=4)      # zstd batches are split across threads
    closing(cs)
    cs._contexts[0].tfm.compressor = cs._contexts[1].tfm.compressor = BrokenCompressor()
    with pytest.raises(TypeError):
        cs.compress(b"".join(text_page(i) for i in range(16)))
    assert len(cs._free) == 2                # every context came back


def test_lzo_is_not_split_and_close_is_bounded(closing):
    cs = ContextSet("lzo", n=2)
    pages = [text_page(i) for i in range(64)]
    assert cs.decompress(compressed(cs, pages)) == pages
    assert cs._workers is None               # python-lzo holds the GIL: never split
    cs.close()
    cs.close()                               # idempotent
    cs2 = ContextSet("zstd", 3, n=2)
    cs2.compress(b"".join(pages))
    workers = cs2._workers._threads
    t0 = time.monotonic()
    cs2.close()
    assert time.monotonic() - t0 < 5 and not any(t.is_alive() for t in workers)


@pytest.mark.parametrize("alg", ["zstd", "deflate"])
def test_one_context_runs_a_big_batch_of_a_splitting_algorithm_itself(closing, alg):
    """`--contexts 1` with zstd or deflate: nothing to split across, no worker to wait for (a
    64-page request once waited 60 s on a latch no worker would count down)."""
    cs = ContextSet(alg, n=1, split_min=4, get_timeout=5)
    closing(cs)
    buf = b"".join(text_page(i) for i in range(64))
    sc = cs.compress(buf)
    assert cs.decompress(sc.objs, join=True) == buf
    assert cs._workers is None
