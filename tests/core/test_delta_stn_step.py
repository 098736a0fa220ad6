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


def _reference(variant, general, model, hparams, x, y, key):
    # The draws of `weight_grads`: the perturbations, then one key per example (and, for
    # Algorithm 1's response pass, another).
    key_delta, key_examples = jax.random.split(key)
    delta = hparams.perturbation(key_delta, BATCH)
    lam_pert = hparams.constrain(hparams.values + delta, train=True)
    lam_now = jnp.broadcast_to(hparams.value(train=True), lam_pert.shape)
    keys = jax.random.split(key_examples, BATCH)
    keys_response = jax.random.split(jax.random.fold_in(key_examples, 1), BATCH)
    mean_loss = lambda out, lam: jnp.mean(jax.vmap(_loss)(out, y, lam))
    forward = jax.vmap(_forward, in_axes=(None, 0, 0, 0, 0))
    weights = _weights(model)
    general_of = lambda on_general, on_response: [
        (*g[:2], *r[2:]) for g, r in zip(on_general, on_response)
    ]

    if general == "centre" and variant != "stn":
        # Algorithm 1: (W, b) on the training loss at λ₀ (h = 0, dropout at λ₀); (V, c, H) on
        # the loss at λ₀ + δ, linearised (Δ-STN) or in full (the centred STN).
        at_centre = lambda w: mean_loss(forward(w, x, 0 * delta, lam_now, keys), lam_now)
        value, on_general = jax.value_and_grad(at_centre)(weights)

        def perturbed(w):
            at = lambda h: forward(w, x, h, lam_pert, keys_response)
            if variant == "centred":
                return mean_loss(at(delta), lam_pert)
            out, direction = jax.jvp(at, (jnp.zeros_like(delta),), (delta,))
            return mean_loss(out + direction, lam_pert)

        return value, _as_model(model, general_of(on_general, jax.grad(perturbed)(weights)))

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
    if general == "perturbed":
        # The general weights (W, b) on the δ = 0 loss with dropout at λ₀ + δ, the response
        # weights (V, c, H) on the linearised loss.
        on_unperturbed = jax.grad(lambda w: losses(w)[0])(weights)
        on_linearised = jax.grad(lambda w: losses(w)[1])(weights)
        grads = general_of(on_unperturbed, on_linearised)
    else:
        grads = jax.grad(lambda w: sum(losses(w)))(weights)
    return value, _as_model(model, grads)


CASES = [
    ("stn", "centre"),
    ("centred", "centre"),
    ("centred", "perturbed"),
    ("delta", "centre"),
    ("delta", "perturbed"),
    ("delta", "coupled"),
]


@pytest.fixture(scope="module")
def results():
    """`weight_grads` and the reference in each case, each side in one compilation (one per
    case would take most of the test's time)."""
    model, hparams = jax.jit(_model)(), jax.jit(_hparams)()
    x = jax.random.normal(jax.random.key(2), (BATCH, SIZES[0]), jnp.float64)
    y = jax.random.randint(jax.random.key(3), (BATCH,), 0, SIZES[-1])
    inputs = (model, hparams, x, y, jax.random.key(4))
    ours = jax.jit(
        lambda *a: [bnn.weight_grads(v, _apply, _loss, *a, general=g) for v, g in CASES]
    )(*inputs)
    reference = jax.jit(lambda *a: [_reference(v, d, *a) for v, d in CASES])(*inputs)
    return dict(zip(CASES, zip(ours, reference)))


