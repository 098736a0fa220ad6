"""`bilevax.nn.weight_grads` against a plain reference: an STN MLP written out by hand and the
Δ-STN gradients written as the definitions say (a JVP for the linearised prediction, then one
`jax.grad` per loss and weight group), in float64. Guards the speed work on the weight step
(`experiments/benchmarks/delta_stn_step.py`): whatever it skips must be exactly zero."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevax.nn as bnn


SIZES = (6, 5, 3)
BATCH = 9


def _model():
    model = bnn.StnMLP(SIZES, 2, key=jax.random.key(0), dtype=jnp.float64)
    # A trained-looking hypernetwork: with the bottlenecks at their initial zero, the response
    # weights would get no gradient and the check would miss them.
    keys = jax.random.split(jax.random.key(1), len(model.layers))
    return eqx.tree_at(
        lambda m: [layer.bottleneck for layer in m.layers],
        model,
        [
            0.5 * jax.random.normal(k, layer.bottleneck.shape, jnp.float64)
            for k, layer in zip(keys, model.layers)
        ],
    )


def _hparams():
    specs = [bnn.Hyperparameter(f"dropout{i}", 0.2 + 0.1 * i, "sigmoid") for i in range(2)]
    return bnn.HyperParameters(specs, scale=0.5, dtype=jnp.float64)


def _apply(model, x, h, lam, key, train):
    return model(x, h, lam, key, train=train)


def _loss(out, y, lam):
    # Uses λ directly, as an L2 strength would, so that the λ each loss sees is checked too.
    return optax.softmax_cross_entropy_with_integer_labels(out, y) + lam[0] * jnp.sum(out**2)


def _forward(weights, x, h, rates, key):
    """The STN MLP on one example, from its weights `[(W, b, V, c, H), ...]`, with dropout on
    every layer's input (none when `key` is `None`): $z = W x + b + (H h) \\odot (V x + c)$."""
    keys = jax.random.split(key, len(weights)) if key is not None else None
    for i, (W, b, V, c, H) in enumerate(weights):
        if keys is not None:
            keep = jax.random.uniform(keys[i], x.shape, x.dtype) >= rates[i]
            x = jnp.where(keep, x / (1 - rates[i]), 0.0)
        x = W @ x + b + (H @ h) * (V @ x + c)
        if i < len(weights) - 1:
            x = jax.nn.relu(x)
    return x


def _weights(model):
    return [
        (
            layer.general.weight,
            layer.general.bias,
            layer.response.weight,
            layer.response.bias,
            layer.bottleneck,
        )
        for layer in model.layers
    ]


def _as_model(model, grads):
    return eqx.tree_at(
        lambda m: [
            leaf
            for layer in m.layers
            for leaf in (
                layer.general.weight,
                layer.general.bias,
                layer.response.weight,
                layer.response.bias,
                layer.bottleneck,
            )
        ],
        model,
        [leaf for layer in grads for leaf in layer],
    )


def _reference(variant, decouple, model, hparams, x, y, key):
    # The draws of `weight_grads`: the perturbations, then one key per example.
    key_delta, key_examples = jax.random.split(key)
    delta = hparams.perturbation(key_delta, BATCH)
    lam_pert = hparams.constrain(hparams.values + delta, train=True)
    lam_now = jnp.broadcast_to(hparams.value(train=True), lam_pert.shape)
    keys = jax.random.split(key_examples, BATCH)
    mean_loss = lambda out, lam: jnp.mean(jax.vmap(_loss)(out, y, lam))
    forward = jax.vmap(_forward, in_axes=(None, 0, 0, 0, 0))
    weights = _weights(model)

    if variant != "delta":
        h = hparams.values + delta if variant == "stn" else delta
        loss_fn = lambda w: mean_loss(forward(w, x, h, lam_pert, keys), lam_pert)
        value, grads = jax.value_and_grad(loss_fn)(weights)
        return value, _as_model(model, grads)

    def losses(w):
        at = lambda h: forward(w, x, h, lam_pert, keys)
        out, direction = jax.jvp(at, (jnp.zeros_like(delta),), (delta,))
        return mean_loss(out, lam_now), mean_loss(out + direction, lam_pert)

    value = losses(weights)[0]
    if decouple:
        # The general weights (W, b) on the δ = 0 loss, the response weights (V, c, H) on the
        # linearised loss.
        on_unperturbed = jax.grad(lambda w: losses(w)[0])(weights)
        on_linearised = jax.grad(lambda w: losses(w)[1])(weights)
        grads = [(*g[:2], *r[2:]) for g, r in zip(on_unperturbed, on_linearised)]
    else:
        grads = jax.grad(lambda w: sum(losses(w)))(weights)
    return value, _as_model(model, grads)


