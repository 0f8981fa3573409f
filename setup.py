"""The one compiled part: zblock._lz4pages (see its source for why). Metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("zblock._lz4pages", ["zblock/_lz4pages.c"], libraries=["lz4"],
                             extra_compile_args=["-O2", "-Wall"])])
