"""Benchmarks: collected only on purpose, never by `make test`.

They run when ZBLOCK_BENCH=1 is set, or when a path inside tests/perf is named on the command
line (`pytest -q -s tests/perf`, as `make bench` does); `pytest tests` ignores them. A session
fixture sweeps what an earlier killed run left (mounts under the harness prefix, zram devices it
hot_added) before and after the run.
"""

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _explicit(config) -> bool:
    if os.environ.get("ZBLOCK_BENCH") == "1":
        return True
    for arg in config.args:
        p = Path(arg.split("::")[0]).resolve()
        if p == HERE or HERE in p.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    if collection_path.resolve() != HERE and not _explicit(config):
        return True
    return None


@pytest.fixture(scope="session", autouse=True)
def bench_session():
    if os.geteuid() != 0:
        pytest.skip("benchmarks need root (zram, mounts, O_DIRECT on devices)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("benchmarks need /dev/fuse")
    import harness

    for line in harness.sweep_leftovers():
        print(f"sweep: {line}")
    yield
    for line in harness.sweep_leftovers():
        print(f"sweep after run: {line}")
