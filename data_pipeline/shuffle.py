"""Seeded permutations evaluated index by index, so no epoch order is ever materialized.

A full `rng.permutation(N)` costs 8 bytes per window in every rank and worker process (GBs at trillion-token
scale) and seconds to build at every loader start. `permute(i, n, key)` is a bijection of range(n) computed
in O(1) per index: a 6-round Feistel network on the smallest even number of bits covering n, with cycle
walking (re-apply until the value falls below n; expected < 4 rounds trips) to stay inside range(n).
"""

import functools

import numpy as np

_ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a well-mixed 64-bit hash (numpy uint64 array arithmetic wraps silently)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=64)
def shuffle_key(*tags: int) -> int:
    """64-bit key of a permutation from non-negative integer tags (seed, split, epoch, ...)."""
    return int(np.random.SeedSequence(list(tags)).generate_state(1, np.uint64)[0])


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """Values at `index` (ints in [0, n)) of the permutation of range(n) selected by `key`."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    round_keys = _mix(np.arange(_ROUNDS, dtype=np.uint64) + np.array([key], dtype=np.uint64))
    x = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        left, right = x[todo] >> shift, x[todo] & mask
        for k in round_keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        x[todo] = (left << shift) | right
        todo &= x >= n
    return x.astype(np.int64)
