"""The grouped-L2 logistic-regression HO problem that several benchmarks time: feature `i`
has the L2 strength `exp(lam[group[i]])`, so the number of hyperparameters is a free knob."""

import jax.numpy as jnp

from ..problems import log_loss as log_loss, logistic_outer as outer_loss  # noqa: F401


def inner_loss(w, lam, data):
    (X, y), group = data
    return log_loss(w, (X, y)) + 0.5 * jnp.sum(jnp.exp(lam[group]) * w**2)
