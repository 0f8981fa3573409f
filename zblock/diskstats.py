"""What a backing file's I/O counted, and the errors it reports.

Per direction: pages moved (bd_reads, bd_writes, as zram's bd_stat counts them), data-file calls
(a run of pages is one) and the microseconds spent in them; checksum_errors (pages whose bytes
failed a check) and io_errors (disk operations that failed). The error constructors count and
build the exception in one step, so no failure goes uncounted.

Lock protocol: `_lock` is a leaf (held for a few additions, never while taking another).
"""

from __future__ import annotations

import errno
import threading

from .errors import DataError, DiskError

FIELDS = ("bd_reads", "bd_writes", "bd_read_ios", "bd_write_ios", "bd_read_us", "bd_write_us",
          "checksum_errors", "io_errors")


def disk_error(path: str, what: str, e: OSError) -> DiskError:
    """The DiskError of a failed disk operation, with the disk's own errno (EIO if none)."""
    return DiskError(f"{path}: {what} failed: {e.strerror or e}", e.errno or errno.EIO)


class DiskStats:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        for name in FIELDS:
            setattr(self, name, 0)

    def read(self, pages: int, us: int) -> None:
        """One data-file read of `pages` pages that took `us` microseconds."""
        self._lock.acquire()        # not `with`: on every 4 KiB read of a page on disk
        try:
            self.bd_reads += pages
            self.bd_read_ios += 1
            self.bd_read_us += us
        finally:
            self._lock.release()

    def wrote(self, pages: int, calls: int, us: int) -> None:
        with self._lock:
            self.bd_writes += pages
            self.bd_write_ios += calls
            self.bd_write_us += us

    def disk_error(self, what: str, e: OSError) -> DiskError:
        with self._lock:
            self.io_errors += 1
        return disk_error(self.path, what, e)

    def read_error(self, what: str, e: OSError) -> DataError:
        """A read that failed answers EIO whatever the disk said (ENOSPC from a read would only
        confuse the reader); the disk's own error stays in the message."""
        return DataError(str(self.disk_error(what, e)))

    def bad_pages(self, bad: list[int], what: str) -> DataError:
        """EIO for pages whose bytes failed a check, counted in checksum_errors; the error's
        `pages` lists them."""
        with self._lock:
            self.checksum_errors += len(bad)
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        err = DataError(f"{self.path}: page {bad[0]}{more}: {what}")
        err.pages = bad
        return err
