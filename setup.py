"""The one compiled part: zblock._lz4pages, an optional accelerator (see its source for why):
without gcc or liblz4-dev the build skips it and zblock runs on python-lz4. Metadata is in
pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("zblock._lz4pages", ["zblock/_lz4pages.c"], libraries=["lz4"],
                             extra_compile_args=["-O2", "-Wall"], optional=True)])
