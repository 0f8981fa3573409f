"""Sequential: `dd bs=1M` O_DIRECT write then read of 256 MiB, on `mix` and `usr`, zblock against
kernel zram lz4, nbdkit memory allocator=zstd + nbdfuse, and the bare Python FUSE memory file on
libfuse 3 and 2 -- all in one run, order rotated each round, medians (DESIGN.md "Performance").

Targets (issue "Performance"): write >= 0.5x zram on mix, >= 0.75x on usr, >= 2x nbdkit on both;
read >= 2x nbdkit and >= 0.4x the libfuse 3 memory file. Missed targets are reported, not failed;
a verify mismatch or a failed dd fails the run.
"""

import pytest

import harness as h

DATASETS = ("mix", "usr")


@pytest.mark.timeout(3600)
def test_sequential():
    size, rounds = h.bench_size(), h.bench_rounds()
    data = {name: h.dataset(name, size) for name in DATASETS}
    for path in data.values():
        h.warm(path)
    rep = h.Report("seq", f"Sequential dd bs=1M O_DIRECT, {size >> 20} MiB, MB/s, median of {rounds}")
    targets = h.reference_targets(size) + [h.ZblockTarget(size)]
    with h.started(targets, rep.skipped) as live:
        for ds, path in data.items():
            for rnd in range(rounds):
                for t in h.rotated(live, rnd):
                    rep.add(t.name, f"write_{ds}", size / 1e6 / h.dd_write(path, t.path, size))
                    if rnd == 0:
                        h.verify(t, path, size)
                    rep.add(t.name, f"read_{ds}", size / 1e6 / h.dd_read(t.path, size))
        for t in live:
            rep.targets_info[t.name] = t.info()
    for ds, zram_need in (("mix", 0.5), ("usr", 0.75)):
        rep.check(f"seq write {ds} vs zram lz4", "zblock", f"write_{ds}", "zram-lz4", at_least=zram_need)
        rep.check(f"seq write {ds} vs nbdkit+nbdfuse", "zblock", f"write_{ds}", "nbdkit-zstd", at_least=2)
        rep.check(f"seq read {ds} vs nbdkit+nbdfuse", "zblock", f"read_{ds}", "nbdkit-zstd", at_least=2)
        rep.check(f"seq read {ds} vs memfile libfuse 3", "zblock", f"read_{ds}", "memfile-fuse3",
                  at_least=0.4)
    rep.emit()
    if "zblock" in rep.skipped:
        pytest.skip(f"references measured; {rep.skipped['zblock']}")
