"""Random 4 KiB: fio randwrite and randread IOPS, 2 jobs, psync, O_DIRECT, on a disk first filled
with the `mix` set; zblock (also over FUSE io_uring: zblock-uring) against the same references as
the sequential benchmark, one run, order rotated each round, medians.

Targets: against the bare libfuse 3 memory file (the old ceiling) zblock >= 2.5x its random
writes (zblock's native front end writes in parallel) and >= 0.9x its random reads (issue "native
FUSE front end"); against the same file on the native front end (the new ceiling) reported.
"""

import contextlib

import pytest

import harness as h


@pytest.mark.timeout(3600)
def test_random_4k():
    size, rounds, seconds = h.bench_size(), h.bench_rounds(), h.fio_seconds()
    mix = h.dataset("mix", size)
    h.warm(mix)
    rep = h.Report("random", f"Random 4 KiB fio, 2 jobs, psync, O_DIRECT, {seconds:g} s each, "
                             f"IOPS, median of {rounds}")
    targets = h.reference_targets(size) + [
        h.ZblockTarget(size), h.ZblockTarget(size, ["--fuse-impl", "mfusepy"], "zblock-mfusepy"),
        h.ZblockTarget(size, ["--fuse-uring", "on"], "zblock-uring")]
    with contextlib.ExitStack() as stack:
        if h.wanted("zblock-uring"):
            try:
                stack.enter_context(h.fuse_uring_enabled())
            except h.TargetUnavailable as e:
                rep.skipped["zblock-uring"] = str(e)
                targets.pop()
        live = stack.enter_context(h.started(targets, rep.skipped))
        for t in live:
            h.dd_write(mix, t.path, size)
            h.verify(t, mix, size)
        for rnd in range(rounds):
            for t in h.rotated(live, rnd):
                rep.add(t.name, "randwrite_iops", h.fio(t.path, "randwrite", size, seconds))
                rep.add(t.name, "randread_iops", h.fio(t.path, "randread", size, seconds))
        for t in live:
            rep.targets_info[t.name] = t.info()
    rep.check("randwrite_iops vs memfile libfuse 3", "zblock", "randwrite_iops", "memfile-fuse3",
              at_least=2.5)
    rep.check("randread_iops vs memfile libfuse 3", "zblock", "randread_iops", "memfile-fuse3",
              at_least=0.9)
    for m in ("randwrite_iops", "randread_iops"):
        rep.check(f"{m} vs memfile native", "zblock", m, "memfile-native", at_least=0.8)
    rep.emit()
    if "zblock" in rep.skipped:
        pytest.skip(f"references measured; {rep.skipped['zblock']}")
