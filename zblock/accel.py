"""The simulated hardware compression engine (an Intel IAA / HiSilicon ZIP stand-in).

What it models (DESIGN.md "The simulated engine"):
  - `queues` work queues, each serving ONE request at a time, each holding up to `depth`
    accepted requests (in service + waiting). A request costs
    `latency_us + bytes / throughput_mbps` of queue time (bytes = input for compress, output
    for decompress; MB = 1e6 bytes, so MB/s = bytes/us). A new request goes to the queue that
    frees first among those with room, so completions come out of order across queues.
  - crypto API submit semantics: accepted (-EINPROGRESS); all queues full and MAY_BACKLOG:
    accepted into a software backlog (-EBUSY, `backlogged`), the request's `on_notice` gets the
    -EINPROGRESS notice when it moves into a queue, then `on_done` gets the result; all queues
    full without MAY_BACKLOG: -ENOSPC (`rejected_full`), as `crypto_enqueue_request` answers.
  - mode "sync" (IAA sync: the submitter polls; no interrupt) or "async" (IAA async_irq: the
    completion interrupt adds `irq_us` to each request's completion time, 6.8 vs 3.2 us per
    4 KiB compress in the published IAA figures, reference §3.4).
  - seeded faults (`fault_rate`, `seed`) on compress and decompress: the request completes
    with -EIO (IAA's analytics error); callers fall back to software. `set_fault()` scripts
    harder failures: "error" (every request fails), "hang" (accepted, never completes: the
    caller's deadline expires, as IAA's completion-poll timeout), "dead" (the engine is gone:
    pending requests fail with -ENODEV, new ones are refused with -ENODEV). close() is "dead"
    plus stopping the device thread.

Time. Every request's times are computed on the ENGINE CLOCK from the model alone (submit
time, queue free time, service time), so latencies, busy time and speed-ups are exact and
reproducible. The default clock follows wall time (microseconds since the engine started); the
device thread really waits (Condition.wait with a timeout, never a sleep loop) only while the
model runs ahead of wall time. A FakeClock can be injected instead: nothing completes until the
test calls `clock.advance(us)`, which returns once every completion that became due has been
delivered (callbacks run, in the device thread).

The work is real: the device thread compresses with the software library (the output is the
same stream, so the software path decompresses it — IAA falls back to deflate-generic), but its
cost is charged to the engine clock, not to the host. Host CPU per page is what submitters
report through `note_host_cpu` (their thread_time across submit + wait).

Lock protocol: `_cond` (one Condition over `_lock`) guards every mutable field of the engine:
queue state, heap, backlog, counters, the latency reservoir, fault mode. It is never held while
compressing or while running a callback (callbacks may submit again). The device thread is the
only thread that touches `_codecs` (compressor instances are not thread-safe).

Not modelled: DMA, address translation, per-device work-queue mapping by NUMA node; hw_batch
only sets how many requests one submission carries (one lock hold); the waiter is woken once
per batch (zblock.acomp completes a request once, after its last page).
"""

from __future__ import annotations

import errno
import heapq
import logging
import random
import threading
import time
from collections import deque
from typing import Callable, Sequence

from . import PAGE_SIZE, cpus
from .compressors import get_compressor

log = logging.getLogger(__name__)

__all__ = ["Engine", "HwJob", "MonotonicClock", "FakeClock", "FAULT_MODES"]

FAULT_MODES = (None, "error", "hang", "dead")

# Latency percentiles come from a bounded reservoir (Vitter's algorithm R): exact up to this
# many samples, a uniform sample after; memory stays constant however long the engine runs.
_RESERVOIR = 8192

# A join longer than this at close() means the device thread is stuck in a callback.
_JOIN_TIMEOUT = 5.0


# ---------------------------------------------------------------------------------------------
# clocks (microseconds)


