"""zblock's optional C accelerators (zblock/_lz4pages.c, zblock/_sealpages.c,
zblock/fuse/_devread.c): each has a pure-Python fallback, and ZBLOCK_NO_EXTENSION=1 switches them
all off (the tests run both ways)."""

from __future__ import annotations

import importlib
import os


def optional(name: str):
    """The compiled module zblock.`name`, or None: not built here, or switched off."""
    if os.environ.get("ZBLOCK_NO_EXTENSION") == "1":
        return None
    try:
        return importlib.import_module(f"zblock.{name}")
    except ImportError:
        return None
