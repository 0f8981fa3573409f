"""Which of the native front end's workers read the device, and whether the reader spins.

Two ways of serving, switched as the requests go:
- One reader (while no request waited lately): one worker reads the device and spins for its
  next request before it sleeps (zblock.fuse._devread); the others are parked. A second worker
  asleep on the device would be woken by the kernel for every request the spinning one takes
  (docs/performance.md, eighteenth session).
- Every worker reads (for SHARED_S after a request waited): a worker answering a request is about
  to wait on the disk, the network or an fsync (zblock.handoff calls hand_off), so the parked
  workers go and read the device too, asleep on it, none spinning: the way that keeps several
  disk reads in flight. Without the compiled reader, or with FUSE over io_uring, that is the only
  way (`spins` False).

A worker calls take() before it reads a request: it returns once the worker may read, or parks
the worker while it may not (one reader too many).

Lock protocol: `_lock` guards `holders`, `limit`, `_parked`, `_waited_at` and `_closed`; a parked
worker waits on its own gate (a lock held by it, released by whoever lets it read) outside
`_lock`. A worker may look for itself in `holders`, and at `limit`, without the lock: only it
takes itself out, and take() decides under the lock.
"""

from __future__ import annotations

import threading
import time

# How long every worker keeps reading the device after the last request that waited.
SHARED_S = 0.5


class Readers:
    def __init__(self, workers: int, spins: bool):
        self.workers = workers
        self.spins = spins
        self.limit = 1 if spins else workers    # workers that may read the device at once
        self.holders: set[int] = set()          # thread idents of those that may
        self._parked: list[threading.Lock] = []
        self._waited_at = 0.0
        self._closed = False
        self._lock = threading.Lock()

    def take(self) -> None:
        """Return once the calling worker may read the device (or the connection ended: then
        every worker goes to read, and learns it from the read)."""
        me = threading.get_ident()
        while True:
            with self._lock:
                if self._closed:
                    return
                if self.limit > 1 and self.spins and \
                        time.monotonic() - self._waited_at > SHARED_S:
                    self.limit = 1              # nothing waited lately: back to one reader
                if me in self.holders:
                    if len(self.holders) <= self.limit:
                        return
                    self.holders.discard(me)    # one reader too many
                elif len(self.holders) < self.limit:
                    self.holders.add(me)
                    return
                gate = threading.Lock()
                gate.acquire()
                self._parked.append(gate)
            gate.acquire()                      # released by hand_off or close: look again

    def hand_off(self) -> None:
        """The calling worker is about to wait: every worker reads the device for SHARED_S."""
        if not self.spins:
            return
        with self._lock:
            self._waited_at = time.monotonic()
            if self.limit == self.workers:
                return
            self.limit = self.workers
            woken, self._parked = self._parked, []
        for gate in woken:
            gate.release()

    def close(self) -> None:
        """The connection ended: parked workers go and find that out for themselves."""
        with self._lock:
            self._closed = True
            woken, self._parked = self._parked, []
        for gate in woken:
            gate.release()
