import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import central_difference, relerr

import bilevax as bx


def _hypernet(key):
    """A centred hypernetwork's forward pass: outputs as a function of a 2-d hyperparameter."""
    k1, k2 = jax.random.split(key)
    W = jax.random.normal(k1, (3, 4))
    Theta = 0.3 * jax.random.normal(k2, (2, 4))

    def fn(lam, x):
        return jnp.tanh(x @ (W + jnp.outer(jnp.ones(3), lam @ Theta)))

    return fn


def test_value_and_linearisation():
    fn = _hypernet(jax.random.key(0))
    lam, delta, x = jnp.asarray([0.2, -0.4]), jnp.asarray([0.05, 0.02]), jnp.ones(3)
    out, out_lin = bx.linearized_response(fn, lam, delta, x)
    assert relerr(out, fn(lam, x)) < 1e-15
    assert relerr(out_lin, fn(lam, x) + jax.jacfwd(fn)(lam, x) @ delta) < 1e-14
    # First order: the linearisation error is O(‖δ‖²).
    err = lambda s: float(
        jnp.linalg.norm(bx.linearized_response(fn, lam, s * delta, x)[1] - fn(lam + s * delta, x))
    )
    assert err(0.1) / err(0.2) == pytest.approx(0.25, rel=0.05)


def test_one_forward_pass():
    calls = []

    def fn(lam, x):
        calls.append(None)
        return jnp.sin(lam * x)

    jax.make_jaxpr(lambda l, t: bx.linearized_response(fn, l, t, 2.0))(1.0, 0.1)
    assert len(calls) == 1


def test_per_example_perturbations_under_vmap_and_grad():
    fn = _hypernet(jax.random.key(1))
    lam = jnp.asarray([0.1, 0.3])
    deltas = 0.1 * jax.random.normal(jax.random.key(2), (5, 2))
    xs = jax.random.normal(jax.random.key(3), (5, 3))
    outs, lins = jax.vmap(bx.linearized_response, in_axes=(None, None, 0, 0))(fn, lam, deltas, xs)
    for i in range(5):
        out, lin = bx.linearized_response(fn, lam, deltas[i], xs[i])
        assert relerr(outs[i], out) < 1e-15 and relerr(lins[i], lin) < 1e-15

    def loss(lam):
        _, lins = jax.vmap(bx.linearized_response, in_axes=(None, None, 0, 0))(fn, lam, deltas, xs)
        return jnp.sum(lins**2)

    direction = jnp.asarray([0.6, 0.8])
    fd = central_difference(loss, lam, direction)
    assert float(jax.grad(loss)(lam) @ direction) == pytest.approx(fd, rel=1e-8)


def test_pytree_hyperparameters_and_outputs():
    fn = lambda h, x: {"a": h["p"] * x, "b": jnp.exp(h["q"]) + x}
    primal = {"p": jnp.asarray(2.0), "q": jnp.asarray(0.0)}
    tangent = {"p": jnp.asarray(0.1), "q": jnp.asarray(0.2)}
    out, lin = bx.linearized_response(fn, primal, tangent, jnp.asarray(3.0))
    assert float(out["a"]) == 6.0 and float(lin["a"]) == pytest.approx(6.3, rel=1e-14)
    assert float(lin["b"]) == pytest.approx(4.2, rel=1e-14)
    assert eqx.tree_equal(jax.tree.structure(out), jax.tree.structure(lin))
