"""The far tier under real clients, on a real local Redis Cluster: fio with verification while a
master is killed with SIGKILL, and the hash-verified swap hog in a memory cgroup with a pool far
smaller than its working set. Clusters, mounts, loops and swap are ended on every path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import mountutil
import rediscluster
from conftest import require
from mountutil import Mount, wait_for, zblock
from test_swap import HOG, MemCgroup, require_swap_tools, teardown_swap, zswap_must_be_off

from zblock import swapctl

MIB = 1 << 20
pytestmark = [pytest.mark.mount, pytest.mark.slow]


@pytest.fixture
def cluster():
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    workdir = mountutil.new_workdir("far-")
    c = rediscluster.RedisCluster(os.path.join(workdir, "redis-cluster")).start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.timeout(300)
def test_fio_verify_with_a_master_killed_mid_run(cluster):
    require(shutil.which("fio") is not None, "fio is not installed")
    mountutil.require_mounts()
    # through mount -o, as fstab would say it: the nodes joined with `+`
    o = f"far={cluster.url.replace(',', '+')},far_limit=96M,far_timeout=20"
    with Mount(size="128M", pool_limit="4M", extra=["-o", o]) as m:
        with open(os.path.join(m.mountpoint, "params", "far")) as f:
            assert f.read().strip() == cluster.url.replace(",", "+")
        fio = subprocess.Popen(
            ["fio", "--name=zb", f"--filename={m.disk}", "--ioengine=psync", "--direct=1",
             "--numjobs=2", "--size=24M", "--offset_increment=24M", "--bs=4k",
             # compressible pages: raw ones go to the file, not the far tier
             "--buffer_compress_percentage=60", "--refill_buffers",
             "--rw=randwrite", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
             "--randrepeat=0", "--verify_state_save=0", "--group_reporting",
             "--output-format=json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: m.stats()["far_stored_pages"] > 1000, 120,
                     "pages to reach the far tier")
            victim = cluster.masters()[0]
            cluster.kill_node(victim, signal.SIGKILL)
            out, err = fio.communicate(timeout=240)
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.communicate(timeout=30)
        assert fio.returncode == 0, f"fio failed ({fio.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
        job = json.loads(out[out.index("{"):])["jobs"][0]
        assert job["error"] == 0
        assert job["read"]["io_bytes"] >= job["write"]["io_bytes"] > 0
        assert victim not in cluster.masters(), "no failover happened"
        s = m.stats()
        assert s["far_writes"] > 0 and s["far_reads"] > 0
        # every page the cluster acknowledged had a replica: none was really unreachable
        assert s["far_errors"] == 0 and s["checksum_errors"] == 0
        print(f"\nfio with a master killed: far writes {s['far_writes']}, reads {s['far_reads']}, "
              f"demoted {s['far_demoted_pages']}, latency {s['far_latency_us']}")


@pytest.mark.timeout(600)
def test_swap_hog_on_the_far_tier(cluster):
    require_swap_tools()
    zswap_must_be_off()
    working_set, limit = 256, 96 * MIB
    with Mount(size="512M", swap=True, pool_limit="16M", far=cluster.url, far_limit="512M") as m:
        hog = loop = None
        try:
            res = zblock("swapon", m.mountpoint, "--priority", "32767", timeout=120)
            assert res.returncode == 0, res.stderr
            loop = res.stdout.strip()
            with MemCgroup(limit) as cg:
                hog = subprocess.Popen([sys.executable, HOG, "--mib", str(working_set),
                                        "--passes", "1", "--cgroup-procs", cg.procs],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                out, err = hog.communicate(timeout=480)
                assert out.strip(), f"hog exited {hog.returncode} without a result: {err[-2000:]}"
                result = json.loads(out.strip().splitlines()[-1])
                print(f"\nhog on the far tier: {result}")
                assert result["errors"] == 0 and result["verified"] == result["pages"] == working_set * 256
                assert hog.returncode == 0
                hog = None
            s = m.stats()
            assert s["far_writes"] > (working_set * MIB - limit) // 4096 // 4, s["far_writes"]
            assert s["far_reads"] > 0 and s["far_errors"] == 0 and s["checksum_errors"] == 0
            print(f"far writes {s['far_writes']}, reads {s['far_reads']}, written back to disk "
                  f"{s['written_back_pages']}, latency {s['far_latency_us']}")
            res = zblock("swapoff", m.mountpoint, timeout=600)
            assert res.returncode == 0, res.stderr
        finally:
            if hog is not None:
                mountutil.kill_and_wait(hog.pid)
                hog.communicate(timeout=30)
            teardown_swap(m, loop)
    assert swapctl.swap_entry(loop) is None
    assert cluster.dbsize() == 0, "swap mode left keys in the cluster after unmount"
