"""Real clients storage people trust: fio with verification, and ext4 with e2fsck.

1. fio on the mounted `disk` and on a loop device over it: random 4 KiB writes and mixed-size
   writes, verify=crc32c, verify_fatal=1, two jobs each in its own region, the pool far smaller
   than the data so writeback runs during the job (written_back_pages must move).
2. mkfs.ext4 on a loop device over `disk`; a tree of a few thousand files of mixed sizes written
   and a third of them deleted; fstrim; unmount; `e2fsck -fn` clean; zblock unmounted and
   remounted from its backing file; `e2fsck -fn` still clean and every file compares equal.

Loop devices are detached and ext4 mounts unmounted in `finally` (mountutil.sweep also finds
them, under the test prefix, after a killed run).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess

import pytest

import mountutil
from conftest import require

pytestmark = [pytest.mark.timeout(300), pytest.mark.mount, pytest.mark.slow]


def need(*tools):
    for t in tools:
        require(shutil.which(t) is not None, f"{t} is not installed (apt-get install -y fio e2fsprogs)")


def run(*cmd, timeout=240, check=True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {res.returncode}:\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


@contextlib.contextmanager
def loop_device(path: str, direct_io: bool = True):
    dev = run("losetup", "--find", "--show", f"--direct-io={'on' if direct_io else 'off'}", path).stdout.strip()
    try:
        yield dev
    finally:
        res = run("losetup", "-d", dev, check=False)
        if res.returncode != 0:
            # still busy (a late close): retry until a deadline, then say so
            mountutil.wait_for(lambda: run("losetup", "-d", dev, check=False).returncode == 0,
                               30, f"losetup -d {dev} ({res.stderr.strip()})", interval=0.5)


def detach_loops_under(path: str) -> None:
    for dev in os.listdir("/sys/block"):
        with contextlib.suppress(OSError):
            with open(f"/sys/block/{dev}/loop/backing_file") as f:
                if f.read().strip().startswith(path.rstrip("/") + "/"):
                    run("umount", "-l", f"/dev/{dev}", check=False)
                    run("losetup", "-d", f"/dev/{dev}", check=False)


@contextlib.contextmanager
def fs_mounted(dev: str, where: str, readonly: bool = False):
    os.makedirs(where, exist_ok=True)
    run("mount", "-t", "ext4", *(["-o", "ro"] if readonly else []), dev, where)
    try:
        yield where
    finally:
        if run("umount", where, check=False).returncode != 0:
            run("umount", "-l", where, check=False)


def fio(target: str, *, size_per_job: str, jobs: int, mixed: bool, direct: bool = True) -> dict:
    args = ["fio", "--name=zb", f"--filename={target}", "--ioengine=psync",
            f"--direct={1 if direct else 0}", f"--numjobs={jobs}", f"--size={size_per_job}",
            f"--offset_increment={size_per_job}",          # each job in its own region
            "--rw=randwrite", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
            "--randrepeat=0", "--verify_state_save=0", "--group_reporting",
            "--output-format=json"]
    args += ["--bsrange=4k-64k", "--blockalign=4k"] if mixed else ["--bs=4k"]
    res = run(*args, timeout=240, check=False)
    assert res.returncode == 0, f"fio failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "verify" not in res.stderr.lower() or "bad" not in res.stderr.lower(), res.stderr
    out = json.loads(res.stdout[res.stdout.index("{"):])
    job = out["jobs"][0]
    assert job["error"] == 0, job
    # do_verify: after the writes, fio read every block back and checked it
    assert job["read"]["io_bytes"] >= job["write"]["io_bytes"] > 0, (job["read"], job["write"])
    return job


@pytest.mark.parametrize("mixed", [False, True], ids=["4k", "mixed"])
def test_fio_verify_on_disk_and_loop(mixed):
    need("fio", "losetup")
    mountutil.require_mounts()
    with mountutil.Mount(size="128M", pool_limit="4M", compressor="lz4") as m:
        job = fio(m.disk, size_per_job="24M", jobs=2, mixed=mixed)
        st = m.stats()
        assert st["written_back_pages"] > 0, "the pool never overflowed: writeback did not run"
        wb_disk = st["written_back_pages"]
        with loop_device(m.disk) as dev:
            fio(dev, size_per_job="24M", jobs=2, mixed=mixed)
        st = m.stats()
        assert st["written_back_pages"] > wb_disk
        assert st["checksum_errors"] == 0 and st["decompress_fail"] == 0
        print(f"\nfio {'mixed' if mixed else '4k'}: write iops {job['write']['iops']:.0f}, "
              f"written back {st['written_back_pages']} pages")


# Four writers at once (the native front end lets the kernel send writes to one file in
# parallel): each in a region of its own with 4-64 KiB writes, or in 2 KiB stripes so that every
# page is shared by two writers (read-modify-write of the same page from two threads; fio checks
# only its own bytes, and warns that the jobs share blocks).
PARALLEL_LAYOUTS = {
    "disjoint": ["--size=12M", "--offset_increment=12M", "--bsrange=4k-64k", "--blockalign=4k"],
    "shared-pages": ["--size=6M", "--offset_increment=2k", "--zonemode=strided", "--zonesize=2k",
                     "--zoneskip=6k", "--bs=2k"],
}


@pytest.mark.parametrize("layout", sorted(PARALLEL_LAYOUTS))
def test_fio_verify_four_parallel_writers(layout):
    need("fio")
    mountutil.require_mounts()
    with mountutil.Mount(size="64M", pool_limit="2M", compressor="lz4") as m:
        res = run("fio", "--name=zb", f"--filename={m.disk}", "--ioengine=psync", "--direct=1",
                  "--numjobs=4", "--rw=randwrite", "--verify=crc32c", "--verify_fatal=1",
                  "--do_verify=1", "--randrepeat=0", "--verify_state_save=0",
                  "--group_reporting", "--output-format=json", *PARALLEL_LAYOUTS[layout],
                  timeout=240, check=False)
        assert res.returncode == 0, f"fio failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
        assert job["error"] == 0, job
        assert job["read"]["io_bytes"] >= job["write"]["io_bytes"] > 0, (job["read"], job["write"])
        st = m.stats()
        assert st["written_back_pages"] > 0, "the pool never overflowed: writeback did not run"
        assert st["checksum_errors"] == 0 and st["decompress_fail"] == 0


def make_tree(root: str, rng: random.Random, nfiles: int) -> dict[str, str]:
    """A tree of nfiles files in nested directories; returns {relative path: sha256}."""
    sizes = [0, 1, 100, 4095, 4096, 4097, 12000, 30000, 65536]
    words = [b"alpha ", b"beta ", b"zblock ", b"page ", b"swap ", b"\n"]
    files = {}
    for i in range(nfiles):
        d = os.path.join(f"d{i % 17}", f"e{i % 5}")
        os.makedirs(os.path.join(root, d), exist_ok=True)
        rel = os.path.join(d, f"f{i}")
        size = rng.choice(sizes) if rng.random() < 0.98 else rng.randrange(100_000, 1_000_000)
        if rng.random() < 0.3:
            data = rng.randbytes(size)
        else:
            data = b"".join(rng.choice(words) for _ in range(size // 5 + 1))[:size]
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        files[rel] = hashlib.sha256(data).hexdigest()
    return files


def tree_hashes(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if rel.startswith("lost+found"):
                continue
            with open(p, "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_ext4_tree_fstrim_fsck_remount():
    need("mkfs.ext4", "e2fsck", "losetup", "fstrim")
    mountutil.require_mounts()
    rng = random.Random(11)
    workdir = mountutil.new_workdir("ext4")
    try:
        backing = os.path.join(workdir, "backing.img")
        fsdir = os.path.join(workdir, "ext4")
        with mountutil.Mount(size="256M", backing=backing, workdir=workdir, pool_limit="16M") as m:
            with loop_device(m.disk) as dev:
                run("mkfs.ext4", "-q", "-F", "-E", "discard", dev)
                with fs_mounted(dev, fsdir):
                    files = make_tree(fsdir, rng, 3000)
                    run("sync")
                    # the tree is larger than the 16 MiB pool: the coldest pages go to disk.
                    # Waited for here, before the deletes and fstrim below shrink the pool again
                    # (in one CI run they did so before the writeback worker had run: 0 pages).
                    mountutil.wait_for(lambda: m.stats()["written_back_pages"] > 0, 30,
                                       "writeback of a pool over its limit")
                    for rel in rng.sample(sorted(files), len(files) // 3):
                        os.unlink(os.path.join(fsdir, rel))
                        del files[rel]
                    run("sync")
                    trimmed = run("fstrim", "-v", fsdir).stdout.strip()
                run("e2fsck", "-fn", dev)                    # exit 0: clean
            st = m.stats()
            assert st["discarded_pages"] > 0, "fstrim/mkfs sent no discard"
            assert st["written_back_pages"] > 0
            print(f"\next4: {len(files)} files kept; {trimmed}; discarded {st['discarded_pages']} "
                  f"pages, written back {st['written_back_pages']}")
        # the backing file alone: remount it and check again
        with mountutil.Mount(size=None, backing=backing, workdir=workdir) as m:
            with loop_device(m.disk) as dev:
                run("e2fsck", "-fn", dev)
                with fs_mounted(dev, fsdir, readonly=True):
                    assert tree_hashes(fsdir) == files
            assert m.stats()["checksum_errors"] == 0
    finally:
        # nothing of ours may stay mounted or attached, whatever failed above
        detach_loops_under(workdir)
        mountutil.cleanup_dir(workdir)
