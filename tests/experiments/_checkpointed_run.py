"""A resumable loop of the run harness, for `test_checkpoint.py`: in one process, or run once per
process with `$JAX_COORDINATOR_ADDRESS`, `$JAX_NUM_PROCESSES` and `$JAX_PROCESS_ID` set:

    python tests/experiments/_checkpointed_run.py OUT STEPS [--resume] [--distributed]
        [--kill-at-save J]

Its state holds an array split over every device of every process (so with several processes
each writes its own shards), a PRNG key and a growing history. With `--kill-at-save J`,
process 0 kills itself with SIGKILL during the J-th save, once orbax has written it and before
it is renamed into place. Each process writes what it ended with to `OUT/final_<i>.json`: the
array, the key, the history, the steps this invocation executed and the run's progress.
"""

import json
import os
import pathlib
import signal
import sys


STEPS_PER_DEVICE = 4


def kill_during_save(number: int) -> None:
    """SIGKILL this process in its `number`-th save, between writing and renaming."""
    import orbax.checkpoint as ocp

    finalize, saves = ocp.PyTreeCheckpointHandler.finalize, []

    def finalize_or_die(self, directory):
        saves.append(directory)
        if len(saves) == number:
            os.kill(os.getpid(), signal.SIGKILL)
        return finalize(self, directory)

    ocp.PyTreeCheckpointHandler.finalize = finalize_or_die


def run(argv: list[str]) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from experiments import _cli, _distributed, _harness

    p = _cli.parser("checkpointed_run", "a checkpointed loop", distributed=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--kill-at-save", type=int, default=None)
    args = p.parse_args(argv)
    run = _harness.start(args, may_grow=("steps",), may_change=("kill_at_save",))
    if args.kill_at_save is not None and jax.process_index() == 0:
        kill_during_save(args.kill_at_save)
    mesh = _distributed.make_mesh()
    split = NamedSharding(mesh, P(_distributed.TASKS))
    size = STEPS_PER_DEVICE * jax.device_count()
    update = jax.jit(lambda x, u: jnp.sin(x) * 1.5 + u, out_shardings=split)

    def fresh():
        return dict(x=np.linspace(0.0, 1.0, size), key=jax.random.key(0), history=[])

    def prepare(state):
        x = np.asarray(state["x"])
        state["x"] = jax.make_array_from_callback(x.shape, split, lambda index: x[index])
        return state

    executed = []

    def step(k, state):
        executed.append(k)
        state["key"], key = jax.random.split(state["key"])
        u = float(jax.random.uniform(key, dtype=jnp.float64))
        state["x"] = update(state["x"], u)
        state["history"].append(np.float64(u))
        return state, f"u {u:.3f}"

    state = run.loop("loop", args.steps, fresh, step, prepare=prepare)
    final = dict(
        x=_distributed.to_host(state["x"]).tolist(),
        key=np.asarray(jax.random.key_data(state["key"])).tolist(),
        history=[float(u) for u in state["history"]],
        executed=executed,
        progress=run.progress["loop"],
    )
    path = pathlib.Path(args.out) / f"final_{jax.process_index()}.json"
    path.write_text(json.dumps(final))
    return final


if __name__ == "__main__":
    out, steps, *rest = sys.argv[1:]
    run(["--out", out, "--steps", steps, *rest])
