"""Position within a group: runs of equal keys in rows that are already sorted (or at least grouped) by them.

Ranking within a query, keeping the first of each repeated pair, ranking an ideal list: all of them need, for
rows grouped by some key columns, where each group starts and where each row stands within its group. One
vectorized pass over Arrow or numpy columns gives all of it; nothing here sorts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Keys = pa.Array | pa.ChunkedArray | np.ndarray


class GroupPositions(NamedTuple):
    """Where N grouped rows stand, for G groups (G = 0 when N = 0)."""

    first: np.ndarray  # (N,) bool: the row starts a group (a run of equal keys)
    group: np.ndarray  # (N,) int64: the row's group, 0..G-1 in row order
    starts: np.ndarray  # (G,) int64: the first row of each group
    sizes: np.ndarray  # (G,) int64: rows in each group
    position: np.ndarray  # (N,) int64: 1-based position of the row within its group


def _same_as_previous(key: Keys, n: int) -> np.ndarray:
    """(n - 1,) bool: row i + 1 holds the same key as row i. A null (or NaN) never equals anything."""
    if isinstance(key, np.ndarray):
        return key[1:] == key[:-1]
    equal = pc.equal(key.slice(1), key.slice(0, n - 1))
    return pc.fill_null(equal, False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


def group_positions(*keys: Keys) -> GroupPositions:
    """Groups of rows sorted (or grouped) by `keys`: a group is a run of rows equal on every key.

    keys: one or more (N,) columns (pyarrow Array or ChunkedArray, or numpy array), all of the same length.
    Returns GroupPositions: first (N,) bool, group (N,) int64, starts (G,) int64, sizes (G,) int64,
    position (N,) int64 (1 = the group's first row).

    A null (or a float NaN) compares unequal to everything, itself included, so each such row starts a group of
    its own. Rows of one key value that are not adjacent form separate groups: sort first.
    """
    if not keys:
        raise ValueError("group_positions needs at least one key column")
    n = len(keys[0])
    if any(len(key) != n for key in keys):
        raise ValueError(f"key columns differ in length: {[len(key) for key in keys]}")
    first = np.ones(n, dtype=bool)
    if n > 1:
        same = np.ones(n - 1, dtype=bool)
        for key in keys:
            same &= _same_as_previous(key, n)
        first[1:] = ~same
    starts = np.flatnonzero(first).astype(np.int64)
    group = np.cumsum(first, dtype=np.int64) - 1
    sizes = np.diff(np.r_[starts, np.int64(n)]).astype(np.int64)
    position = np.arange(n, dtype=np.int64) - starts[group] + 1
    return GroupPositions(first=first, group=group, starts=starts, sizes=sizes, position=position)
