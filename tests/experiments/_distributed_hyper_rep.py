"""Run by `tests/experiments/test_distributed.py`, once per process (`$JAX_COORDINATOR_ADDRESS`,
`$JAX_NUM_PROCESSES`, `$JAX_PROCESS_ID` set), and once in the test process itself:

    python tests/experiments/_distributed_hyper_rep.py OUT_DIR

Two meta-steps of `experiments.hyper_representation` (a tiny conv net, float64) on a meta-batch
of 8 episodes of which each process builds and holds only its own share
(`_distributed.global_batch_from_local`); process `i` writes the state it ends with to
`OUT_DIR/state_<i>.json`.
"""

import json
import pathlib
import sys


META_BATCH, N_WAY, T, SIZE = 8, 3, 3, 12


def episodes(indices):
    """Episodes `indices` of the meta-batch, each from its own seed (the same whoever draws it)."""
    import numpy as np

    from experiments import hyper_representation as hr

    parts = []
    for k in indices:
        rng = np.random.default_rng([7, k])
        labels = lambda m: np.repeat(np.arange(N_WAY, dtype=np.int32), m)
        parts.append(
            (
                rng.random((N_WAY, SIZE, SIZE, 1)),
                labels(1),
                rng.random((2 * N_WAY, SIZE, SIZE, 1)),
                labels(2),
            )
        )
    return hr.Batch(*(np.stack(x) for x in zip(*parts)))


def two_meta_steps(local_indices=None) -> dict:
    """Two meta-steps on the meta-batch; with `local_indices`, this process builds only those
    episodes (its share), else the whole meta-batch on one device."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import _distributed, hyper_representation as hr

    model = hr.HyperRepresentation(4, 2, key=jax.random.key(0), dtype=jnp.float64)
    optimizer = hr.make_optimizer(1e-2, 10)
    step = hr.make_meta_step(optimizer, N_WAY, T)
    mesh = hr.make_mesh()
    if local_indices is None:
        batch = hr.shard_batch(episodes(range(META_BATCH)), mesh)
    else:
        batch = _distributed.global_batch_from_local(episodes(local_indices), mesh)
    state = hr.replicate(hr.init_state(model, optimizer), mesh)
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch)
        losses.append(float(_distributed.to_host(metrics["loss"])))
    leaves = _distributed.to_host(jax.tree.leaves(eqx.filter(state, eqx.is_array)))
    return {"leaves": [np.asarray(x).tolist() for x in leaves], "loss": losses}


def main(out_dir: str) -> None:
    from experiments import _distributed

    _distributed.initialize()
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    local = _distributed.local_task_range(META_BATCH)
    state = two_meta_steps(local)
    state.update(process_index=jax.process_index(), local=list(local))
    path = pathlib.Path(out_dir) / f"state_{jax.process_index()}.json"
    path.write_text(json.dumps(state))


if __name__ == "__main__":
    main(sys.argv[1])