CASES = [("stn", True), ("centred", True), ("delta", True), ("delta", False)]


@pytest.fixture(scope="module")
def results():
    """`weight_grads` and the reference in each case, each side in one compilation (one per
    case would take most of the test's time)."""
    model, hparams = jax.jit(_model)(), jax.jit(_hparams)()
    x = jax.random.normal(jax.random.key(2), (BATCH, SIZES[0]), jnp.float64)
    y = jax.random.randint(jax.random.key(3), (BATCH,), 0, SIZES[-1])
    inputs = (model, hparams, x, y, jax.random.key(4))
    ours = jax.jit(
        lambda *a: [bnn.weight_grads(v, _apply, _loss, *a, decouple=d) for v, d in CASES]
    )(*inputs)
    reference = jax.jit(lambda *a: [_reference(v, d, *a) for v, d in CASES])(*inputs)
    return dict(zip(CASES, zip(ours, reference)))


@pytest.mark.parametrize("variant, decouple", CASES)
def test_weight_grads_match_a_plain_reference(results, variant, decouple):
    (value, grads), (value_ref, grads_ref) = results[variant, decouple]
    np.testing.assert_allclose(value, value_ref, rtol=1e-13)
    leaves, leaves_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    assert len(leaves) == len(leaves_ref) == 5 * (len(SIZES) - 1)
    for a, b in zip(leaves, leaves_ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # Every group of weights is trained, so no gradient was compared against a zero by accident.
    assert all(float(jnp.max(jnp.abs(a))) > 1e-6 for a in leaves)


def test_delta_stn_hypergradient_matches_a_plain_reference():
    model, hparams = jax.jit(_model)(), jax.jit(_hparams)()
    x = jax.random.normal(jax.random.key(5), (BATCH, SIZES[0]), jnp.float64)
    y = jax.random.randint(jax.random.key(6), (BATCH,), 0, SIZES[-1])
    key = jax.random.key(7)
    val_loss = optax.softmax_cross_entropy_with_integer_labels

    def ours(hp):
        return bnn.hyper_loss("delta", _apply, val_loss, model, hp, x, y, key)

    def reference(hp):
        # Eval mode, the prediction linearised in h = λ + δ − λ₀ around h = 0.
        h = hp.values + hp.perturbation(key, BATCH) - jax.lax.stop_gradient(hp.values)
        at = lambda xi: lambda hh: _forward(_weights(model), xi, hh, None, None)
        linearised = lambda xi, hi: sum(jax.jvp(at(xi), (jnp.zeros_like(hi),), (hi,)))
        out = jax.vmap(linearised)(x, h)
        return jnp.mean(jax.vmap(val_loss)(out, y)) - 1e-3 * hp.entropy()

    value, grads = eqx.filter_jit(eqx.filter_value_and_grad(ours))(hparams)
    value_ref, grads_ref = eqx.filter_jit(eqx.filter_value_and_grad(reference))(hparams)
    np.testing.assert_allclose(value, value_ref, rtol=1e-13)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        assert float(jnp.max(jnp.abs(a))) > 1e-6


def test_delta_stn_skips_the_products_that_are_zero():
    # XLA's flop count of the compiled step, machine-independent: Δ-STN does the products of
    # an STN step and one more per layer with an incoming tangent (W ẋ), backward alike, about
    # 1.1x an STN step here; 1.7x when the products with H h = 0 are computed too.
    sizes, batch = (96, 64, 64, 4), 32
    model = bnn.StnMLP(sizes, 3, key=jax.random.key(0), dtype=jnp.float32)
    specs = [bnn.Hyperparameter(f"dropout{i}", 0.2, "sigmoid") for i in range(3)]
    hparams = bnn.HyperParameters(specs, dtype=jnp.float32)
    x = jnp.ones((batch, sizes[0]), jnp.float32)
    y = jnp.zeros(batch, jnp.int32)

    def flops(variant):
        step = lambda m, k: bnn.weight_grads(variant, _apply, _loss, m, hparams, x, y, k)
        cost = jax.jit(step).lower(model, jax.random.key(0)).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops("delta") < 1.2 * flops("stn")
