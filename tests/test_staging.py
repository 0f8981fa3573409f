"""The write-behind queue on its own, with a fake store function (engine tier). Tests of the order
of store calls run one worker; those of two workers check what may run side by side."""

import random
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

    wb = WriteBehind(store, 64, limit=1 << 20, workers=1)
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
        assert not any(wb.staged) and wb._singles == 0
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

    wb = WriteBehind(store, 64, limit=1 << 20, workers=1)
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


def _batching_queue(monkeypatch, gather: float):
    """A queue whose one-page items go to store_scattered; records every call."""
    from zblock import staging
    monkeypatch.setattr(staging, "GATHER", gather)
    calls = []
    gate = threading.Event()
    gate.set()
    entered = threading.Event()             # the worker is in a store call

    def store(page, data):
        entered.set()
        gate.wait(10)
        calls.append(("pages", page, bytes(data[::PAGE_SIZE])))

    def store_scattered(pages, data):
        entered.set()
        gate.wait(10)
        calls.append(("batch", list(pages), bytes(data[::PAGE_SIZE])))

    wb = WriteBehind(store, 64, limit=1 << 20, store_scattered=store_scattered, workers=1)
    return wb, calls, gate, entered


def test_one_page_writes_are_stored_in_batches_in_order(monkeypatch):
    """put_page items wait for company and are stored together; a page queued twice ends the
    batch (its later write is stored after the earlier one); a request in the queue is stored
    on its own, in its place."""
    wb, calls, gate, entered = _batching_queue(monkeypatch, gather=60.0)
    try:
        gate.clear()                           # hold the worker in its first store
        wb.put_page(1, b"a" * PAGE_SIZE)
        threading.Thread(target=wb.wait_range, args=(1, 1), daemon=True).start()   # hurries it
        assert entered.wait(10)
        wb.put_page(2, b"b" * PAGE_SIZE)
        wb.put_page(3, b"c" * PAGE_SIZE)
        wb.put_page(2, b"d" * PAGE_SIZE)       # page 2 again
        wb.put_page(4, b"e" * PAGE_SIZE)
        wb.put(8, b"f" * 2 * PAGE_SIZE)
        wb.put_page(5, b"g" * PAGE_SIZE)
        gate.set()
        wb.drain()                             # hurries the gathering worker: no 60 s wait
        assert calls == [("pages", 1, b"a"), ("batch", [2, 3], b"bc"), ("batch", [2, 4], b"de"),
                         ("pages", 8, b"ff"), ("pages", 5, b"g")]
        assert not any(wb.staged) and wb._singles == 0
    finally:
        gate.set()
        wb.close()


def test_a_reader_does_not_wait_for_the_batch_to_fill(monkeypatch):
    """A read of a page still queued makes the worker store what it has gathered at once."""
    wb, calls, _, _ = _batching_queue(monkeypatch, gather=60.0)
    try:
        wb.put_page(6, b"x" * PAGE_SIZE)
        wb.put_page(7, b"y" * PAGE_SIZE)
        reader = threading.Thread(target=wb.wait_range, args=(7, 1))
        reader.start()
        reader.join(10)                        # GATHER is 60 s: only the hurry gets it out
        assert not reader.is_alive()
        assert calls == [("batch", [6, 7], b"xy")]
        assert not any(wb.staged[6:8])
    finally:
        wb.close()


def test_a_failed_batch_loses_only_its_pages(monkeypatch):
    from zblock import staging
    monkeypatch.setattr(staging, "GATHER", 60.0)

    def store_scattered(pages, data):
        raise DiskError("injected", 5)

    wb = WriteBehind(lambda page, data: None, 64, limit=1 << 20, store_scattered=store_scattered)
    try:
        for page in (10, 11, 12):
            wb.put_page(page, bytes(PAGE_SIZE))
        wb.wait_range(20, 1)                   # another page: fine
        with pytest.raises(DataError, match="page 11"):
            wb.wait_range(11, 1)
        with pytest.raises(DiskError):
            wb.drain()                         # fsync reports it once
        wb.put_page(11, bytes(PAGE_SIZE))      # rewritten: readable again (stored alone)
        wb.drain()
        wb.wait_range(11, 1)
        with pytest.raises(DataError, match="page 12"):
            wb.wait_range(12, 1)
    finally:
        wb.close()


def test_two_workers_store_disjoint_items_side_by_side_and_overlapping_ones_in_order():
    """Two requests on different pages are stored at the same time; one that covers a page of
    an item being stored waits for it, so the later write wins."""
    stored = []
    inside = threading.Semaphore(0)
    gates = {5: threading.Event(), 20: threading.Event(), 21: threading.Event()}

    def store(page, data):
        inside.release()
        gates[page].wait(10)
        stored.append((page, bytes(data[:1])))

    wb = WriteBehind(store, 64, limit=1 << 20, workers=2)
    try:
        wb.put(5, b"a" * 4 * PAGE_SIZE)         # pages 5-8
        wb.put(20, b"b" * PAGE_SIZE)
        assert inside.acquire(timeout=10) and inside.acquire(timeout=10)   # both being stored
        wb.put(21, b"c" * PAGE_SIZE)            # a third: both workers are busy
        gates[21].set()
        wb.put(5, b"d" * PAGE_SIZE)             # covers page 5, still being stored
        gates[20].set()                         # a worker is free: it takes page 21's item
        assert inside.acquire(timeout=10)
        assert not inside.acquire(timeout=0.3)  # the second write to page 5 waits
        assert stored == [(20, b"b"), (21, b"c")]
        gates[5].set()
        wb.drain()
        assert stored[2:] == [(5, b"a"), (5, b"d")]
        assert not any(wb.staged)
    finally:
        for g in gates.values():
            g.set()
        wb.close()


@pytest.mark.parametrize("seed", range(3))
def test_two_workers_keep_the_last_write_of_every_page(seed):
    """Random requests and 4 KiB writes, overlapping, through two workers whose stores take
    random time: every page ends as its last write, as one worker in order would leave it."""
    rng = random.Random(seed)
    npages = 48
    disk = [None] * npages
    lock = threading.Lock()

    def store(page, data):
        time.sleep(rng.random() * 0.002)
        with lock:
            for i in range(len(data) // PAGE_SIZE):
                disk[page + i] = data[i * PAGE_SIZE]

    def store_scattered(pages, data):
        time.sleep(rng.random() * 0.002)
        with lock:
            for i, page in enumerate(pages):
                disk[page] = data[i * PAGE_SIZE]

    model = [None] * npages
    wb = WriteBehind(store, npages, limit=8 * PAGE_SIZE, store_scattered=store_scattered,
                     workers=2)
    try:
        for k in range(400):
            value = k % 251
            if rng.random() < 0.5:
                page = rng.randrange(npages)
                wb.put_page(page, bytes([value]) * PAGE_SIZE)
                model[page] = value
            else:
                n = rng.randrange(2, 9)
                page = rng.randrange(npages - n)
                wb.put(page, bytes([value]) * (n * PAGE_SIZE))
                model[page:page + n] = [value] * n
            if rng.random() < 0.05:
                first = rng.randrange(npages - 4)
                wb.wait_range(first, 4)          # what a read waits for has been stored
                assert disk[first:first + 4] == model[first:first + 4]
        wb.drain()
        assert disk == model
        assert not any(wb.staged)
    finally:
        wb.close()