@pytest.mark.parametrize("variant, general", CASES)
def test_weight_grads_match_a_plain_reference(results, variant, general):
    (value, grads), (value_ref, grads_ref) = results[variant, general]
    np.testing.assert_allclose(value, value_ref, rtol=1e-13)
    leaves, leaves_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    assert len(leaves) == len(leaves_ref) == 5 * (len(SIZES) - 1)
    for a, b in zip(leaves, leaves_ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # Every group of weights is trained, so no gradient was compared against a zero by accident.
    assert all(float(jnp.max(jnp.abs(a))) > 1e-6 for a in leaves)


@pytest.mark.parametrize("linearize", [False, True])
def test_delta_stn_hypergradient_matches_a_plain_reference(linearize):
    model, hparams = jax.jit(_model)(), jax.jit(_hparams)()
    x = jax.random.normal(jax.random.key(5), (BATCH, SIZES[0]), jnp.float64)
    y = jax.random.randint(jax.random.key(6), (BATCH,), 0, SIZES[-1])
    key = jax.random.key(7)
    val_loss = optax.softmax_cross_entropy_with_integer_labels

    def ours(hp):
        return bnn.hyper_loss("delta", _apply, val_loss, model, hp, x, y, key, linearize=linearize)

    def reference(hp):
        # Eval mode at h = λ + δ − λ₀: the full forward pass, as the authors' code runs it, or
        # the prediction linearised in h around h = 0.
        h = hp.values + hp.perturbation(key, BATCH) - jax.lax.stop_gradient(hp.values)
        at = lambda xi: lambda hh: _forward(_weights(model), xi, hh, None, None)
        linearised = lambda xi, hi: sum(jax.jvp(at(xi), (jnp.zeros_like(hi),), (hi,)))
        full = lambda xi, hi: at(xi)(hi)
        out = jax.vmap(linearised if linearize else full)(x, h)
        return jnp.mean(jax.vmap(val_loss)(out, y)) - 1e-3 * hp.entropy()

    value, grads = eqx.filter_jit(eqx.filter_value_and_grad(ours))(hparams)
    value_ref, grads_ref = eqx.filter_jit(eqx.filter_value_and_grad(reference))(hparams)
    np.testing.assert_allclose(value, value_ref, rtol=1e-13)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        assert float(jnp.max(jnp.abs(a))) > 1e-6


def _plain_step(weights, x, y, rates, keys):
    """The plain network's step at λ₀, written out: (W, b) only, dropout at λ₀."""

    def forward(wb, xi, key):
        layer_keys = jax.random.split(key, len(wb))
        for i, (W, b) in enumerate(wb):
            keep = jax.random.uniform(layer_keys[i], xi.shape, xi.dtype) >= rates[i]
            xi = W @ jnp.where(keep, xi / (1 - rates[i]), 0.0) + b
            xi = jax.nn.relu(xi) if i < len(wb) - 1 else xi
        return xi

    loss = lambda wb: jnp.mean(
        jax.vmap(_loss)(
            jax.vmap(forward, (None, 0, 0))(wb, x, keys), y, rates[None].repeat(len(y), 0)
        )
    )
    return jax.value_and_grad(loss)([(W, b) for W, b, *_ in weights])


def _response_step(weights, x, y, delta, rates, keys):
    """The response weights' step on the prediction linearised at h = 0, written out as the
    paper states it: z = W x + b, ż = W ẋ + (H δ) ⊙ (V x + c), grads of (V, c, H) only."""

    def forward(vch, xi, di, rates_i, key):
        layer_keys = jax.random.split(key, len(weights))
        tangent = jnp.zeros_like(xi)
        for i, ((W, b, *_), (V, c, H)) in enumerate(zip(weights, vch)):
            keep = jax.random.uniform(layer_keys[i], xi.shape, xi.dtype) >= rates_i[i]
            scale = jnp.where(keep, 1 / (1 - rates_i[i]), 0.0)
            xi, tangent = scale * xi, scale * tangent
            # The input does not depend on h: the first layer has no incoming tangent.
            incoming = 0.0 if i == 0 else W @ tangent
            z, zt = W @ xi + b, incoming + (H @ di) * (V @ xi + c)
            if i < len(weights) - 1:
                active = z > 0
                z, zt = jnp.where(active, z, 0.0), jnp.where(active, zt, 0.0)
            xi, tangent = z, zt
        return xi + tangent

    def loss(vch):
        out = jax.vmap(forward, (None, 0, 0, 0, 0))(vch, x, delta, rates, keys)
        return jnp.mean(jax.vmap(_loss)(out, y, rates))

    return jax.grad(loss)([tuple(w[2:]) for w in weights])


@pytest.mark.slow
def test_delta_stn_skips_the_products_that_are_zero():
    # XLA's flop count of the compiled step, machine-independent, against the algorithm as the
    # paper states it, written out by hand: the plain network's step at λ₀ for (W, b), and the
    # linearised pass z + ż, ż = W ẋ + (H δ) ⊙ (V x + c), differentiated for (V, c, H) only.
    # Every product with H h = 0 that `weight_grads` computed would count above that.
    sizes, batch = (96, 64, 64, 4), 32
    model = bnn.StnMLP(sizes, 3, key=jax.random.key(0), dtype=jnp.float32)
    specs = [bnn.Hyperparameter(f"dropout{i}", 0.2, "sigmoid") for i in range(3)]
    hparams = bnn.HyperParameters(specs, dtype=jnp.float32)
    x = jnp.ones((batch, sizes[0]), jnp.float32)
    y = jnp.zeros(batch, jnp.int32)

    def flops(step, *args):
        cost = jax.jit(step).lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    ours = lambda m, k: bnn.weight_grads("delta", _apply, _loss, m, hparams, x, y, k)
    weights = _weights(model)
    rates = hparams.value(train=True)
    keys = jax.random.split(jax.random.key(0), batch)
    delta = jnp.ones((batch, 3), jnp.float32)
    by_hand = flops(_plain_step, weights, x, y, rates, keys) + flops(
        _response_step, weights, x, y, delta, jnp.broadcast_to(rates, (batch, 3)), keys
    )
    assert flops(ours, model, jax.random.key(0)) < 1.1 * by_hand


@pytest.mark.parametrize("variant", ["delta", "centred"])
@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_general_weights_train_at_lambda0_whatever_sigma(variant, scale):
    # Algorithm 1: w₀'s gradient is the plain network's at λ₀ itself (dropout at λ₀'s rates,
    # the same examples' keys), however large the perturbations the response weights see.
    model = _model()
    specs = _hparams().specs
    hparams = bnn.HyperParameters(specs, scale=scale, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(8), (BATCH, SIZES[0]), jnp.float64)
    y = jax.random.randint(jax.random.key(9), (BATCH,), 0, SIZES[-1])
    key = jax.random.key(10)
    value, grads = bnn.weight_grads(variant, _apply, _loss, model, hparams, x, y, key)
    keys = jax.random.split(jax.random.split(key)[1], BATCH)
    rates = hparams.value(train=True)
    value_ref, grads_ref = _plain_step(_weights(model), x, y, rates, keys)
    np.testing.assert_allclose(value, value_ref, rtol=1e-12)
    for layer, (dW, db) in zip(grads.layers, grads_ref):
        np.testing.assert_allclose(layer.general.weight, dW, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(layer.general.bias, db, rtol=1e-12, atol=1e-15)


def test_full_and_linearised_hyper_steps_agree_to_second_order_in_sigma():
    # Antithetic perturbations (ε and −ε on copies of the batch) cancel the first-order term of
    # the gap between the λ-gradients, so it shrinks as σ²: halving σ quarters it. (From
    # σ ≈ 0.1 up, perturbations cross the ReLUs' kinks and the expansion no longer holds.)
    model = _model()
    x = jax.random.normal(jax.random.key(11), (BATCH, SIZES[0]), jnp.float64)
    y = jax.random.randint(jax.random.key(12), (BATCH,), 0, SIZES[-1])
    eps = jax.random.normal(jax.random.key(13), (BATCH, 2), jnp.float64)
    x2, y2, noise = jnp.concatenate([x, x]), jnp.concatenate([y, y]), jnp.concatenate([eps, -eps])
    val_loss = optax.softmax_cross_entropy_with_integer_labels

    def values_grad(scale, linearize):
        hparams = bnn.HyperParameters(_hparams().specs, scale=scale, dtype=jnp.float64)
        loss = lambda values: bnn.hyper_loss(
            "delta",
            _apply,
            val_loss,
            model,
            eqx.tree_at(lambda hp: hp.values, hparams, values),
            x2,
            y2,
            None,
            linearize=linearize,
            noise=noise,
        )
        return jax.grad(loss)(hparams.values)

    gaps = [
        float(jnp.linalg.norm(values_grad(s, False) - values_grad(s, True))) for s in (0.05, 0.025)
    ]
    size = float(jnp.linalg.norm(values_grad(0.025, False)))
    assert gaps[1] < 1e-2 * size  # they agree to first order
    assert 3.0 < gaps[0] / gaps[1] < 5.0  # and the gap is second order


@pytest.mark.parametrize("variant", ["delta", "centred"])
def test_the_two_parts_of_algorithm_1_make_the_whole_step(variant):
    # `part="general"` and `part="response"` are the step's two passes: their gradients add up
    # to the whole step's, each zero on the other's weights, with the same draws.
    model, hparams = _model(), _hparams()
    x = jax.random.normal(jax.random.key(14), (BATCH, SIZES[0]), jnp.float64)
    y = jax.random.randint(jax.random.key(15), (BATCH,), 0, SIZES[-1])
    step = lambda part: bnn.weight_grads(
        variant, _apply, _loss, model, hparams, x, y, jax.random.key(16), part=part
    )
    (value, whole), (value_general, general), (_, response) = map(
        step, ("both", "general", "response")
    )
    np.testing.assert_allclose(value_general, value, rtol=1e-14)
    is_response = bnn.response_filter(whole)
    for r, w, g, s in zip(*map(jax.tree.leaves, (is_response, whole, general, response))):
        np.testing.assert_allclose(s if r else g, w, rtol=1e-12, atol=1e-15)
        assert float(jnp.max(jnp.abs(g if r else s))) == 0.0
