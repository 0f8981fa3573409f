import os

import pytest

from zblock import PAGE_SIZE
from zblock.compressors import ALGORITHMS, CompressionError, available, get_compressor
from zblock.errors import UnknownCompressor

TEXT = (b"the quick brown fox jumps over the lazy dog %d\n" * 200)[:PAGE_SIZE]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_roundtrip_raw_stream(name):
    c = get_compressor(name, 3 if name == "zstd" else None)
    for page in (TEXT, bytes(PAGE_SIZE), os.urandom(PAGE_SIZE)):
        out = c.compress(page)
        assert c.decompress(out, PAGE_SIZE) == page
    # raw stream: compressible text gets far below a page, with no size header to strip
    assert len(c.compress(TEXT)) < PAGE_SIZE // 4


def test_lz4_has_no_size_header():
    import lz4.block
    c = get_compressor("lz4")
    assert c.compress(TEXT) == lz4.block.compress(TEXT, store_size=False)


def test_deflate_is_raw():
    import zlib
    out = get_compressor("deflate").compress(TEXT)
    assert zlib.decompress(out, -15) == TEXT


@pytest.mark.parametrize("name", ALGORITHMS)
def test_corrupt_input_is_an_error(name):
    c = get_compressor(name)
    with pytest.raises(CompressionError):
        c.decompress(b"\xff" * 50, PAGE_SIZE)


def test_unknown_names_the_available():
    with pytest.raises(UnknownCompressor) as e:
        get_compressor("brotli")
    assert "lz4" in str(e.value) and "brotli" in str(e.value)
    assert set(available()) == set(ALGORITHMS)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_batch_calls_match_single_calls(name):
    c = get_compressor(name)
    pages = [TEXT, bytes(PAGE_SIZE), os.urandom(PAGE_SIZE)]
    comp = c.compress_many(pages)
    assert comp == [c.compress(p) for p in pages]
    assert c.decompress_many(comp, PAGE_SIZE) == pages
    with pytest.raises(CompressionError):
        c.decompress_many([comp[0], b"\xff" * 50], PAGE_SIZE)
