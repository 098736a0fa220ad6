"""The grouped-L2 logistic-regression HO problem that several benchmarks time: feature `i`
has the L2 strength `exp(lam[group[i]])`, so the number of hyperparameters is a free knob."""

import jax.numpy as jnp


def log_loss(w, data):
    X, y = data
    z = X @ w
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z)


def inner_loss(w, lam, data):
    (X, y), group = data
    return log_loss(w, (X, y)) + 0.5 * jnp.sum(jnp.exp(lam[group]) * w**2)


def outer_loss(w, lam, data):
    del lam
    return log_loss(w, data)
