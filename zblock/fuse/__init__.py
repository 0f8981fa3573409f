"""FUSE front ends for zblock.fuse_ops.ZblockOps: `native` speaks the kernel protocol itself
(zblock.fuse.native, the default where this process may mount), `mfusepy` goes through libfuse
(zblock.daemon loads it; the portable fallback)."""
