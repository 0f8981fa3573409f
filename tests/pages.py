"""Page contents shared by the engine-tier tests."""

import random

from zblock import PAGE_SIZE


def text_page(i: int) -> bytes:
    """A compressible, seed-determined page of words and numbers."""
    r = random.Random(i)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"page", b"swap", b"zblock", b"kernel"]
    out = bytearray()
    while len(out) < PAGE_SIZE:
        out += r.choice(words) + b" " + str(r.randrange(1000)).encode() + b"\n"
    return bytes(out[:PAGE_SIZE])
