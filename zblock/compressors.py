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

from . import PAGE_SIZE
from .errors import UnknownCompressor

ALGORITHMS = ("lz4", "lzo", "zstd", "deflate")


class CompressionError(Exception):
    """The library failed to compress or decompress (corrupt input, wrong length)."""


class Compressor:
    """One small interface: compress(bytes-like) -> bytes, decompress(bytes, out_len) -> bytes."""

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
        """compress() of each page; raises on the first failure (the caller then goes page by
        page to find it). Subclasses make this one comprehension over the library call."""
        return [self.compress(p) for p in pages]

    def decompress_many(self, srcs, out_len: int = PAGE_SIZE) -> list[bytes]:
        """decompress() of each source; raises CompressionError on the first failure."""
        return [self.decompress(s, out_len) for s in srcs]

    # True where decompress_join is one library call rather than decompress_many plus a join
    joins = False

    def decompress_join(self, items, out_len: int = PAGE_SIZE) -> bytes:
        """A read request's pages as one bytes object: items shorter than out_len are streams
        of this compressor (decompressed), items of out_len bytes are whole pages (copied).
        Raises CompressionError on the first failure."""
        return b"".join([i if len(i) == out_len else self.decompress(i, out_len) for i in items])

    # True where scan_pages exists: a write request's same-filled checks and compression in one
    # library call (the cache otherwise does them with numpy and compress_many)
    scans = False

    def scan_pages(self, buf, detect_same: bool, raw_poor: bool) -> tuple:
        """See zblock/_lz4pages.c scan_pages: (objs, states, lengths, fills) of buf's pages."""
        raise NotImplementedError

    # True where one page needs no acomp context: compress, decompress and scan_page keep no
    # state between calls, so any thread may call them at once (the cache's 4 KiB paths then
    # skip the context and the pool hold; see Cache.store_page)
    stateless = False

    def scan_page(self, page, detect_same: bool, raw_poor: bool) -> tuple:
        """scan_pages for one page: (state, obj, length, fill); see zblock/_lz4pages.c."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        return self.name if self.level is None else f"{self.name}-{self.level}"


class LZ4(Compressor):
    """LZ4 blocks through zblock._lz4pages (the system liblz4). python-lz4 writes the same block
    format, but releases and re-takes the GIL around every page: with a second thread at work
    the GIL changes hands twice per page, and splitting a 256-page read in two ran at half the
    speed of one thread (1335 -> 675 MB/s, /usr pages, in-process)."""

    name = "lz4"

    def __init__(self, level=None):
        from . import _lz4pages
        self._lz4 = _lz4pages

    def compress(self, src) -> bytes:
        return self._lz4.compress(src)

    def decompress(self, src, out_len: int = PAGE_SIZE) -> bytes:
        # Compressor.decompress without its layers: the C call checks the length itself
        try:
            return self._lz4.decompress(src, out_len)
        except ValueError as e:
            raise CompressionError(f"lz4: {e}") from None

    def compress_many(self, pages) -> list[bytes]:
        return self._lz4.compress_many(pages)

    def decompress_many(self, srcs, out_len=PAGE_SIZE) -> list[bytes]:
        try:
            return self._lz4.decompress_many(srcs, out_len)
        except ValueError as e:
            raise CompressionError(f"lz4: {e}") from None

    joins = True

    def decompress_join(self, items, out_len=PAGE_SIZE) -> bytes:
        try:
            return self._lz4.join(items, out_len)
        except ValueError as e:
            raise CompressionError(f"lz4: {e}") from None

    scans = True

    def scan_pages(self, buf, detect_same: bool, raw_poor: bool) -> tuple:
        return self._lz4.scan_pages(buf, PAGE_SIZE, detect_same, raw_poor)

    stateless = True

    def scan_page(self, page, detect_same: bool, raw_poor: bool) -> tuple:
        return self._lz4.scan_page(page, detect_same, raw_poor)


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
