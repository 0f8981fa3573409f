"""Access times of pages (zram's ac_time) read as an attribute, the way the kernel reads jiffies.

Every 4 KiB read records when its page was last used. Asking a clock for it (a Python call,
time.monotonic, int()) cost a read of a pooled page about 2,300 of its 15,600 instructions; so a
thread refreshes `tick` every TICK seconds and readers load the attribute. `tick` is 1 + whole
seconds since the clock started, within uint32 (0 marks a page idle in the entry table). An
access stamped up to TICK late stays within the one-second resolution the times have anyway.

Tests inject a clock with set_source() and call refresh() after moving it.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

TICK = 0.25                 # seconds between refreshes
_MAX = 0xFFFFFFFF


class AccessClock:
    """`tick`: the access time to record now. start() runs the refreshing thread, stop() ends it
    (both idempotent). Without the thread, `tick` moves only on refresh()."""

    def __init__(self, source: Callable[[], float] = time.monotonic):
        # guards the source and the writes of `tick`: a refresh from an old source cannot land
        # after set_source's (readers of `tick` take no lock)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.set_source(source)

    def set_source(self, source: Callable[[], float]) -> None:
        """Count from now on `source` (seconds, a float)."""
        with self._lock:
            self._source = source
            self._base = source()
        self.refresh()

    def refresh(self) -> None:
        with self._lock:
            t = int(self._source() - self._base) + 1
            self.tick = t if 0 < t < _MAX else (1 if t < 1 else _MAX)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="zblock-access-clock",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(TICK):
            self.refresh()
