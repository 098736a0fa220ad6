"""Parameter updates with optax, as every experiment makes them."""

import jax
import optax


def optax_step(optimizer: optax.GradientTransformation, grads, opt_state, params, *, project=None):
    """One update of `params` by an optax `optimizer`: `(params, opt_state)`, with the
    result passed through `project` (e.g. onto a box or the simplex) if given.

    It runs under JAX's standard dtype promotion, whatever the process's setting: optax mixes
    its int32 step count with floats (Adam's `b1**count`), and its projections mix integers
    and floats too, which strict promotion refuses."""
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if project is not None:
            params = project(params)
    return params, opt_state
