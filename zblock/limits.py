"""The pool's limits, as zswap keeps them: the limit check a store makes, the accept-threshold
hysteresis, the `evict` policy's back-pressure on writers, and zram's writeback budget.

zswap_check_limits(): a store that finds the pool at its limit is a `pool_limit_hit` and wakes
the writeback worker. Under the `zswap` policy the pool is then "full": stores are rejected
(they go to disk uncompressed) until the pool is at or below accept_threshold % of the limit.
Under `evict`, zblock's own policy, stores are admitted and a writer waits, boundedly, while the
worker writes the coldest pages back.

Lock protocol: every method runs with the cache's tree lock held, except wait_for_space(),
which takes it (its caller holds no page lock: the worker needs page locks to make space).
"""

from __future__ import annotations

import time

from . import PAGE_SIZE, handoff

# A writer under the `evict` policy waits for the writeback worker once the pool is this far over
# its limit (back-pressure), but never longer than SPACE_WAIT: a failing disk must not hang writes.
OVERSHOOT = 8 << 20
SPACE_WAIT = 5.0


class Limits:
    """The limit state of one cache (`reached_full`) and the checks on it."""

    def __init__(self, cache):
        self.cache = cache
        self.config = cache.config
        self.reached_full = False   # zswap policy: rejecting until below the accept threshold

    def over(self) -> bool:
        return self.cache.table.pool_total_size >= self.config.pool_limit

    def accept_level(self) -> int:
        return self.config.pool_limit * self.config.accept_threshold // 100

    def above_accept(self) -> bool:
        """Full and not yet back at the accept threshold: writeback has work."""
        return self.reached_full and self.cache.table.pool_total_size > self.accept_level()

    def reject(self, pages: int) -> bool:
        """zswap_store()'s checks for a store of `pages` pages: True if it must be rejected.
        Nearly every store finds the pool below its limit and accepting."""
        if self.cache.table.pool_total_size < self.config.pool_limit and not self.reached_full:
            return False
        return self.check(pages)

    def check(self, pages: int = 1) -> bool:
        """zswap_check_limits() for a store of `pages` pages. The kernel checks once per folio
        stored (a swapped page), so a hit counts every page."""
        cache = self.cache
        if self.over():
            cache.c.pool_limit_hit += pages
            cache.writeback.wake()
            if self.config.limit_policy == "zswap":
                self.reached_full = True
        elif self.reached_full and (self.config.limit_policy != "zswap"
                                    or cache.table.pool_total_size <= self.accept_level()):
            self.reached_full = False
        if self.reached_full and not cache.writeback.pending:
            cache.writeback.wake()          # zswap_store() queues shrink_worker on a reject
        return self.reached_full

    def params_changed(self, name: str) -> None:
        """A limit param changed: a lower limit or a new policy may need writeback."""
        if name == "limit_policy":
            self.reached_full = False
            self.cache.table.referenced_on_store = self.config.limit_policy == "zswap"
        self.cache.writeback.wake()

    def wait_for_space(self) -> None:
        """Back-pressure for the evict policy, for a caller about to take a page lock.
        Caller holds neither lock."""
        with self.cache.tree_lock:
            if self.config.limit_policy == "evict":
                self.wait_for_space_locked()

    def disk_failing(self) -> bool:
        """A write to the backing file failed within SPACE_WAIT: writeback cannot make room, and
        stores past the sequential cutoff go into the pool meanwhile."""
        return time.monotonic() - self.cache.writeback.failed_at < SPACE_WAIT

    def wait_for_space_locked(self) -> None:
        """Caller holds the tree lock and no page lock (the worker needs page locks)."""
        cache = self.cache
        limit = self.config.pool_limit + OVERSHOOT
        if cache.table.pool_total_size < limit:
            return
        if self.disk_failing() or self.budget_spent():
            return      # writeback is failing or has no budget: waiting would only slow writes
        deadline = time.monotonic() + SPACE_WAIT
        handoff.blocking()                  # on writeback's disk writes
        while cache.table.pool_total_size >= limit and not cache.writeback.closing:
            # Ask only if no request is pending: wake() notifies every waiter on wb_cond, and
            # waiters that each asked again on every wake-up woke each other without end (four
            # writers made 28,000 wake-ups in 0.2 s while the worker was in one disk write).
            if not cache.writeback.pending:
                cache.writeback.wake()
            left = deadline - time.monotonic()
            if left <= 0:
                return      # the disk is failing (reject_reclaim_fail): keep data, exceed the limit
            cache.wb_cond.wait(left)

    # ---- zram's writeback_limit (bytes here; -1 is no limit) ---------------------------------

    def take_budget(self, pages: int) -> int:
        """How many of `pages` pages writeback may write now; that much budget is spent."""
        budget = self.config.writeback_limit
        if budget < 0:
            return pages
        allowed = min(pages, budget // PAGE_SIZE)
        self.config.writeback_limit = budget - allowed * PAGE_SIZE
        return allowed

    def refund_budget(self, pages: int) -> None:
        """Give back budget taken for pages that were not written."""
        if self.config.writeback_limit >= 0:
            self.config.writeback_limit += pages * PAGE_SIZE

    def budget_spent(self) -> bool:
        """No page may be written back now (a budget below one page)."""
        return 0 <= self.config.writeback_limit < PAGE_SIZE
