"""The entry table's per-page arrays as numpy arrays, for tests' whole-table checks: the table
keeps typed memoryviews (zblock.vec), which numpy views without a copy."""

import numpy as np

FLAGS = {"dirty", "referenced", "under_wb", "live"}         # 0/1 bytes: viewed as bool
ARRAYS = {"state", "length", "pool_id", "fill", "stamp", "gen", "atime"} | FLAGS


class NumpyTable:
    """`table` with its arrays as numpy views of the same memory (writes go through)."""

    def __init__(self, table):
        object.__setattr__(self, "_table", table)

    def __getattr__(self, name):
        value = getattr(self._table, name)
        if name in ARRAYS:
            a = np.asarray(value)
            return a.view(bool) if name in FLAGS else a
        return value

    def __setattr__(self, name, value):
        setattr(self._table, name, value)


def npt(table) -> NumpyTable:
    return NumpyTable(table)
