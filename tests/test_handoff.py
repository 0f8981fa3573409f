"""Reading the device while requests wait (zblock.handoff, zblock.fuse.readers), without a
mount: how many workers read, and which of the store's waits say they are about to wait.
The protocol-level test (a stuck fsync while reads go on) is in tests/test_fuse_native.py."""

from __future__ import annotations

import threading
import time

import pytest

from zblock import handoff
from zblock.config import Config
from zblock.entries import COMP, DISK
from zblock.fuse import readers as readers_module
from zblock.fuse.readers import Readers
from zblock.store import Store

pytestmark = pytest.mark.timeout(60)


def worker(readers: Readers) -> tuple[threading.Thread, threading.Event]:
    """A thread that takes a reader's place; the event is set once it may read."""
    placed = threading.Event()

    def run():
        readers.take()
        placed.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, placed


def test_one_reader_until_a_request_waits_then_all_read():
    readers = Readers(3, spins=True)
    readers.take()                              # this thread reads
    others = [worker(readers) for _ in range(2)]
    assert not any(placed.wait(0.2) for _, placed in others)     # parked
    readers.hand_off()                          # this thread's request is about to wait
    for t, placed in others:
        assert placed.wait(10)                  # ... so the parked ones read too
        t.join(10)
    assert readers.limit == 3 and len(readers.holders) == 3


def test_back_to_one_reader_once_nothing_waited_for_a_while(monkeypatch):
    monkeypatch.setattr(readers_module, "SHARED_S", 0.05)
    readers = Readers(2, spins=True)
    readers.take()
    readers.hand_off()                          # both read now
    again, placed, parked_again = threading.Event(), threading.Event(), threading.Event()

    def second():
        readers.take()
        placed.set()
        again.wait(10)
        readers.take()                          # back from its next request
        parked_again.set()

    t = threading.Thread(target=second, daemon=True)
    t.start()
    assert placed.wait(10)
    time.sleep(0.1)                             # nothing waited since
    again.set()
    assert not parked_again.wait(0.3)           # one reader again: the second one parks
    assert readers.limit == 1
    readers.close()
    assert parked_again.wait(10)
    t.join(10)


def test_close_sends_every_parked_worker_to_the_device():
    readers = Readers(4, spins=True)
    readers.take()
    parked = [worker(readers) for _ in range(3)]
    assert not any(placed.wait(0.1) for _, placed in parked)
    readers.close()
    for t, placed in parked:
        assert placed.wait(10)
        t.join(10)
    readers.take()                              # after the end nobody waits for a place


def test_without_spinning_every_worker_reads_and_nothing_changes_that():
    readers = Readers(2, spins=False)
    readers.take()
    t, placed = worker(readers)
    assert placed.wait(10)
    t.join(10)
    readers.hand_off()
    assert readers.limit == 2


@pytest.fixture
def hook():
    """This thread as a worker would be: blocking() counts its calls."""
    calls = []
    handoff.set_hook(lambda: calls.append(1))
    yield calls
    handoff.set_hook(None)


def test_a_read_from_disk_says_it_waits_and_a_cached_one_does_not(tmp_path, hook):
    store = Store.open(str(tmp_path / "b.img"), 1 << 20, Config(pool_limit=0))
    try:
        store.write(0, b"zblock " * 1170 + b"\0\0\0\0\0\0")
        store.fsync()
        assert store.cache.table.state[0] == DISK
        store.read(0, 4096)
        assert hook                             # the disk read handed the device on
        store.close()
        store = Store.open(str(tmp_path / "b.img"), 1 << 20, Config())
        store.write(0, b"zblock " * 1170 + b"\0\0\0\0\0\0")
        assert store.cache.table.state[0] == COMP
        hook.clear()
        store.read(0, 4096)
        assert not hook
    finally:
        store.close()


def test_threads_without_a_hook_do_not_care():
    handoff.set_hook(None)
    handoff.blocking()
    raised = []

    def never_set():                            # a new thread: no hook at all
        try:
            handoff.blocking()
        except Exception as e:                  # a thread's exception would not fail the test
            raised.append(e)

    t = threading.Thread(target=never_set)
    t.start()
    t.join(10)
    assert raised == []
