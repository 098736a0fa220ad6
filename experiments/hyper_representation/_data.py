"""The character split, Lake's runs as episodes, and a prefetching episode stream.

Lake's 20 one-shot runs (`all_runs.zip`) draw their 200 characters from ten evaluation
alphabets (official ids 1011..1596). A random 1200 / 100 / 323 split (`split_characters`)
puts about three quarters of them in meta-train, so a model trained on it has seen the runs'
characters. `split_holding_out` keeps the split's sizes but draws meta-train and
meta-validation from the other 1423 characters only; meta-test is the 200 runs characters and
123 others drawn at random.
"""

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from ..data import Characters, OneShotRuns, rotate, sample_episodes, split
from ..data.omniglot import SPLIT_SIZES
from ._meta_step import Batch


def runs_character_ids(chars: Characters, runs: OneShotRuns) -> np.ndarray:
    """The official ids of the characters whose drawings make up Lake's runs, found by exact
    pixel match of the preprocessed images (each run image equals one drawing in `chars`).

    **Raises:**

    `ValueError` if some run image matches no drawing.
    """
    flat = chars.images.reshape(-1, chars.images.shape[-2] * chars.images.shape[-1])
    lookup = {row.tobytes(): i // chars.images.shape[1] for i, row in enumerate(flat)}
    images = np.concatenate([runs.support, runs.query]).reshape(-1, flat.shape[1])
    found = [lookup.get(row.tobytes()) for row in images]
    if any(f is None for f in found):
        raise ValueError("Some images of Lake's runs match no Omniglot drawing.")
    return np.unique(chars.ids[np.asarray(found)])


def split_holding_out(
    chars: Characters,
    held_out_ids: Sequence[int] | np.ndarray,
    sizes: Sequence[int] = SPLIT_SIZES,
    seed: int = 0,
) -> tuple[Characters, Characters, Characters]:
    """A seeded meta-train / meta-validation / meta-test split of the given sizes in which the
    characters `held_out_ids` are all in meta-test; each part is then rotated (x4 classes).

    **Raises:**

    `ValueError` if the held-out characters do not fit in meta-test, or the others do not fill
    meta-train and meta-validation.
    """
    held = np.isin(chars.ids, np.asarray(held_out_ids))
    n_train, n_val, n_test = (int(s) for s in sizes)
    others = np.flatnonzero(~held)
    if held.sum() > n_test or len(others) < n_train + n_val:
        raise ValueError(
            f"Cannot hold {held.sum()} characters out in a meta-test split of {n_test} with "
            f"{len(others)} others for meta-train and meta-validation ({n_train} + {n_val})."
        )
    train, val, rest = split(len(others), (n_train, n_val, n_test - int(held.sum())), seed)
    test = np.sort(np.concatenate([others[rest], np.flatnonzero(held)]))
    return tuple(rotate(chars.take(i)) for i in (others[train], others[val], test))  # type: ignore[return-value]


def runs_batch(runs: OneShotRuns) -> Batch:
    """Lake's 20 runs as a meta-batch of 20 episodes of 20 ways, one support image per class
    (label = class index) and one query per class (label = its answer)."""
    to_float = lambda x: (x.astype(np.float32) * np.float32(1 / 255))[..., None]
    labels = np.tile(np.arange(runs.support.shape[1], dtype=np.int32), (len(runs.support), 1))
    return Batch(to_float(runs.support), labels, to_float(runs.query), runs.answer.astype(np.int32))


def fixed_episodes(
    images: np.ndarray, n_way: int, k_shot: int, n_query: int, count: int, seed: int, chunk: int
) -> list[Batch]:
    """`count` episodes from one seed, in meta-batches of at most `chunk` (the evaluation sets:
    the same episodes at every evaluation)."""
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, count, chunk):
        e = sample_episodes(images, n_way, k_shot, n_query, min(chunk, count - start), rng)
        batches.append(Batch(e.support, e.support_labels, e.query, e.query_labels))
    return batches


class EpisodeStream:
    """Meta-batches sampled in a background thread, a few ahead, so that the device does not
    wait for NumPy. Its state (the generator's) is saved with the checkpoints, and a stream
    restarted from it yields the same batches as the one that was stopped.

    **Arguments:**

    - `images`: a split's images, `(classes, drawings, S, S)`.
    - `n_way`, `k_shot`, `n_query`, `meta_batch`: as `experiments.data.sample_episodes`.
    - `rng_state`: a saved `state()`, or an int seed.
    - `ahead`: how many meta-batches to sample in advance.
    """

    def __init__(self, images, n_way, k_shot, n_query, meta_batch, rng_state, ahead: int = 3):
        self._args = (images, n_way, k_shot, n_query, meta_batch)
        self._rng = np.random.default_rng(rng_state if isinstance(rng_state, int) else 0)
        if not isinstance(rng_state, int):
            self._rng.bit_generator.state = rng_state
        self._state = self._rng.bit_generator.state
        # Each batch is queued with the generator state after it was sampled.
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._thread.start()

    def _fill(self):
        while not self._stop.is_set():
            e = sample_episodes(*self._args, self._rng)
            after = self._rng.bit_generator.state
            item = (after, Batch(e.support, e.support_labels, e.query, e.query_labels))
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        self._state, batch = self._queue.get()
        return batch

    def state(self):
        """The generator state after the batch last returned: a stream restarted from it
        continues with the batch that this one would return next."""
        return self._state

    def close(self):
        self._stop.set()
        self._thread.join()
