"""The weight phase's two step orders (`experiments.delta_stn._loop.weight_phase_step`):
"sequential", the authors' code, steps the general weights w₀ first and takes the response's
gradient at the new w₀; "simultaneous" takes both gradients at the same w₀. Checked against
`bnn.weight_grads` and SGD written out by hand."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import bilevax.nn as bnn
from experiments.delta_stn._loop import weight_phase_step
from experiments.delta_stn._tasks import make_task


LR = 0.1


# The centred STN's case takes ~20 s more, and its step is Δ-STN's without the linearisation.
@pytest.mark.parametrize("variant", ["delta", pytest.param("centred", marks=pytest.mark.slow)])
def test_sequential_order_takes_the_response_gradient_at_the_new_general_weights(variant):
    task = make_task("dropout-regression", 0, True)
    model = task.init_model(jax.random.key(1))
    hparams = bnn.HyperParameters(task.specs, scale=task.scale, dtype=task.dtype)
    x, y = (jnp.asarray(a[:32]) for a in task.train)
    key = jax.random.key(2)
    params = eqx.filter(model, eqx.is_inexact_array)
    is_response = bnn.response_filter(params)
    is_general = jax.tree.map(lambda r: not r, is_response)
    sgd = optax.sgd(LR)
    pair = (optax.masked(sgd, is_general), optax.masked(sgd, is_response))

    step = eqx.filter_jit(
        lambda optimizer, state: weight_phase_step(
            task, variant, optimizer, model, hparams, state, (x, y), key
        )
    )
    together, _, _ = step(sgd, sgd.init(params))
    in_turn, _, _ = step(pair, tuple(o.init(params) for o in pair))

    # By hand: w₀ from its gradient at the old w₀, then the response from its gradient at
    # the new w₀ (the same batch and dropout key).
    grads = eqx.filter_jit(
        lambda model, part: bnn.weight_grads(
            variant, task.apply, task.train_loss, model, hparams, x, y, key, part=part
        )[1]
    )
    sgd_step = lambda model, grads: eqx.apply_updates(model, jax.tree.map(lambda g: -LR * g, grads))
    general_grads = eqx.filter(grads(model, "general"), is_general)
    new_general = sgd_step(model, general_grads)
    response_grads = eqx.filter(grads(new_general, "response"), is_response)
    expected = sgd_step(new_general, response_grads)

    leaves = lambda m, spec: jax.tree.leaves(eqx.filter(m, spec))
    for got, want in zip(leaves(in_turn, is_general), leaves(expected, is_general)):
        assert jnp.allclose(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(leaves(in_turn, is_response), leaves(expected, is_response)):
        assert jnp.allclose(got, want, rtol=1e-6, atol=1e-7)
    # The simultaneous order moves w₀ alike, but its response step was taken at the old w₀:
    # the two orders must differ there, or this test could not tell them apart.
    for got, want in zip(leaves(together, is_general), leaves(in_turn, is_general)):
        assert jnp.allclose(got, want, rtol=1e-6, atol=1e-7)
    gap = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(leaves(together, is_response), leaves(in_turn, is_response))
    )
    assert gap > 1e-6
