"""The cache's counters and its part of the stats (names after zswap debugfs and zram mm_stat).

Counters only grow; each is moved by exactly its trigger, under the cache's tree lock. The
snapshot is taken under the tree lock, so `stored_pages` equals the sum over `pools` plus the
same-filled pages in every snapshot.

Not here: the store's own keys (backing counters, request sizes: zblock.store).
"""

from __future__ import annotations

from . import PAGE_SIZE, vec
from .compressors import LZ4_BACKEND
from .entries import FAR
from .pools import merge_hw


class Counters:
    """zswap/zram event counters."""

    NAMES = ("pool_limit_hit", "written_back_pages", "flushed_pages", "written_through_pages",
             "reject_compress_poor",
             "reject_compress_fail", "reject_alloc_fail", "reject_reclaim_fail",
             "reject_pool_limit", "bypassed_pages", "decompress_fail",
             "zswpout", "zswpin", "zswpwb", "discarded_pages",
             "far_writes", "far_reads", "far_demoted_pages", "far_errors", "far_checksum_errors",
             "written_back_on_demand", "promoted_pages", "recompressed_pages",
             "recompress_saved_bytes")

    def __init__(self):
        for name in self.NAMES:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.NAMES}


def snapshot(cache) -> dict:
    """The cache's stats: gauges, counters, pools and the engines' `hw` object."""
    table, registry = cache.table, cache.registry
    with cache.tree_lock:
        pools = registry.stats()
        d = {
            "stored_pages": table.stored_pages(),
            "same_filled_pages": table.same_filled_pages,
            "stored_incompressible_pages": table.stored_incompressible_pages,
            "pool_total_size": table.pool_total_size,
            # held over the limit: writeback is catching up, or the disk refuses it
            "pool_over_limit": max(table.pool_total_size - cache.config.pool_limit, 0),
            **cache.c.as_dict(),
            "mem_used_max": table.mem_used_max,
            "acomp_contexts": pools["acomp_contexts"],
            "pools": pools["pools"],
            "compr_data_size": table.compr_data_size,
            "dirty_pages": table.count(lambda s: table.dirty[s]),
            "lz4_backend": LZ4_BACKEND,
            "idle_pages": table.count(table.idle),
            "bd_count": table.disk_pages,
            "writeback_limit": cache.config.writeback_limit,
            "writeback_progress": {"done": cache.on_demand.progress[0],
                                   "total": cache.on_demand.progress[1]}
            if cache.on_demand.progress else {},
            "far_stored_pages": table.far_pages,
            "far_bytes": table.far_bytes,
            "dedup_pages": table.dedup_pages,
            "dedup_saved_bytes": table.dedup_saved_bytes,
            "far_dirty_pages": table.count(lambda s: vec.mask_and(
                vec.mask_in(table.state, (FAR,), s.start, s.stop), bytes(table.dirty[s])))
            if table.far_pages else 0,
        }
        d["orig_data_size"] = d["stored_pages"] * PAGE_SIZE
    d.update(cache.disk_reader.counters())
    d.update(cache.far_pages.stats() if cache.far_pages is not None else
             {"far_latency_us": {}, "far_nodes": [], "far_down": False, "far_pending_deletes": 0})
    d["hw"] = merge_hw([pools["hw_closed"]] + [e.stats() for e in pools["engines"]])
    return d
