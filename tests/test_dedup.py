"""Dedup of identical pages (`--dedup`): sharing, copy-on-write, the last sharer freeing the
object, every way a page leaves the pool (overwrite, discard, writeback, far tier,
recompression, a pool switch), the option's plumbing, and fio through a real mount.

The model test with dedup is in tests/test_store.py. Counters and the entry table are the
oracle; check_consistency (test_store) checks the index and the charges after each step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from zblock import PAGE_SIZE
from zblock.cli import _parse_o
from zblock.config import Config
from zblock.entries import COMP, DISK, FAR
from zblock.errors import ConfigError
from zblock.pool import charge
from zblock.store import Store

import mountutil
from conftest import require
from test_store import check_consistency
from tableview import npt

MiB = 1 << 20


def text_page(i: int) -> bytes:
    """Compressible, never same-filled."""
    return "".join(f"page {i} line {j}\n" for j in range(400)).encode()[:PAGE_SIZE]


T, U = text_page(1), text_page(2)


@pytest.fixture
def store(tmp_path):
    s = Store.open(str(tmp_path / "img"), 16 * MiB,
                   Config(pool_limit=64 * MiB, contexts=1, dedup=True, recomp_algorithm="zstd:9"))
    try:
        yield s
    finally:
        s.close()


def put(store: Store, page: int, data: bytes) -> None:
    store.write(page * PAGE_SIZE, data)
    store.staging.settle()


def objs(store: Store, pages) -> list:
    with store.cache.tree_lock:
        return [npt(store.cache.table).obj(p) for p in pages]


def pool_objects(store: Store) -> int:
    with store.cache.tree_lock:
        return sum(len(p.objects) for p in store.cache.registry.live())


def test_identical_pages_share_one_object_charged_once(store):
    for p in range(100):
        put(store, p, T)
    put(store, 100, U)
    held = objs(store, range(101))
    assert all(o is held[0] for o in held[:100]) and held[100] is not held[0]
    s = store.stats()
    assert s["stored_pages"] == 101
    assert s["dedup_pages"] == 99
    assert s["dedup_saved_bytes"] == 99 * charge(len(held[0]))
    assert s["pool_total_size"] == charge(len(held[0])) + charge(len(held[100]))
    assert s["compr_data_size"] == 100 * len(held[0]) + len(held[100])    # per page, as zram's
    assert store.read(0, 101 * PAGE_SIZE) == T * 100 + U
    check_consistency(store)
    # one request of copies (the batch install) shares with what is held and within itself
    store.write(200 * PAGE_SIZE, T * 50 + U * 50)
    store.staging.settle()
    assert all(o is held[0] for o in objs(store, range(200, 250)))
    assert all(o is held[100] for o in objs(store, range(250, 300)))
    assert store.stats()["dedup_pages"] == 99 + 50 + 50
    check_consistency(store)


def test_an_overwritten_sharer_gets_its_own_object_and_the_last_sharer_frees_it(store):
    for p in range(10):
        put(store, p, T)
    shared = objs(store, [0])[0]
    put(store, 3, U)                                # copy-on-write: page 3 alone changes
    assert store.read(0, 10 * PAGE_SIZE) == T * 3 + U + T * 6
    assert objs(store, [3])[0] is not shared and objs(store, [4])[0] is shared
    assert store.stats()["dedup_pages"] == 8
    check_consistency(store)
    store.discard(0, 3 * PAGE_SIZE)                 # three sharers go; the object stays
    store.discard(4 * PAGE_SIZE, 5 * PAGE_SIZE)
    s = store.stats()
    assert s["dedup_pages"] == 0 and s["dedup_saved_bytes"] == 0
    assert s["pool_total_size"] == charge(len(shared)) + charge(len(objs(store, [3])[0]))
    assert store.read(9 * PAGE_SIZE, PAGE_SIZE) == T
    check_consistency(store)
    put(store, 9, U)                                # the last sharer of T: T leaves the pool
    s = store.stats()
    assert s["dedup_pages"] == 1 and s["pool_total_size"] == charge(len(objs(store, [3])[0]))
    assert pool_objects(store) == 1
    store.discard(0, 10 * PAGE_SIZE)
    assert store.stats()["pool_total_size"] == 0 and pool_objects(store) == 0
    check_consistency(store)


def test_written_back_sharers_leave_ram_and_the_rest_keep_the_object(store):
    for p in range(20):
        put(store, p, T)
    shared = objs(store, [0])[0]
    store.set_param("idle", "all")
    for p in range(0, 20, 2):                       # the even pages read since: not idle
        store.read(p * PAGE_SIZE, PAGE_SIZE)
    store.set_param("writeback", "idle")
    with store.cache.tree_lock:
        st = npt(store.cache.table).state[:20].copy()
    assert (st[1::2] == DISK).all() and (st[::2] == COMP).all()
    s = store.stats()
    assert s["written_back_on_demand"] == 10
    assert s["dedup_pages"] == 9 and s["pool_total_size"] == charge(len(shared))
    assert store.read(0, 20 * PAGE_SIZE) == T * 20
    check_consistency(store)
    store.set_param("writeback", "all")
    assert store.stats()["pool_total_size"] == 0 and pool_objects(store) == 0
    assert store.read(0, 20 * PAGE_SIZE) == T * 20
    check_consistency(store)


def test_sharers_moved_to_the_far_tier_leave_the_share(store):
    """The table's side of a far send (zblock.farpages calls to_far once the cluster has the
    copies): each sharer that goes far drops one reference."""
    for p in range(6):
        put(store, p, T)
    shared = objs(store, [0])[0]
    table = npt(store.cache.table)
    with store.cache.tree_lock:
        table.to_far(np.arange(4), np.arange(1, 5, dtype=np.uint64))
        assert (table.state[:4] == FAR).all()
        assert table.dedup_pages == 1 and table.pool_total_size == charge(len(shared))
    check_consistency(store)
    assert store.read(4 * PAGE_SIZE, 2 * PAGE_SIZE) == T * 2
    with store.cache.tree_lock:
        table.to_far(np.arange(4, 6), np.arange(5, 7, dtype=np.uint64))
        assert table.dedup_pages == 0 and table.pool_total_size == 0
    check_consistency(store)
    store.discard(0, 6 * PAGE_SIZE)                 # far copies dropped (no tier: none to delete)
    check_consistency(store)


def test_recompression_moves_a_shared_object_only_with_all_its_sharers(store):
    for p in range(10):
        put(store, p, T)
    put(store, 1000, T)
    old = objs(store, [0])[0]
    store.set_param("idle", "all")
    store.read(1000 * PAGE_SIZE, PAGE_SIZE)         # one sharer not idle: the share stays whole
    store.set_param("recompress", "type=idle")
    s = store.stats()
    assert s["recompressed_pages"] == 0 and s["recompress_saved_bytes"] == 0
    assert all(o is old for o in objs(store, [*range(10), 1000]))
    check_consistency(store)
    store.set_param("idle", "all")
    size0 = s["pool_total_size"]
    store.set_param("recompress", "type=idle")
    s = store.stats()
    new = objs(store, [0])[0]
    assert s["recompressed_pages"] == 11 and len(new) < len(old)
    assert all(o is new for o in objs(store, [*range(10), 1000])), "shared again, in zstd-9"
    assert s["dedup_pages"] == 10 and s["pool_total_size"] == charge(len(new))
    assert s["recompress_saved_bytes"] == size0 - s["pool_total_size"] > 0
    assert store.read(0, 10 * PAGE_SIZE) == T * 10
    assert store.read(1000 * PAGE_SIZE, PAGE_SIZE) == T
    check_consistency(store)


def test_pools_keep_their_own_index(store):
    put(store, 0, T)
    store.set_param("compressor", "zstd")           # T in zstd is another object
    put(store, 1, T)
    put(store, 2, T)
    a, b, c = objs(store, range(3))
    assert a is not b and b is c
    assert store.stats()["dedup_pages"] == 1
    check_consistency(store)
    put(store, 0, U)                                # the lz4 pool loses its last page
    assert store.read(0, 3 * PAGE_SIZE) == U + T + T
    check_consistency(store)


def test_without_dedup_nothing_is_shared(tmp_path):
    s = Store.open(str(tmp_path / "img"), 4 * MiB, Config(pool_limit=64 * MiB, contexts=1))
    try:
        s.write(0, T * 20)
        st = s.stats()
        assert st["dedup_pages"] == 0 and st["dedup_saved_bytes"] == 0
        held = objs(s, range(20))
        assert len({id(o) for o in held}) == 20
        assert st["pool_total_size"] == 20 * charge(len(held[0]))
        check_consistency(s)
    finally:
        s.close()


def test_dedup_is_an_option_fixed_at_mount(store):
    assert _parse_o(["dedup"]) == {"dedup": "Y"}
    assert _parse_o(["compressor=zstd,dedup=N"]) == {"compressor": "zstd", "dedup": "N"}
    assert Config.from_strings({"dedup": "Y"}).dedup is True
    assert Config().dedup is False
    assert store.get_param("dedup") == "Y" and not store.param_writable("dedup")
    with pytest.raises(ConfigError):
        store.set_param("dedup", "N")


# ---------------------------------------------------------------------------------------------
# fio through a real mount

FIO_DEDUP = ["--ioengine=psync", "--rw=randwrite", "--bs=4k", "--dedupe_percentage=50",
             "--randseed=1234", "--output-format=json"]


def fio(*args) -> dict:
    res = subprocess.run(["fio", "--name=zb", *args], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"fio failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    return job


def read_range(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fio_with_dedupe_percentage_50():
    """fio's verify fills every block with its own random bytes and a header naming its offset
    (fio 3.33: 2048 distinct blocks of 2048 with dedupe_percentage=50), so no two verified
    blocks are equal. Hence two phases, the pool a quarter of the data so writeback runs:
    1. fio writes 32 MiB (1.5 passes: overwrites) with dedupe_percentage=50 and a fixed seed;
       the same job on a plain file gives the reference, and the disk must equal it;
    2. fio with verify=crc32c and dedupe_percentage=50 over the upper half of that and beyond:
       its writes overwrite (copy-on-write) sharers whose other copies lie in the lower half,
       and it reads every block back; the lower half must still equal the reference."""
    require(shutil.which("fio") is not None, "fio is not installed")
    mountutil.require_mounts()
    region = 32 * MiB
    with mountutil.Mount(size="64M", pool_limit="8M", compressor="lz4", dedup=True) as m:
        assert m.param("dedup") == "Y"
        ref = os.path.join(m.workdir, "ref.img")
        phase1 = [f"--size={region}", f"--io_size={region * 3 // 2}", *FIO_DEDUP]
        fio(f"--filename={ref}", *phase1)
        fio(f"--filename={m.disk}", "--direct=1", *phase1)
        s = m.stats()
        assert s["dedup_pages"] > 0 and s["dedup_saved_bytes"] > 0, s
        assert s["written_back_pages"] > 0, "the pool never overflowed: writeback did not run"
        want = read_range(ref, 0, region)
        assert read_range(m.disk, 0, region) == want
        job = fio(f"--filename={m.disk}", "--direct=1", f"--offset={region // 2}",
                  f"--size={region}", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                  "--verify_state_save=0", *FIO_DEDUP)
        assert job["read"]["io_bytes"] >= job["write"]["io_bytes"] > 0
        assert read_range(m.disk, 0, region // 2) == want[:region // 2]
        s = m.stats()
        assert s["checksum_errors"] == 0 and s["decompress_fail"] == 0
        m.umount()
        # after a clean unmount the backing file is the plain image
        assert read_range(m.backing, 0, region // 2) == want[:region // 2]
