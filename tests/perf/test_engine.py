"""Engine: batch submission vs page-at-a-time on the simulated engine's own clock.

8 serial queues, 50 us per page (latency 50 us, throughput so high that bytes cost ~nothing),
a 128 KiB write = 32 pages of the `mix` set's non-zero pages, compressed through
zblock.acomp.ContextSet with the engine: page-at-a-time (one acomp request per page, the seed's
model: submit one, wait, next) vs one batch (one request of 32 pages, submitted at one engine
time, one wait). Engine time
of each comes from the engine's `model_wait_us` (exact, on the model clock, not wall time).
Ideal speed-up = min(queues, pages) = 8.

Target (issue "Performance"): batch reaches >= 0.75x the ideal speed-up on the engine clock.
"""

import time

import pytest

import harness as h

QUEUES, LAT_US, PAGES, REPEAT = 8, 50.0, 32, 25


@pytest.mark.timeout(600)
def test_engine_batch_speedup():
    from zblock.acomp import ContextSet
    from zblock.accel import Engine
    mix = h.dataset("mix")
    pages = []
    with open(mix, "rb") as f:
        while len(pages) < PAGES:
            p = f.read(h.PAGE_SIZE)
            if p.strip(b"\0"):
                pages.append(p)
    rep = h.Report("engine", f"Engine: {PAGES}-page (128 KiB) write, {QUEUES} queues, "
                             f"{LAT_US:g} us/page, engine clock, median of {REPEAT}")
    with Engine(queues=QUEUES, depth=128, latency_us=LAT_US, throughput_mbps=1e9, mode="sync",
                batch=PAGES) as eng, ContextSet("lz4", engine=eng, n=2) as cs:
        for r in range(REPEAT):
            for mode in h.rotated(["page", "batch"], r):
                before = eng.stats()["model_wait_us"]
                t0 = time.perf_counter()
                if mode == "page":
                    for p in pages:
                        cs.compress(p)
                else:
                    cs.compress(b"".join(pages))
                wall = (time.perf_counter() - t0) * 1e6
                rep.add(mode, "engine_us", eng.stats()["model_wait_us"] - before)
                rep.add(mode, "wall_us", wall)
        st = eng.stats()
    ideal = min(QUEUES, PAGES)
    speedup = rep.value("page", "engine_us") / rep.value("batch", "engine_us")
    rep.add("batch", "speedup", speedup)
    rep.add("batch", "frac_of_ideal", speedup / ideal)
    rep.add("batch", "wall_speedup", rep.value("page", "wall_us") / rep.value("batch", "wall_us"))
    rep.check_value(f"batch speed-up / ideal ({ideal}x), engine clock", "batch", "frac_of_ideal",
                    at_least=0.75)
    rep.targets_info["engine"] = st
    rep.emit()
