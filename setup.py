"""The compiled parts, optional accelerators (see their sources for why): zblock._lz4pages
(without gcc or liblz4-dev the build skips it and zblock runs on python-lz4) and
zblock._sealpages (without libssl-dev, --encrypt runs on the cryptography package) and
zblock.fuse._devread (without it, the native front end's workers do not spin before they sleep).
Metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("zblock._lz4pages", ["zblock/_lz4pages.c"], libraries=["lz4"],
              depends=["zblock/_gil.h"], extra_compile_args=["-O2", "-Wall"], optional=True),
    Extension("zblock._sealpages", ["zblock/_sealpages.c"], libraries=["crypto"],
              depends=["zblock/_gil.h"], extra_compile_args=["-O2", "-Wall"], optional=True),
    Extension("zblock.fuse._devread", ["zblock/fuse/_devread.c"],
              extra_compile_args=["-O2", "-Wall"], optional=True),
])
