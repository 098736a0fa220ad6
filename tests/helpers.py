"""Comparison helpers for the tests, and the problem zoo they parametrise over.

The zoo (and `relerr`) live in `experiments/problems.py`, which the experiments share: the tests
import it from there (re-exported here), and nothing under `experiments/` imports the tests.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from experiments.problems import (  # noqa: F401  (re-exported for the tests)
    ALL as ALL,
    CONVEX as CONVEX,
    Problem as Problem,
    biased_ridge as biased_ridge,
    implicit as implicit,
    logistic as logistic,
    mlp as mlp,
    quadratic as quadratic,
    reference_hypergrad as reference_hypergrad,
    reference_solution as reference_solution,
    relerr as relerr,
    ridge as ridge,
    saddle as saddle,
    scaled_ridge as scaled_ridge,
    solve as solve,
)


def tree_allclose(a, b, rtol=1e-8, atol=1e-12) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def random_direction(tree, seed=0):
    """A random unit direction with the structure of the floating-point part of `tree`."""
    leaves, treedef = jax.tree.flatten(eqx.filter(tree, eqx.is_inexact_array))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    direction = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    norm = np.sqrt(sum(float(jnp.sum(d**2)) for d in direction))
    return jax.tree.unflatten(treedef, [d / norm for d in direction])


def central_difference(f: Callable, x, direction, eps: float = 1e-5) -> float:
    """(f(x + eps d) - f(x - eps d)) / 2 eps, in float64."""
    shift = lambda s: eqx.apply_updates(x, jax.tree.map(lambda d: s * eps * d, direction))
    return float((f(shift(1.0)) - f(shift(-1.0))) / (2 * eps))


def directional(grad, direction) -> float:
    """⟨grad, direction⟩ over the floating-point leaves."""
    grad = eqx.filter(grad, eqx.is_inexact_array)
    return float(
        sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    )
