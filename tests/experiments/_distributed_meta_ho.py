"""Run by `tests/experiments/test_distributed.py`, once per process, with
`$JAX_COORDINATOR_ADDRESS`, `$JAX_NUM_PROCESSES` and `$JAX_PROCESS_ID` set:

    python tests/experiments/_distributed_meta_ho.py STATE_DIR [meta_ho options, --distributed]

Runs `experiments.meta_ho.main` and writes what this process ended with (λ, Adam's state, the
meta-gradients and losses of every step, the process layout) to `STATE_DIR/state_<i>.json`, so
that the test can check that every process holds the same outer state, and that it is the one
a single process computes.
"""

import json
import pathlib
import sys


def main(state_dir: str, argv: list[str]) -> None:
    import jax

    from experiments import meta_ho

    results = meta_ho.main(argv)
    state = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "lam": results["log_lam"].tolist(),
        "opt_state": [leaf.tolist() for leaf in jax.tree.leaves(results["opt_state"])],
        "meta_grad": [g.tolist() for g in results["history"]["meta_grad"]],
        "val_loss": [float(v) for v in results["history"]["val_loss"]],
        "relerr": [float(v) for v in results["history"]["relerr"]],
    }
    path = pathlib.Path(state_dir) / f"state_{jax.process_index()}.json"
    path.write_text(json.dumps(state))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
