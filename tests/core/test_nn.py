"""`bilevax.nn`: the hyperparameter container, the STN layers and the three variants' losses,
checked against closed forms, plain layers and float64 finite differences."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from helpers import central_difference

import bilevax as bx
import bilevax.nn as bnn


SPECS = [
    bnn.Hyperparameter("rate", 0.3, "sigmoid", 0.0, 1.0),
    bnn.Hyperparameter("strength", 2.0, "softplus", lower=0.5),
    bnn.Hyperparameter("log_l2", -1.5, "identity"),
    bnn.Hyperparameter("length", 7.6, "sigmoid", 0.0, 24.0, integer=True),
]


def _hparams(scale=0.4):
    return bnn.HyperParameters(SPECS, scale=scale, dtype=jnp.float64)


def test_range_transforms_round_trip_and_closed_form():
    hp = _hparams()
    np.testing.assert_allclose(hp.value(), [0.3, 2.0, -1.5, 7.6], rtol=1e-12)
    u = jnp.asarray([[-2.0, 0.5, 3.0, 1.0], [4.0, -3.0, -7.0, -1.0]])
    expected = np.stack(
        [
            1 / (1 + np.exp(-u[:, 0])),
            0.5 + np.log1p(np.exp(u[:, 1])),
            u[:, 2],
            24 / (1 + np.exp(-u[:, 3])),
        ],
        axis=-1,
    )
    np.testing.assert_allclose(hp.constrain(u), expected, rtol=1e-12)


def test_integer_hyperparameters_floored_on_the_training_side_only():
    hp = _hparams()
    assert float(hp.value()[3]) == pytest.approx(7.6)
    assert float(hp.value(train=True)[3]) == 7.0
    # Only the integer one is floored.
    np.testing.assert_allclose(hp.value(train=True)[:3], hp.value()[:3], rtol=0)


def test_entropy_closed_form():
    hp = _hparams()
    hp = eqx.tree_at(lambda h: h.scales, hp, jnp.asarray([-1.0, 0.0, 0.7, 2.0]))
    sigma = np.log1p(np.exp([-1.0, 0.0, 0.7, 2.0]))
    np.testing.assert_allclose(hp.sigma, sigma, rtol=1e-12)
    expected = sum(scipy.stats.norm(scale=s).entropy() for s in sigma)
    assert float(hp.entropy()) == pytest.approx(expected, rel=1e-12)


def test_perturbations_per_example_with_scale_sigma():
    hp = _hparams(scale=0.25)
    delta = hp.perturbation(jax.random.key(0), 20_000)
    assert delta.shape == (20_000, 4)
    # Sample sd of 20,000 normals: relative standard error 0.5%.
    np.testing.assert_allclose(np.std(delta, axis=0), 0.25, rtol=0.03)
    assert not np.allclose(delta[0], delta[1])


def test_bad_specs_raise():
    with pytest.raises(ValueError, match="transform"):
        bnn.Hyperparameter("x", 0.5, "tanh")
    with pytest.raises(ValueError, match="init"):
        bnn.Hyperparameter("x", 1.5, "sigmoid", 0.0, 1.0)
    with pytest.raises(TypeError, match="specs"):
        bnn.HyperParameters([])
    with pytest.raises(ValueError, match="u"):
        _hparams().constrain(jnp.zeros(3))


def _mlp(key, num_hparams=2, bottleneck=None):
    model = bnn.StnMLP((5, 7, 3), num_hparams, key=key, dtype=jnp.float64)
    if bottleneck is not None:
        keys = jax.random.split(jax.random.key(bottleneck), len(model.layers))
        model = eqx.tree_at(
            lambda m: [layer.bottleneck for layer in m.layers],
            model,
            [
                jax.random.normal(k, layer.bottleneck.shape, jnp.float64)
                for k, layer in zip(keys, model.layers)
            ],
        )
    return model


def test_layers_start_as_plain_layers():
    key = jax.random.key(1)
    layer = bnn.StnLinear(4, 3, 2, key=key, dtype=jnp.float64)
    x, h = jnp.arange(4.0), jnp.asarray([0.3, -2.0])
    np.testing.assert_array_equal(layer(x, h), layer.general(x))
    np.testing.assert_array_equal(layer(x, None), layer.general(x))
    conv = bnn.StnConv2d(2, 3, 3, 2, padding=1, key=key, dtype=jnp.float64)
    image = jax.random.normal(key, (2, 6, 6), jnp.float64)
    np.testing.assert_array_equal(conv(image, h), conv.general(image))
    with pytest.raises(ValueError, match="`h`"):
        layer(x, jnp.zeros(3))


def test_centred_response_at_lambda0_is_the_general_weights():
    layer = bnn.StnLinear(4, 3, 2, key=jax.random.key(2), dtype=jnp.float64)
    layer = eqx.tree_at(lambda m: m.bottleneck, layer, jnp.ones((3, 2), jnp.float64))
    hp = bnn.HyperParameters(SPECS[:2], dtype=jnp.float64)
    h0 = hp.values - jax.lax.stop_gradient(hp.values)  # λ − λ0 at λ = λ0
    np.testing.assert_array_equal(layer.effective_weight(h0), layer.general.weight)
    # Uncentred, the same layer responds at λ0 (the STN's parameterisation).
    assert not np.allclose(layer.effective_weight(hp.values), layer.general.weight)


def _apply(model, x, h, lam, key, train):
    return model(x, h, lam[:2], key, train=train)


def _data(n=6, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, 5), jnp.float64), jax.random.randint(ky, (n,), 0, 3)


def _ce(out, y, lam=None):
    return -jax.nn.log_softmax(out)[y]


def _plain_loss(model, x, y):
    out = jax.vmap(lambda xi: _apply(model, xi, None, jnp.zeros(2), None, False))(x)
    return jnp.mean(jax.vmap(_ce)(out, y))


def _apply_no_dropout(model, x, h, lam, key, train):
    return model(x, h, jnp.zeros(2, x.dtype), key, train=False)


@pytest.mark.slow
@pytest.mark.parametrize("variant", bnn.VARIANTS)
def test_variants_agree_with_a_plain_network_at_init(variant):
    model = _mlp(jax.random.key(3))
    hp = bnn.HyperParameters(SPECS[:2], dtype=jnp.float64)
    x, y = _data()
    plain = _plain_loss(model, x, y)
    np.testing.assert_allclose(
        bnn.predict(variant, _apply_no_dropout, model, hp, x),
        jax.vmap(lambda xi: _apply(model, xi, None, jnp.zeros(2), None, False))(x),
        rtol=1e-14,
    )
    value = bnn.hyper_loss(variant, _apply_no_dropout, _ce, model, hp, x, y, jax.random.key(4))
    assert float(value + 1e-3 * hp.entropy()) == pytest.approx(float(plain), rel=1e-12)
    loss, grads = bnn.weight_grads(
        variant, _apply_no_dropout, _ce, model, hp, x, y, jax.random.key(5)
    )
    assert float(loss) == pytest.approx(float(plain), rel=1e-12)
    # The bottleneck starts at zero: the general weights' gradient is the plain network's.
    plain_grads = eqx.filter_grad(_plain_loss)(model, x, y)
    general, _, _ = bnn.split_weights(grads)
    plain_general, _, _ = bnn.split_weights(plain_grads)
    for a, b in zip(jax.tree.leaves(general), jax.tree.leaves(plain_general)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_linearisation_exact_for_a_layer_linear_in_delta():
    layer = bnn.StnLinear(4, 3, 2, key=jax.random.key(6), dtype=jnp.float64)
    layer = eqx.tree_at(
        lambda m: m.bottleneck, layer, jax.random.normal(jax.random.key(7), (3, 2), jnp.float64)
    )
    x, delta = jnp.arange(4.0) - 1.5, jnp.asarray([0.7, -1.3])
    fn = lambda h: layer(x, h)
    out, out_lin = bx.linearized_response(fn, jnp.zeros(2), delta)
    np.testing.assert_allclose(out, layer.general(x), rtol=1e-14)
    np.testing.assert_allclose(out_lin, fn(delta), rtol=1e-13)


def test_linearisation_first_order_accurate_in_a_network():
    model = _mlp(jax.random.key(8), bottleneck=9)
    x = jax.random.normal(jax.random.key(10), (5,), jnp.float64)
    direction = jnp.asarray([0.6, -0.8])
    fn = lambda h: _apply(model, x, h, jnp.zeros(2), None, False)
    steps = np.asarray([0.2, 0.1, 0.05, 0.025])
    errors = []
    for t in steps:
        _, out_lin = bx.linearized_response(fn, jnp.zeros(2), t * direction)
        errors.append(float(jnp.linalg.norm(out_lin - fn(t * direction))))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    # The network is not linear in δ (the response multiplies activations that respond too):
    # the error is O(|δ|²), not zero.
    assert errors[0] > 1e-6
    assert 1.8 < slope < 2.2, (errors, slope)


@pytest.mark.parametrize(
    "variant",
    [v if v == "delta" else pytest.param(v, marks=pytest.mark.slow) for v in bnn.VARIANTS],
)
def test_hypergradient_matches_finite_differences(variant):
    model = _mlp(jax.random.key(11), bottleneck=12)
    hp = bnn.HyperParameters(
        [bnn.Hyperparameter("d0", 0.2, "sigmoid"), bnn.Hyperparameter("d1", 0.1, "sigmoid")],
        scale=0.3,
        dtype=jnp.float64,
    )
    x, y = _data(8, seed=1)
    key = jax.random.key(13)
    # λ0 held at the current values: the hypergradient of the centred variants is the
    # derivative through λ − λ0 with the centre fixed.
    loss = lambda values, scales: bnn.hyper_loss(
        variant,
        _apply,
        _ce,
        model,
        eqx.tree_at(lambda h: (h.values, h.scales), hp, (values, scales)),
        x,
        y,
        key,
        centre=hp.values,
    )
    grads = jax.grad(loss, argnums=(0, 1))(hp.values, hp.scales)
    rng = np.random.default_rng(0)
    for _ in range(3):
        dv, ds = (jnp.asarray(rng.normal(size=2)) for _ in range(2))
        fd = central_difference(
            lambda t: loss(hp.values + t * dv, hp.scales + t * ds), 0.0, 1.0, eps=1e-5
        )
        exact = float(grads[0] @ dv + grads[1] @ ds)
        assert exact == pytest.approx(fd, rel=1e-6, abs=1e-10)
    assert float(jnp.linalg.norm(grads[0])) > 1e-4  # the hypernetwork carries a signal


@pytest.mark.slow
def test_delta_stn_weight_gradients_are_decoupled():
    # One STN layer is linear in δ, so the linearised prediction is the exact perturbed one
    # and the response gradient can be checked against a plain forward pass at δ.
    layer = bnn.StnLinear(5, 3, 2, key=jax.random.key(14), dtype=jnp.float64)
    layer = eqx.tree_at(
        lambda m: m.bottleneck, layer, jax.random.normal(jax.random.key(15), (3, 2), jnp.float64)
    )
    apply = lambda m, x, h, lam, key, train: m(x, h)
    hp = bnn.HyperParameters(
        [bnn.Hyperparameter("a", 0.3, "identity"), bnn.Hyperparameter("b", -1.0, "identity")],
        dtype=jnp.float64,
    )
    # A training loss that uses λ directly, as an L2 strength does.
    loss = lambda out, y, lam: _ce(out, y) + jnp.exp(lam[0]) * jnp.sum(out**2) / 10
    x, y = _data(7, seed=2)
    key = jax.random.key(16)
    value, grads = bnn.weight_grads("delta", apply, loss, layer, hp, x, y, key)
    delta = hp.perturbation(jax.random.split(key)[0], 7)
    lam_now = jnp.broadcast_to(hp.value(), delta.shape)
    lam_pert = hp.constrain(hp.values + delta)

    def at(m, h, lam):
        out = jax.vmap(lambda xi, hi: m(xi, hi))(x, h)
        return jnp.mean(jax.vmap(loss)(out, y, lam))

    general_ref = jax.grad(
        lambda g: at(eqx.tree_at(lambda m: m.general, layer, g), 0 * delta, lam_now)
    )(layer.general)
    response_ref = jax.grad(
        lambda rb: at(eqx.tree_at(lambda m: (m.response, m.bottleneck), layer, rb), delta, lam_pert)
    )((layer.response, layer.bottleneck))
    assert float(value) == pytest.approx(float(at(layer, 0 * delta, lam_now)), rel=1e-12)
    for a, b in zip(jax.tree.leaves(grads.general), jax.tree.leaves(general_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    for a, b in zip(
        jax.tree.leaves((grads.response, grads.bottleneck)), jax.tree.leaves(response_ref)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    # Coupled: the general weights also see the perturbed loss, so their gradient differs.
    _, coupled = bnn.weight_grads("delta", apply, loss, layer, hp, x, y, key, general="coupled")
    assert not np.allclose(coupled.general.weight, grads.general.weight)


def test_unknown_variant_raises():
    model = _mlp(jax.random.key(0))
    hp = bnn.HyperParameters(SPECS[:2], dtype=jnp.float64)
    x, y = _data()
    with pytest.raises(ValueError, match="variant"):
        bnn.weight_grads("hyper", _apply, _ce, model, hp, x, y, jax.random.key(0))


def test_cutout_zeroes_squares():
    image = jnp.ones((1, 12, 12), jnp.float64)
    out = bnn.cutout(image, 4.0, 1.0, jax.random.key(0), max_holes=3)
    zeros = int(jnp.sum(out == 0))
    # A 4-pixel square (|i − c| < 2: 3 rows x 3 cols... up to 4x4), clipped at the border.
    assert 1 <= zeros <= 16
    none = bnn.cutout(image, 4.0, 0.0, jax.random.key(0), max_holes=3)
    np.testing.assert_array_equal(none, image)
