"""N-way k-shot episodes, sampled for a whole meta-batch at once with NumPy."""

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np


class Episodes(NamedTuple):
    """A meta-batch of `B` episodes of `N` classes, `k` support and `q` query images per class.

    **Fields:**

    - `support`: `float32` in [0, 1], shape `(B, N k, S, S, 1)`, class-major: image `j` belongs
        to episode class `j // k`.
    - `support_labels`: `int32`, shape `(B, N k)`: `j // k`, labels 0..N-1.
    - `query`: `float32`, shape `(B, N q, S, S, 1)`, image `j` of episode class `j // q`.
    - `query_labels`: `int32`, shape `(B, N q)`.
    - `classes`: `int64`, shape `(B, N)`: the classes (indices into the first axis of the images
        sampled from) behind labels 0..N-1.
    - `drawings`: `int64`, shape `(B, N, k + q)`: the drawings used, support first; distinct
        within each class, so support and query never share an image.
    """

    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    classes: np.ndarray
    drawings: np.ndarray


def _first_of_random_order(rng: np.random.Generator, shape: tuple[int, ...], m: int) -> np.ndarray:
    # m distinct uniform draws from range(shape[-1]) along the last axis, in random order: the
    # positions of the m smallest of i.i.d. uniform keys, sorted by key.
    keys = rng.random(shape)
    if m < shape[-1]:
        chosen = np.argpartition(keys, m - 1, axis=-1)[..., :m]
    else:
        chosen = np.broadcast_to(np.arange(shape[-1]), shape)
    order = np.argsort(np.take_along_axis(keys, chosen, axis=-1), axis=-1)
    return np.take_along_axis(chosen, order, axis=-1)


def sample_episodes(
    images: np.ndarray,
    n_way: int,
    k_shot: int,
    n_query: int,
    meta_batch: int,
    rng: np.random.Generator | int,
) -> Episodes:
    """Samples `meta_batch` episodes, with no Python loop over episodes or images.

    **Arguments:**

    - `images`: shape `(classes, drawings, S, S)`, e.g. `Characters.images` of one split after
        `rotate`; `uint8` (scaled by 1/255) or float.
    - `n_way`, `k_shot`, `n_query`: classes per episode, support and query images per class.
    - `meta_batch`: episodes per call.
    - `rng`: a NumPy `Generator` (advanced in place) or a seed.

    Each episode draws `n_way` distinct classes uniformly, then `k_shot + n_query` distinct
    drawings of each.
    """
    rng = np.random.default_rng(rng)
    num_classes, num_drawings = images.shape[:2]
    if images.ndim != 4:
        raise ValueError(f"`images` must have shape (classes, drawings, S, S); got {images.shape}.")
    if not 0 < n_way <= num_classes:
        raise ValueError(f"`n_way` must be in 1..{num_classes} (the classes given); got {n_way}.")
    if k_shot < 1 or n_query < 0 or k_shot + n_query > num_drawings:
        raise ValueError(
            f"`k_shot + n_query` must be at most {num_drawings} (drawings per class), with "
            f"`k_shot >= 1`; got k_shot={k_shot}, n_query={n_query}."
        )
    classes = _first_of_random_order(rng, (meta_batch, num_classes), n_way)
    drawings = _first_of_random_order(rng, (meta_batch, n_way, num_drawings), k_shot + n_query)
    x = images[classes[:, :, None], drawings]  # (B, N, k + q, S, S)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) * np.float32(1 / 255)
    else:
        x = x.astype(np.float32, copy=False)
    side = images.shape[2:]
    support = x[:, :, :k_shot].reshape(meta_batch, n_way * k_shot, *side, 1)
    query = x[:, :, k_shot:].reshape(meta_batch, n_way * n_query, *side, 1)
    labels = np.arange(n_way, dtype=np.int32)
    return Episodes(
        support,
        np.tile(np.repeat(labels, k_shot), (meta_batch, 1)),
        query,
        np.tile(np.repeat(labels, n_query), (meta_batch, 1)),
        classes,
        drawings,
    )


def episodes(
    images: np.ndarray,
    n_way: int,
    k_shot: int,
    n_query: int,
    meta_batch: int,
    seed: int,
) -> Iterator[Episodes]:
    """An endless, reproducible stream of `sample_episodes` meta-batches from one seed."""
    rng = np.random.default_rng(seed)
    while True:
        yield sample_episodes(images, n_way, k_shot, n_query, meta_batch, rng)
