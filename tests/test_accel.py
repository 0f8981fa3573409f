"""The simulated engine on its own clock: queues, backlog, ordering, batching, faults.

Tier: engine with fakes (a FakeClock whose completions the test releases). Engine-clock numbers
are deterministic, so the assertions on them are exact; nothing here asserts on wall time.
"""

import errno
import os

import pytest

from zblock import PAGE_SIZE
from zblock import scan
from zblock.accel import Engine, FakeClock, HwJob
from zblock.acomp import CRYPTO_TFM_REQ_MAY_BACKLOG, EINPROGRESS, AcompTransform, ContextSet
from pages import text_page

pytestmark = pytest.mark.timeout(30)

CODEC = ("lz4", None)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make_engine():
    engines = []

    def make(**kw):
        e = Engine(**kw)
        engines.append(e)
        return e
    yield make
    for e in engines:
        e.close()


def compressed(cs, pages, **kw) -> list:
    """Each page compressed by one request on `cs`: the stream, or None where it did not fit."""
    sc = cs.compress(b"".join(pages), raw_poor=False, **kw)
    return [o if st == scan.COMP else None for st, o in zip(sc.states, sc.objs)]


def recorder(log):
    def on_done(job, err):
        log.append(("done", job.cookie, err))

    def on_notice(job, err):
        log.append(("notice", job.cookie, err))
    return on_done, on_notice


def test_depth_bound_backlog_notice_then_result(clock, make_engine):
    eng = make_engine(queues=2, depth=4, latency_us=10, throughput_mbps=1e9, clock=clock)
    log = []
    done, notice = recorder(log)
    jobs = [HwJob("compress", text_page(i), CODEC, on_done=done, on_notice=notice, cookie=i)
            for i in range(12)]
    rets = [eng.submit(j, may_backlog=True) for j in jobs]
    assert rets == [-errno.EINPROGRESS] * 8 + [-errno.EBUSY] * 4
    st = eng.stats()
    assert st["inflight_max"] == 2 * 4 and st["backlogged"] == 4 and st["submitted"] == 12
    assert log == []                          # nothing completes until the clock moves
    for _ in range(6):
        clock.advance(10)
    clock.advance(0.01)                       # 4096 B at 1e9 MB/s add 4 ps per job
    assert sorted(c for k, c, _ in log if k == "done") == list(range(12))
    assert all(err == 0 for k, _, err in log if k == "done")
    for i in range(8, 12):                    # backlogged: notice (-EINPROGRESS) before result
        events = [(k, err) for k, c, err in log if c == i]
        assert events == [("notice", -errno.EINPROGRESS), ("done", 0)]
    st = eng.stats()
    assert st["inflight_max"] == 8 and st["completed"] == 12 and st["inflight"] == 0
    # the model is exact: 4 jobs per queue at 10 us, backlog entering freed slots at t=10
    assert st["latency_us"]["max"] == pytest.approx(60.0, abs=1e-3) and st["busy_us"] == pytest.approx(120.0, abs=0.01)


def test_full_without_backlog_is_enospc(clock, make_engine):
    eng = make_engine(queues=1, depth=2, latency_us=5, clock=clock)
    rets = [eng.submit(HwJob("compress", text_page(i), CODEC), may_backlog=False) for i in range(3)]
    assert rets == [-errno.EINPROGRESS, -errno.EINPROGRESS, -errno.ENOSPC]
    assert eng.stats()["rejected_full"] == 1 and eng.stats()["submitted"] == 2


def test_completions_out_of_order_across_queues(clock, make_engine):
    # 1 byte/us: a 4096-byte job on queue 0 takes 4097 us, a 10-byte one on queue 1 takes 11 us
    eng = make_engine(queues=2, depth=8, latency_us=1, throughput_mbps=1.0, clock=clock)
    log = []
    done, _ = recorder(log)
    eng.submit(HwJob("compress", text_page(0), CODEC, on_done=done, cookie="big"))
    eng.submit(HwJob("compress", b"x" * 10, CODEC, cap=64, on_done=done, cookie="small"))
    clock.advance(20)
    assert [c for _, c, _ in log] == ["small"]
    clock.advance(5000)
    assert [c for _, c, _ in log] == ["small", "big"]


def test_a_batch_request_completes_once(clock, make_engine):
    """16 pages in one request over 4 queues: its callback runs once, after the last page."""
    eng = make_engine(queues=4, depth=8, latency_us=10, throughput_mbps=1e9, clock=clock,
                      mode="async")
    tfm = AcompTransform("lz4", engine=eng)
    req = tfm.alloc_request()
    calls = []
    req.set_callback(CRYPTO_TFM_REQ_MAY_BACKLOG, lambda data, err: calls.append(err), None)
    pages = [text_page(i) for i in range(16)]
    req.set_compress(b"".join(pages))
    assert tfm.compress(req) == -EINPROGRESS
    for _ in range(3):
        clock.advance(10.01)
        assert calls == []                    # at most 12 of 16 done: not yet
    clock.advance(15)                         # the last 4 pages, and the completion interrupt
    assert calls == [0]
    sc = tfm.complete(req, 0)
    assert set(sc.states) == {scan.COMP}
    assert [tfm.compressor.decompress(o) for o in sc.objs] == pages
    assert eng.stats()["model_wait_us"] == pytest.approx(40 + 3.6, abs=0.1)