class MonotonicClock:
    """Engine time that follows wall time: microseconds since the clock was made."""

    fake = False

    def __init__(self):
        self._t0 = time.monotonic_ns()

    def now(self) -> float:
        return (time.monotonic_ns() - self._t0) / 1000.0

    def attach(self, engine) -> None:
        pass

    def detach(self, engine) -> None:
        pass


class FakeClock:
    """Time that moves only when a test says so; advance() releases what became due.

    advance() returns when every attached engine has delivered all completions due at the new
    time (their callbacks have run), or raises TimeoutError after `timeout` seconds.
    """

    fake = True

    def __init__(self, start_us: float = 0.0):
        self._now = float(start_us)
        self._engines: list[Engine] = []
        self._lock = threading.Lock()     # guards _now and _engines

    def now(self) -> float:
        return self._now

    def attach(self, engine) -> None:
        with self._lock:
            self._engines.append(engine)

    def detach(self, engine) -> None:
        with self._lock:
            if engine in self._engines:
                self._engines.remove(engine)

    def advance(self, us: float, timeout: float = 5.0) -> float:
        if us < 0:
            raise ValueError("time does not go backwards")
        with self._lock:
            self._now += us
            engines = list(self._engines)
        for e in engines:
            e.settle(timeout)
        return self._now


# ---------------------------------------------------------------------------------------------
# requests and batches


class HwJob:
    """One request as the engine sees it. Made fresh per submission (never reused), so a late
    completion can only ever touch its own job; `cookie` carries the submitter's generation.

    on_done(job, err) runs once, in the device thread, with job.result set (bytes) when err==0.
    on_notice(job, -EINPROGRESS) runs first if the job was backlogged.
    """

    __slots__ = ("op", "src", "cap", "out_len", "codec", "on_done", "on_notice", "cookie",
                 "result", "err", "fault", "t_submit", "t_done", "queue", "seq")

    def __init__(self, op: str, src, codec: tuple, cap: int = PAGE_SIZE, out_len: int = PAGE_SIZE,
                 on_done: Callable | None = None, on_notice: Callable | None = None, cookie=None):
        self.op = op                  # "compress" | "decompress"
        self.src = src
        self.codec = codec            # (algorithm, level)
        self.cap = cap                # destination capacity (dlen in)
        self.out_len = out_len        # decompress: expected output length
        self.on_done = on_done
        self.on_notice = on_notice
        self.cookie = cookie
        self.result = None
        self.err = None               # None while pending; 0 or -errno when done
        self.fault = False
        self.t_submit = 0.0
        self.t_done = 0.0
        self.queue = -1
        self.seq = 0


# ---------------------------------------------------------------------------------------------
# the engine


