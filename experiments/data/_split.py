"""Seeded random splits of `n` items into parts of given sizes."""

from collections.abc import Sequence

import numpy as np


def split(n: int, sizes: Sequence[int], seed: int) -> tuple[np.ndarray, ...]:
    """Disjoint random index sets of the given sizes, drawn from `range(n)`.

    **Arguments:**

    - `n`: how many items there are.
    - `sizes`: the size of each part, e.g. `(4000, 2000, 4000)`; they may sum to less than `n`,
        leaving the rest unused.
    - `seed`: the same seed always gives the same split.

    **Returns:**

    One sorted `int64` index array per part.
    """
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes) or sum(sizes) > n:
        raise ValueError(f"`sizes` must be non-negative and sum to at most n={n}; got {sizes}.")
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *sizes])
    return tuple(np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