def test_faults_are_seeded_and_fall_back(make_engine):
    pages = [text_page(i) for i in range(64)] + [os.urandom(PAGE_SIZE)]
    errors = []
    for _ in range(2):
        eng = make_engine(queues=4, latency_us=0, fault_rate=0.3, seed=7)
        with ContextSet("lz4", n=2, engine=eng) as cs:
            comp = compressed(cs, pages)
            assert comp[-1] is None               # incompressible is a result, not a fault
            assert all(isinstance(c, bytes) and len(c) < PAGE_SIZE for c in comp[:-1])
            back = cs.decompress(comp[:-1])
            assert back == pages[:-1]             # engine and software output interchangeable
            assert cs.decompress([comp[3]], join=True) == pages[3]
            st = eng.stats()
            assert st["errors"] > 0 and st["fallbacks"] == st["errors"]
            errors.append(st["errors"])
    assert errors[0] == errors[1]                 # same seed, same faults


def test_hang_dead_and_close_fall_back(make_engine):
    pages = [text_page(i) for i in range(16)]
    eng = make_engine(queues=2, latency_us=0)
    with ContextSet("lz4", n=2, engine=eng, hw_timeout=0.2) as cs:
        eng.set_fault("hang")                     # accepted, never completes: deadline, software
        comp = compressed(cs, pages)
        assert cs.decompress(comp) == pages
        assert eng.stats()["fallbacks"] == 32 and eng.stats()["errors"] >= 16
        eng.set_fault(None)                       # the stuck jobs complete late, harmlessly
        eng.set_fault("dead")
        assert eng.submit(HwJob("compress", pages[0], CODEC)) == -errno.ENODEV
        comp = compressed(cs, pages)
        assert cs.decompress(comp) == pages
    # close() fails pending jobs with -ENODEV through their callbacks
    clock = FakeClock()
    eng2 = make_engine(queues=1, depth=4, latency_us=10, clock=clock)
    log = []
    done, _ = recorder(log)
    for i in range(6):
        eng2.submit(HwJob("compress", pages[i], CODEC, on_done=done, cookie=i))
    eng2.close()
    assert sorted(c for _, c, _ in log) == list(range(6))
    assert {err for _, _, err in log} == {-errno.ENODEV}


def test_batch_speedup_on_engine_clock(make_engine):
    """8 serial queues, 50 us per page: a 128 KiB write batched vs page at a time."""
    pages = [text_page(i) for i in range(32)]
    waits = {}
    for mode in ("page", "batch"):
        eng = make_engine(queues=8, depth=128, latency_us=50, throughput_mbps=1e12, batch=8)
        with ContextSet("lz4", n=2, engine=eng) as cs:
            # page at a time (the seed's model): a request per page, each waited for
            comp = [c for p in pages for c in compressed(cs, [p])] if mode == "page" \
                else compressed(cs, pages)
            waits[mode] = eng.stats()["model_wait_us"]
            assert cs.decompress(comp) == pages
    ideal = 8
    speedup = waits["page"] / waits["batch"]
    assert waits["page"] == pytest.approx(32 * 50, rel=1e-6)
    assert speedup >= 0.75 * ideal, waits
    print(f"engine clock: page-at-a-time {waits['page']:.0f} us, batch {waits['batch']:.0f} us, "
          f"speed-up {speedup:.2f} (ideal {ideal})")


def test_async_mode_charges_irq_and_latency_reservoir_is_bounded(make_engine):
    eng = make_engine(queues=1, latency_us=3, throughput_mbps=2000, mode="async")
    with ContextSet("lz4", n=1, engine=eng) as cs:
        cs.compress(text_page(0))
    lat = eng.stats()["latency_us"]
    assert lat["max"] == pytest.approx(3 + 4096 / 2000 + 3.6, abs=1e-3)
    eng2 = make_engine(queues=4, latency_us=0)
    with ContextSet("lz4", n=1, engine=eng2) as cs:
        page = text_page(1)
        for _ in range(40):
            cs.compress(page * 256)
    st = eng2.stats()
    assert st["completed"] == 40 * 256 and len(eng2._lat) <= 8192
    assert st["host_cpu_us_per_page"] > 0


def test_engine_validates_arguments():
    for kw in ({"queues": 0}, {"depth": 0}, {"mode": "irq"}, {"batch": 0}, {"fault_rate": 2},
               {"throughput_mbps": 0}):
        with pytest.raises(ValueError):
            Engine(**kw)
