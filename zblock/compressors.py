"""Compressor registry: lz4, lzo, zstd (with level), deflate, as raw streams.

Streams carry no size header and no checksum (the cache entry keeps the length), so the ratios
compare with the kernel's: lz4 is an LZ4 block, lzo is LZO1X-1, deflate is raw deflate (as the
kernel's `deflate`), zstd is a frame without content size, checksum or dictionary id (as the
kernel's crypto zstd, which also writes frames).

A Compressor instance is not thread-safe (zstd keeps a context): each acomp context owns one,
made by `get_compressor`. Decompression fails with CompressionError on corrupt input or a
result that is not exactly `out_len` bytes.
"""

from __future__ import annotations

import zlib

from . import PAGE_SIZE, scan
from .errors import UnknownCompressor
from .extensions import optional

ALGORITHMS = ("lz4", "lzo", "zstd", "deflate")


class CompressionError(Exception):
    """The library failed to compress or decompress (corrupt input, wrong length)."""


_lz4pages = optional("_lz4pages")
# which code serves lz4 (shown in the stats): the C extension, or python-lz4 and zblock.scan
LZ4_BACKEND = "c" if _lz4pages is not None else "python-lz4"


class Compressor:
    """One small interface: compress(bytes-like) -> bytes, decompress(bytes, out_len) -> bytes,
    and their batch forms, which acomp calls."""

    name = ""
    level = None

    def compress(self, src) -> bytes:
        raise NotImplementedError

    def decompress(self, src, out_len: int = PAGE_SIZE) -> bytes:
        """The library's decompression, checked: any library error or a result that is not
        exactly `out_len` bytes is a CompressionError naming the algorithm."""
        try:
            out = self._decompress(src, out_len)
        except Exception as e:
            raise CompressionError(f"{self.name}: {e}") from None
        if len(out) != out_len:
            raise CompressionError(f"{self.name}: got {len(out)} bytes, expected {out_len}")
        return out

    def _decompress(self, src, out_len: int) -> bytes:
        raise NotImplementedError

    def compress_many(self, pages) -> list[bytes]:
        """compress() of each page; raises on the first failure (scan.compress_each then goes
        page by page to find it)."""
        return [self.compress(p) for p in pages]

    def decompress_many(self, srcs, out_len: int = PAGE_SIZE) -> list:
        """Each source decompressed: bytes, or the CompressionError it failed with."""
        out = []
        for s in srcs:
            try:
                out.append(self.decompress(s, out_len))
            except CompressionError as e:
                out.append(e)
        return out

    def decompress_join(self, items, out_len: int = PAGE_SIZE) -> bytes:
        """A read request's pages as one bytes object: items shorter than out_len are streams
        of this compressor (decompressed), items of out_len bytes are whole pages (copied).
        Raises CompressionError on the first failure."""
        return b"".join([i if len(i) == out_len else self.decompress(i, out_len) for i in items])

    def scan_pages(self, mv, n: int, detect_same: bool, raw_poor: bool) -> scan.Scan:
        """zswap_store()'s per-page checks and compression of n pages (see zblock.scan)."""
        return scan.scan_pages(mv, n, lambda pages: scan.compress_each(self, pages),
                               detect_same, raw_poor)

    @property
    def label(self) -> str:
        return self.name if self.level is None else f"{self.name}-{self.level}"


class LZ4(Compressor):
    """LZ4 blocks (no size header), as the kernel's lz4. The C extension zblock._lz4pages works
    on a whole request with the GIL released once; without it, python-lz4 (which releases and
    re-takes the GIL around every page: with a second thread at work that costs about half the
    speed) and the checks of zblock.scan."""

    name = "lz4"

    def __init__(self, level=None):
        self._c = _lz4pages
        if self._c is None:
            import lz4.block
            self._block = lz4.block

    def compress(self, src) -> bytes:
        if self._c is not None:
            return self._c.compress(src)
        return self._block.compress(src, store_size=False)

    def _decompress(self, src, out_len) -> bytes:
        if self._c is not None:
            return self._c.decompress(src, out_len)
        return self._block.decompress(src, uncompressed_size=out_len)

    def compress_many(self, pages) -> list[bytes]:
        if self._c is not None:
            return self._c.compress_many(pages)
        compress = self._block.compress
        return [compress(p, store_size=False) for p in pages]

    def decompress_many(self, srcs, out_len: int = PAGE_SIZE) -> list:
        if self._c is not None:
            try:
                return self._c.decompress_many(srcs, out_len)
            except (ValueError, TypeError, BufferError, OverflowError):
                pass                # a bad item: page by page below names it
        return super().decompress_many(srcs, out_len)

    def decompress_join(self, items, out_len=PAGE_SIZE) -> bytes:
        if self._c is None:
            return super().decompress_join(items, out_len)
        try:
            return self._c.join(items, out_len)
        except ValueError as e:
            raise CompressionError(f"lz4: {e}") from None

    def scan_pages(self, mv, n: int, detect_same: bool, raw_poor: bool) -> scan.Scan:
        if self._c is None:
            return super().scan_pages(mv, n, detect_same, raw_poor)
        return scan.from_c(self._c.scan_pages(mv, PAGE_SIZE, detect_same, raw_poor))


class LZO(Compressor):
    name = "lzo"

    def __init__(self, level=None):
        import lzo
        self._lzo = lzo

    def compress(self, src) -> bytes:
        return self._lzo.compress(bytes(src), 1, False)

    def _decompress(self, src, out_len) -> bytes:
        return self._lzo.decompress(bytes(src), False, out_len)


class Zstd(Compressor):
    name = "zstd"

    def __init__(self, level=1):
        import zstandard
        self.level = int(level or 1)
        self._c = zstandard.ZstdCompressor(level=self.level, write_content_size=False,
                                           write_checksum=False, write_dict_id=False)
        self._d = zstandard.ZstdDecompressor()

    def compress(self, src) -> bytes:
        return self._c.compress(src)

    def _decompress(self, src, out_len) -> bytes:
        return self._d.decompress(src, max_output_size=out_len)


class Deflate(Compressor):
    name = "deflate"

    def __init__(self, level=None):
        pass

    def compress(self, src) -> bytes:
        # wbits=-15: raw deflate, as the kernel's deflate; level 1 as zswap favours speed
        c = zlib.compressobj(1, zlib.DEFLATED, -15)
        return c.compress(src) + c.flush()

    def _decompress(self, src, out_len) -> bytes:
        return zlib.decompressobj(-15).decompress(src, out_len)


COMPRESSOR_TABLE: dict[str, type[Compressor]] = {
    "lz4": LZ4, "lzo": LZO, "zstd": Zstd, "deflate": Deflate,
}


def available() -> list[str]:
    """Names whose library imports on this machine."""
    names = []
    for name, cls in COMPRESSOR_TABLE.items():
        try:
            cls()
        except ImportError:
            continue
        names.append(name)
    return names


def check_available(name: str) -> None:
    cls = COMPRESSOR_TABLE.get(name)
    if cls is None:
        raise UnknownCompressor(f"unknown compressor {name!r}; available: {', '.join(available())}")
    try:
        cls()
    except ImportError as e:
        raise UnknownCompressor(f"compressor {name!r} is not installed ({e.name} missing); "
                                f"available: {', '.join(available())}") from None


def get_compressor(name: str, level: int | None = None) -> Compressor:
    """A new instance of the named compressor; fails loudly on unknown or missing ones."""
    check_available(name)
    return COMPRESSOR_TABLE[name](level)
