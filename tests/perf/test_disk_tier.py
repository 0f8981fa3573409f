"""The disk tier against the backing disk itself (a preallocated file beside zblock's backing
files, O_DIRECT): in one run, order rotated each round, medians.

- Durable sequential write: `dd bs=1M oflag=direct conv=fsync` of 256 MiB, on `mix` and `usr`.
  zblock runs with its defaults (write-through off) and, as `zblock-wt`, with
  `--write-through Y`, to show what write-through is worth, and as `zblock-encrypt` with
  `--encrypt` (every page sealed on its way to the file: what encryption costs), and as
  `zblock-seqcut` with `--sequential-cutoff 4M` (bcache's default: past the first 4 MiB the
  stream goes to the file uncompressed, past the pool).
- Random 4 KiB reads of written-back pages: zblock with `--pool-limit 0` (every page is on disk
  once written), filled with `usr`, then fio randread as in test_random.py; the file holds the
  same bytes. `zblock-encrypt`: the same with `--encrypt`.

Both also measure `diskfile-native`: tests/perf/memfile.py --backing, a bare Python server on
zblock's native front end that only preads and pwrites the file with O_DIRECT. It is the ceiling
of any Python FUSE server over this disk: what is lost against the disk itself beyond it is the
FUSE round trip's, not zblock's.

Targets (issue "The disk tier at disk speed"): durable write >= 0.7x the disk, random reads of
written-back pages >= 0.8x. Reported, not failed; a verify mismatch or a failed dd or fio fails
the run.
"""

import pytest

import harness as h

DATASETS = ("mix", "usr")
DISK_NEED = 0.7
RANDREAD_NEED = 0.8


@pytest.mark.timeout(3600)
def test_durable_sequential_write():
    size, rounds = h.bench_size(), h.bench_rounds()
    data = {name: h.dataset(name, size) for name in DATASETS}
    for path in data.values():
        h.warm(path)
    rep = h.Report("durable", f"Durable sequential write, dd bs=1M O_DIRECT conv=fsync, "
                              f"{size >> 20} MiB, MB/s, median of {rounds}")
    targets = [h.DiskFileTarget(size), h.MemfileTarget(size, "native", on_disk=True),
               h.ZblockTarget(size),
               h.ZblockTarget(size, ["--write-through", "Y"], "zblock-wt"),
               h.ZblockTarget(size, ["--encrypt", "--key-file", h.bench_key()], "zblock-encrypt"),
               h.ZblockTarget(size, ["--sequential-cutoff", "4M"], "zblock-seqcut")]
    with h.started(targets, rep.skipped) as live:
        for ds, path in data.items():
            for rnd in range(rounds):
                for t in h.rotated(live, rnd):
                    rep.add(t.name, f"write_{ds}", size / 1e6 / h.dd_write_durable(path, t.path, size))
                    if rnd == 0:
                        h.verify(t, path, size)
        for t in live:
            rep.targets_info[t.name] = t.info()
    for ds in DATASETS:
        for t in ("zblock", "zblock-wt", "zblock-seqcut"):
            rep.check(f"durable write {ds} vs the backing disk", t, f"write_{ds}",
                      "backing-disk", at_least=DISK_NEED)
        rep.check(f"durable write {ds}: write-through against none", "zblock-wt", f"write_{ds}",
                  "zblock", at_least=1.0)
        rep.check(f"durable write {ds}: a bare Python FUSE server over the disk", "diskfile-native",
                  f"write_{ds}", "backing-disk", at_least=DISK_NEED)
    rep.emit()
    if "zblock" in rep.skipped:
        pytest.skip(f"references measured; {rep.skipped['zblock']}")


@pytest.mark.timeout(3600)
def test_random_reads_of_written_back_pages():
    size, rounds, seconds = h.bench_size(), h.bench_rounds(), h.fio_seconds()
    usr = h.dataset("usr", size)
    h.warm(usr)
    rep = h.Report("disk-randread", f"Random 4 KiB reads of written-back pages, fio 2 jobs, psync, "
                                    f"O_DIRECT, {seconds:g} s each, IOPS, median of {rounds}")
    targets = [h.DiskFileTarget(size), h.MemfileTarget(size, "native", on_disk=True),
               h.ZblockTarget(size, ["--pool-limit", "0"]),
               h.ZblockTarget(size, ["--pool-limit", "0", "--encrypt", "--key-file",
                                     h.bench_key()], "zblock-encrypt")]
    with h.started(targets, rep.skipped) as live:
        for t in live:
            h.dd_write_durable(usr, t.path, size)
            h.verify(t, usr, size)
        for rnd in range(rounds):
            for t in h.rotated(live, rnd):
                rep.add(t.name, "randread_iops", h.fio(t.path, "randread", size, seconds))
        for t in live:
            rep.targets_info[t.name] = t.info()
    rep.check("random reads of written-back pages vs the backing disk", "zblock", "randread_iops",
              "backing-disk", at_least=RANDREAD_NEED)
    rep.check("the same vs a bare Python FUSE server over the disk", "zblock", "randread_iops",
              "diskfile-native", at_least=RANDREAD_NEED)
    rep.emit()
    if "zblock" in rep.skipped:
        pytest.skip(f"references measured; {rep.skipped['zblock']}")