class Engine:
    """A simulated compression engine with real bounded queues on its own clock."""

    def __init__(self, queues: int = 4, depth: int = 128, latency_us: float = 3.0,
                 throughput_mbps: float = 2000.0, mode: str = "sync", batch: int = 8,
                 fault_rate: float = 0.0, seed: int = 0, clock=None, *,
                 irq_us: float = 3.6, backlog_limit: int | None = None):
        if int(queues) < 1:
            raise ValueError(f"queues: {queues} must be >= 1")
        if int(depth) < 1:
            raise ValueError(f"depth: {depth} must be >= 1")
        if latency_us < 0:
            raise ValueError(f"latency_us: {latency_us} must be >= 0")
        if not throughput_mbps > 0:
            raise ValueError(f"throughput_mbps: {throughput_mbps} must be > 0")
        if mode not in ("sync", "async"):
            raise ValueError(f"mode: {mode!r} is not sync or async")
        if not 1 <= int(batch) <= 256:
            raise ValueError(f"batch: {batch} is out of range (1..256)")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate: {fault_rate} is out of range (0..1)")
        self.queues = int(queues)
        self.depth = int(depth)
        self.latency_us = float(latency_us)
        self.throughput_mbps = float(throughput_mbps)
        self.mode = mode
        self.batch = int(batch)
        self.fault_rate = float(fault_rate)
        self.seed = int(seed)
        self.irq_us = float(irq_us) if mode == "async" else 0.0
        # MAY_BACKLOG requests wait in software; bounded so a runaway submitter meets
        # -ENOSPC rather than growing memory. zswap's submitters are bounded anyway
        # (contexts x 256 pages), far below the default.
        self.backlog_limit = int(backlog_limit) if backlog_limit is not None else 64 * self.queues * self.depth
        self.clock = clock if clock is not None else MonotonicClock()

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._rng = random.Random(self.seed)
        self._q_free = [0.0] * self.queues       # engine time each queue finishes its last job
        self._q_count = [0] * self.queues        # accepted, undelivered jobs per queue (<= depth)
        self._inflight = 0                       # sum(_q_count)
        self._heap: list[tuple[float, int, HwJob]] = []   # (t_done, seq, job) of queued jobs
        self._backlog: deque[HwJob] = deque()
        self._hung: list[HwJob] = []
        self._seq = 0
        self._fault_mode = None
        self._closed = False
        self._delivering = False
        self.failure: BaseException | None = None   # first callback exception (re-raised by close)

        # stats (guarded by _lock)
        self._submitted = self._completed = self._backlogged = self._rejected_full = 0
        self._errors = self._fallbacks = self._inflight_max = self._late = 0
        self._busy_us = 0.0
        self._model_wait_us = 0.0
        self._host_cpu_ns = 0
        self._host_pages = 0
        self._lat: list[float] = []
        self._lat_seen = 0
        self._lat_max = 0.0
        self._lat_rng = random.Random(self.seed ^ 0x5EED)

        self._codecs: dict[tuple, object] = {}   # device thread only
        self.clock.attach(self)
        self._thread = threading.Thread(target=self._device, name="zblock-engine", daemon=True)
        self._thread.start()

    # ---- submission -------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock.now()

    def submit(self, job: HwJob, may_backlog: bool = True, t_submit: float | None = None) -> int:
        """Submit one job: -EINPROGRESS, -EBUSY (backlogged), -ENOSPC (full) or -ENODEV."""
        return self.submit_batch((job,), may_backlog, t_submit)[0]

    def submit_batch(self, jobs: Sequence[HwJob], may_backlog: bool = True,
                     t_submit: float | None = None) -> list[int]:
        """Submit jobs at one engine time (`t_submit`, default now): one lock hold for all.

        A caller that submits one write in several batches passes the same t_submit to each,
        so the model sees the write submitted at once whatever Python's pace.
        """
        out = []
        with self._cond:
            t = self.clock.now() if t_submit is None else t_submit
            dead = self._closed or self._fault_mode == "dead"
            for job in jobs:
                if dead:
                    self._errors += 1
                    out.append(-errno.ENODEV)
                    continue
                job.t_submit = t
                job.fault = self.fault_rate > 0.0 and self._rng.random() < self.fault_rate
                if self._inflight < self.queues * self.depth:
                    self._enqueue_locked(job, t)
                    out.append(-errno.EINPROGRESS)
                elif may_backlog and len(self._backlog) < self.backlog_limit:
                    self._backlog.append(job)
                    self._backlogged += 1
                    out.append(-errno.EBUSY)
                else:
                    self._rejected_full += 1
                    out.append(-errno.ENOSPC)
                    continue
                self._submitted += 1
            self._cond.notify_all()
        return out

    def _enqueue_locked(self, job: HwJob, t_enter: float) -> None:
        """Put a job in the queue with room that frees first. Caller holds _lock and has checked
        that some queue has room."""
        depth, q_count, q_free = self.depth, self._q_count, self._q_free
        best = -1
        for q in range(self.queues):
            if q_count[q] < depth and (best < 0 or q_free[q] < q_free[best]):
                best = q
        nbytes = len(job.src) if job.op == "compress" else job.out_len
        service = self.latency_us + nbytes / self.throughput_mbps
        start = t_enter if t_enter > q_free[best] else q_free[best]
        q_free[best] = start + service
        q_count[best] += 1
        self._busy_us += service
        self._inflight += 1
        if self._inflight > self._inflight_max:
            self._inflight_max = self._inflight
        job.queue = best
        job.t_done = start + service + self.irq_us
        self._seq += 1
        job.seq = self._seq
        heapq.heappush(self._heap, (job.t_done, job.seq, job))

    # ---- the device thread ------------------------------------------------------------------

    def _device(self) -> None:
        cpus.unpin()                        # maybe made on a pinned thread (a param write)
        cond = self._cond
        while True:
            with cond:
                while True:
                    if self._closed or self._fault_mode == "dead":
                        due = self._fail_all_locked()
                        if due or self._closed:
                            break
                        cond.notify_all()
                        cond.wait()                     # dead: nothing to do until close
                        continue
                    now = self.clock.now()
                    heap = self._heap
                    due = []
                    while heap and heap[0][0] <= now:
                        due.append(heapq.heappop(heap)[2])
                    if due and self._fault_mode == "hang":
                        self._hung.extend(due)          # stuck in the device: never delivered
                        due = []
                    if due:
                        break
                    if heap and not self.clock.fake:
                        # the model is ahead of wall time: the one real wait of the engine
                        cond.wait((heap[0][0] - now) / 1e6)
                    else:
                        cond.notify_all()               # settle() waiters: nothing is due
                        cond.wait()
                self._delivering = True
                stop = self._closed
            for job in due:
                if job.err is None:
                    self._work(job)
            with cond:
                notices = self._retire_locked(due)
            try:
                for job in notices:
                    if job.on_notice is not None:
                        job.on_notice(job, -errno.EINPROGRESS)
                for job in due:
                    if job.on_done is not None:
                        job.on_done(job, job.err)
            except BaseException as e:       # no callback exception is lost: close() raises it
                log.critical("zblock engine: completion callback failed: %r", e)
                with cond:
                    if self.failure is None:
                        self.failure = e
            finally:
                with cond:
                    self._delivering = False
                    cond.notify_all()
            if stop and not due:
                return
            if stop:
                with cond:
                    if not (self._heap or self._backlog or self._hung):
                        return

    def _work(self, job: HwJob) -> None:
        """Do the job's compression for real (device thread only); cost is on the model clock."""
        if job.fault:
            job.err = -errno.EIO
            return
        codec = self._codecs.get(job.codec)
        if codec is None:
            codec = self._codecs[job.codec] = get_compressor(*job.codec)
        try:
            if job.op == "compress":
                out = codec.compress(job.src)
                if len(out) >= job.cap:          # zswap 6.18: dlen >= PAGE_SIZE is "poor"
                    job.err = -errno.ENOSPC
                    return
            else:
                out = codec.decompress(job.src, job.out_len)
        except Exception:
            job.err = -errno.EIO                 # IAA analytics error: caller falls back
            return
        job.result = out
        job.err = 0

    def _fail_all_locked(self) -> list[HwJob]:
        """The engine is gone: every pending job completes with -ENODEV. Caller holds _lock."""
        jobs = [j for _, _, j in self._heap] + list(self._backlog) + self._hung
        self._heap.clear()
        self._backlog.clear()
        self._hung = []
        for j in jobs:
            j.err = -errno.ENODEV
            j.result = None
        return jobs

    def _retire_locked(self, due: list[HwJob]) -> list[HwJob]:
        """Account delivered jobs, free their slots and move backlog into them. Returns the
        backlogged jobs that just entered a queue (they get their notice). Caller holds _lock."""
        notices = []
        for job in due:
            if job.queue >= 0:
                self._q_count[job.queue] -= 1
                self._inflight -= 1
            if job.err == 0 or job.err == -errno.ENOSPC:
                self._completed += 1
            else:
                self._errors += 1
            if job.err != -errno.ENODEV:
                self._note_latency_locked(job.t_done - job.t_submit)
                # the freed slot takes the oldest backlogged job at the model time it freed
                if self._backlog and self._inflight < self.queues * self.depth:
                    nxt = self._backlog.popleft()
                    t = job.t_done if job.t_done > nxt.t_submit else nxt.t_submit
                    self._enqueue_locked(nxt, t)
                    notices.append(nxt)
        if self._closed or self._fault_mode == "dead":
            self._inflight = 0
            self._q_count = [0] * self.queues
        return notices

    def _note_latency_locked(self, us: float) -> None:
        self._lat_seen += 1
        if us > self._lat_max:
            self._lat_max = us
        if len(self._lat) < _RESERVOIR:
            self._lat.append(us)
        else:
            i = self._lat_rng.randrange(self._lat_seen)
            if i < _RESERVOIR:
                self._lat[i] = us

    # ---- test and caller hooks --------------------------------------------------------------

    def settle(self, timeout: float = 5.0) -> None:
        """Return when no completion is due at the current engine time (fake clocks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while True:
                now = self.clock.now()
                pending = (self._heap and self._heap[0][0] <= now and self._fault_mode != "hang"
                           and not self._closed)
                if not pending and not self._delivering:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("engine did not deliver its due completions in time")
                self._cond.wait(left)

    def set_fault(self, mode: str | None) -> None:
        """Script a failure: None (healthy), "error", "hang", "dead" (see module docstring).
        Leaving "hang" releases the stuck jobs (they complete late)."""
        if mode not in FAULT_MODES:
            raise ValueError(f"fault mode {mode!r} is not one of {FAULT_MODES}")
        with self._cond:
            self._fault_mode = mode
            if mode == "error":
                self.fault_rate = 1.0
            if mode != "hang" and self._hung:
                for j in self._hung:
                    heapq.heappush(self._heap, (j.t_done, j.seq, j))
                self._hung = []
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return not self._closed and self._fault_mode != "dead"

    def note_fallback(self, pages: int = 1) -> None:
        with self._lock:
            self._fallbacks += pages

    def note_timeout(self, jobs: int = 1) -> None:
        with self._lock:
            self._errors += jobs

    def note_host_cpu(self, ns: int, pages: int) -> None:
        with self._lock:
            self._host_cpu_ns += ns
            self._host_pages += pages

    def note_wait(self, us: float) -> None:
        """A submitter waited `us` of engine time (from its submit to its last completion)."""
        with self._lock:
            self._model_wait_us += us

    def stats(self) -> dict:
        """The `hw` object of the stats (counters exact; percentiles exact up to 8192 samples)."""
        with self._lock:
            lat = sorted(self._lat)
            pages = self._host_pages

            def pct(p):
                if not lat:
                    return 0.0
                return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3)
            return {
                "submitted": self._submitted,
                "completed": self._completed,
                "backlogged": self._backlogged,
                "rejected_full": self._rejected_full,
                "errors": self._errors,
                "fallbacks": self._fallbacks,
                "inflight_max": self._inflight_max,
                "latency_us": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99),
                               "max": round(self._lat_max, 3)},
                "host_cpu_us_per_page": round(self._host_cpu_ns / 1000.0 / pages, 3) if pages else 0.0,
                "busy_us": round(self._busy_us, 3),
                "model_wait_us": round(self._model_wait_us, 3),
                "clock_us": round(self.clock.now(), 3),
                "inflight": self._inflight,
                "backlog": len(self._backlog),
                "mode": self.mode,
                "queues": self.queues,
                "depth": self.depth,
            }

    def close(self) -> None:
        """Stop the device thread (bounded join); pending jobs fail with -ENODEV. Idempotent.
        Re-raises the first exception a completion callback raised, if any."""
        with self._cond:
            first = not self._closed
            self._closed = True
            self._cond.notify_all()
        if first:
            self._thread.join(_JOIN_TIMEOUT)
            if self._thread.is_alive():
                log.warning("zblock engine: device thread did not stop within %.0f s", _JOIN_TIMEOUT)
            self.clock.detach(self)
        if self.failure is not None:
            e, self.failure = self.failure, None
            raise e

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
