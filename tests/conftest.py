"""Shared test set-up. Every test has a timeout (pytest-timeout, pyproject's default 120 s)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

IN_CI = os.environ.get("CI") == "true"


def require(condition: bool, why: str) -> None:
    """Skip when a machine lacks a real part; with CI=true a skip of a real-part test is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {why}")
    pytest.skip(why)


def pytest_sessionstart(session):
    """Sweep what dead earlier runs of this project left behind (mounts, loops, swap, servers)
    under the test prefix, so one crashed run cannot break the next."""
    import mountutil
    swept = mountutil.sweep()
    if swept:
        print(f"swept leftovers of earlier runs: {', '.join(swept)}", file=sys.stderr)


def pytest_sessionfinish(session, exitstatus):
    """The kernel setting tests changed for the whole machine goes back to what it was."""
    import mountutil
    mountutil.restore_fuse_uring()


@pytest.fixture
def fault_rules(tmp_path, monkeypatch):
    """An empty fault-script file that fault servers started by this test follow (see
    tests/faultserver.py); write rules into it with faultserver.write_rules while mounted."""
    import faultserver
    import mountutil
    mountutil.require_mounts()
    rules = str(tmp_path / "faults.json")
    faultserver.write_rules(rules, [])
    monkeypatch.setenv(faultserver.ENV_FAULTS, rules)
    return rules
