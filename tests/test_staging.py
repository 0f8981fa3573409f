"""The write-behind queue on its own, with a fake store function (engine tier)."""

import threading
import time

import pytest

from zblock import PAGE_SIZE
from zblock.errors import DataError, DiskError
from zblock.staging import WriteBehind


def test_fifo_order_and_wait_range():
    stored = []
    gate = threading.Event()

    def store(page, data):
        gate.wait(10)
        stored.append((page, bytes(data[:1])))

    wb = WriteBehind(store, 64, limit=1 << 20)
    try:
        wb.put(3, b"a" * PAGE_SIZE)
        wb.put(3, b"b" * PAGE_SIZE)            # a later write to the same page wins
        wb.put(10, b"c" * 2 * PAGE_SIZE)
        assert wb.staged[3] == 2 and wb.staged[11] == 1 and wb.staged[12] == 0
        waiter = threading.Thread(target=wb.wait_range, args=(11, 1))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()               # page 11 is still queued
        gate.set()
        waiter.join(10)
        assert not waiter.is_alive()
        wb.drain()
        assert stored == [(3, b"a"), (3, b"b"), (10, b"c")]
        assert not wb.staged.any()
    finally:
        gate.set()
        wb.close()


def test_bounded_queue_blocks_the_producer():
    gate = threading.Event()
    wb = WriteBehind(lambda page, data: gate.wait(10), 64, limit=2 * PAGE_SIZE)
    try:
        wb.put(0, bytes(PAGE_SIZE))
        wb.put(1, bytes(PAGE_SIZE))
        t = threading.Thread(target=wb.put, args=(2, bytes(PAGE_SIZE)))
        t.start()
        t.join(0.2)
        assert t.is_alive()                    # 2 pages waiting: the third blocks
        gate.set()
        t.join(10)
        assert not t.is_alive()
    finally:
        gate.set()
        wb.close()


def test_a_failed_store_reaches_the_next_caller():
    calls = []

    def store(page, data):
        calls.append(page)
        if calls == [1]:
            raise DiskError("injected", 5)

    wb = WriteBehind(store, 64, limit=1 << 20)
    try:
        wb.put(1, bytes(PAGE_SIZE))
        wb.put(2, bytes(PAGE_SIZE))
        wb.wait_range(2, 1)                    # another page: fine, and the error stays...
        with pytest.raises(DataError):
            wb.wait_range(0, 4)                # ... while the lost page reads as EIO
        with pytest.raises(DiskError):
            wb.drain()                         # ... for fsync to report, once
        wb.drain()
        with pytest.raises(DataError):
            wb.wait_range(1, 1)                # still lost until written again
        wb.put(1, bytes(PAGE_SIZE))
        wb.wait_range(1, 1)
        assert calls == [1, 2, 1]
    finally:
        wb.close()
    with pytest.raises(DataError):
        wb.put(3, bytes(PAGE_SIZE))            # closed
