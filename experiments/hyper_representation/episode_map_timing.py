"""Time one meta-step of each head with the meta-batch's episodes `jax.vmap`-ed and
`jax.lax.map`-ped, and with each lowering of the convolutions (`--conv xla` and `matmul`), at
the `--quick` budget's size (width 32, 5-way 1-shot, 5 queries per class, meta-batch 8, T = 5,
float32) on random images: the measurement behind the vmap-or-map and `--conv` notes of
docs/hyper-representation.md.

    python experiments/hyper_representation/episode_map_timing.py [HEAD ...]
"""

import itertools
import statistics
import sys
import time

import jax
import numpy as np

from experiments import hyper_representation as hr
from experiments.data import sample_episodes
from experiments.hyper_representation._model import CONV_LOWERINGS


def time_heads(heads, repeats: int = 5) -> dict:
    """`{(head, conv, episode_map): (compile seconds, median ms per meta-step)}`."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 20, 28, 28), dtype=np.uint8)
    e = sample_episodes(images, 5, 1, 5, 8, rng)
    batch = hr.Batch(
        e.support,
        np.asarray(e.support_labels, np.int32),
        e.query,
        np.asarray(e.query_labels, np.int32),
    )
    optimizer = hr.make_optimizer(3e-3, 600)
    out = {}
    for head, conv, episode_map in itertools.product(heads, CONV_LOWERINGS, ("vmap", "map")):
        model = hr.HyperRepresentation(32, key=jax.random.key(0), conv=conv)
        state = hr.init_state(model, optimizer)
        adapt = hr.AdaptOptions(episode_map=episode_map)
        tic = time.perf_counter()
        step = hr.make_meta_step(optimizer, 5, 5, head, adapt).lower(state, batch).compile()
        compile_seconds = time.perf_counter() - tic
        jax.block_until_ready(step(state, batch))  # warm-up
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            jax.block_until_ready(step(state, batch))
            times.append(time.perf_counter() - tic)
        out[head, conv, episode_map] = (compile_seconds, 1e3 * statistics.median(times))
        print(
            f"{head:10s} {conv:6s} {episode_map:5s} compile {compile_seconds:6.1f} s "
            f"{out[head, conv, episode_map][1]:8.0f} ms/meta-step",
            flush=True,
        )
    return out


if __name__ == "__main__":
    time_heads(sys.argv[1:] or ["linear", "maml", "fomaml", "imaml"])
