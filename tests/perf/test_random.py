"""Random 4 KiB: fio randwrite and randread IOPS, 2 jobs, psync, O_DIRECT, on a disk first filled
with the `mix` set; zblock against the same references as the sequential benchmark, one run,
order rotated each round, medians.

Target (issue "Performance"): zblock >= 0.8x the bare libfuse 3 memory file's IOPS both ways.
"""

import pytest

import harness as h


@pytest.mark.timeout(3600)
def test_random_4k():
    size, rounds, seconds = h.bench_size(), h.bench_rounds(), h.fio_seconds()
    mix = h.dataset("mix", size)
    h.warm(mix)
    rep = h.Report("random", f"Random 4 KiB fio, 2 jobs, psync, O_DIRECT, {seconds:g} s each, "
                             f"IOPS, median of {rounds}")
    targets = h.reference_targets(size) + [h.ZblockTarget(size)]
    with h.started(targets, rep.skipped) as live:
        for t in live:
            h.dd_write(mix, t.path, size)
            h.verify(t, mix, size)
        for rnd in range(rounds):
            for t in h.rotated(live, rnd):
                rep.add(t.name, "randwrite_iops", h.fio(t.path, "randwrite", size, seconds))
                rep.add(t.name, "randread_iops", h.fio(t.path, "randread", size, seconds))
        for t in live:
            rep.targets_info[t.name] = t.info()
    for m in ("randwrite_iops", "randread_iops"):
        rep.check(f"{m} vs memfile libfuse 3", "zblock", m, "memfile-fuse3", at_least=0.8)
    rep.emit()
    if "zblock" in rep.skipped:
        pytest.skip(f"references measured; {rep.skipped['zblock']}")
