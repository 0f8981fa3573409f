"""zblock: a compressed, swap-like block store in user space.

A zswap-style compressed page cache (zblock.cache) in front of a raw disk image
(zblock.backing), exposed as one file through FUSE (zblock.fuse_ops).
"""

PAGE_SIZE = 4096
PAGE_SHIFT = 12
PAGE_MASK = PAGE_SIZE - 1

__version__ = "0.1.0"          # the same as pyproject.toml's (tests/test_cli.py checks)
