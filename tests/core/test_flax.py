"""Flax models in every primitive: NNX (`nnx.split(model, nnx.Param, ...)`) and Linen (the
`params` collection).

Each derivative is checked twice: against the same computation on an Equinox model with the
same weights (equal to 1e-12: the same arithmetic, in another library's layers), and against
central finite differences in float64. What bilevax refuses (Flax variables that are not
parameters among the optimised ones; a loss that updates BatchNorm statistics or draws from an
`nnx.Rngs` stream) is checked to raise at trace time, naming the leaves; what it accepts (the
statistics and RNG state partitioned out, evaluation mode) to give the right numbers.
The suite's float64 and strict dtype promotion come from `tests/conftest.py`.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import central_difference, directional, random_direction

import bilevax as bx


flax = pytest.importorskip("flax")
from flax import linen, nnx  # noqa: E402


f64 = jnp.float64
SOLVE = dict(solver=bx.GradientDescent(0.5), max_steps=3000, tol=1e-11)
UNROLL = dict(solver=bx.GradientDescent(0.3), num_steps=12)
UNROLLED = dict(
    solver=UNROLL["solver"], max_steps=UNROLL["num_steps"], tol=0.0, adjoint=bx.UnrolledAdjoint()
)
CG = lx.CG(rtol=1e-12, atol=1e-12)


# -- the models: one MLP, three libraries, the same weights --------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(3, 4, param_dtype=f64, rngs=rngs)
        self.l2 = nnx.Linear(4, 1, param_dtype=f64, rngs=rngs)
        # Non-zero biases, so that a bias handled wrongly would show.
        self.l1.bias = nnx.Param(0.1 * jax.random.normal(rngs.params(), (4,), f64))

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))[..., 0]


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        h = jnp.tanh(linen.Dense(4, param_dtype=f64, name="l1")(x))
        return linen.Dense(1, param_dtype=f64, name="l2")(h)[..., 0]


class EqxMLP(eqx.Module):
    l1: eqx.nn.Linear
    l2: eqx.nn.Linear

    def __call__(self, x):
        return jax.vmap(lambda xi: self.l2(jnp.tanh(self.l1(xi)))[0])(x)


GRAPHDEF, NNX_PARAMS = nnx.split(NnxMLP(nnx.Rngs(0)), nnx.Param)


def nnx_model(params):
    return nnx.merge(GRAPHDEF, params)


def linen_params(params) -> dict:
    """The NNX parameters as Linen's `params` collection (the same kernel layout)."""
    return {
        layer: {"kernel": params[layer]["kernel"][...], "bias": params[layer]["bias"][...]}
        for layer in ("l1", "l2")
    }


def eqx_params(params) -> EqxMLP:
    """The NNX parameters as an Equinox MLP: Equinox stores `kernel.T`."""
    keys = jax.random.split(jax.random.key(0))
    layer = lambda l, k: eqx.nn.Linear(l.in_features, l.out_features, key=k, dtype=f64)
    model = nnx_model(params)
    mlp = EqxMLP(layer(model.l1, keys[0]), layer(model.l2, keys[1]))
    for name in ("l1", "l2"):
        mlp = eqx.tree_at(
            lambda m: (getattr(m, name).weight, getattr(m, name).bias),
            mlp,
            (params[name]["kernel"][...].T, params[name]["bias"][...]),
        )
    return mlp


# -- the bilevel problem: per-layer weight decay, biases unpenalised -------------------------
# λ = {"l1": log decay, "l2": log decay}; the same losses written once per library.


def _data(seed, n):
    X = jax.random.normal(jax.random.key(seed), (n, 3), f64)
    y = 2.0 * jnp.sin(X @ jnp.asarray([1.0, -2.0, 0.5], f64))
    return X, y


TRAIN, VAL = _data(1, 12), _data(2, 10)
# Decays at which gradient descent reaches ‖∇L‖ ≤ 1e-11 in ~1500 steps, away from the
# stationary point with zero kernels that stronger decays fall into.
HPARAMS = {"l1": jnp.asarray(-2.5, f64), "l2": jnp.asarray(-1.5, f64)}


def _mse(pred, data):
    return 0.5 * jnp.mean((pred - data[1]) ** 2)


def _decay(hparams, kernels):
    return sum(jnp.exp(hparams[k]) * jnp.sum(kernels[k] ** 2) for k in ("l1", "l2"))


def nnx_inner(params, hparams, data):
    kernels = {k: params[k]["kernel"][...] for k in ("l1", "l2")}
    return _mse(nnx_model(params)(data[0]), data) + _decay(hparams, kernels)


def nnx_outer(params, hparams, data):
    del hparams
    return _mse(nnx_model(params)(data[0]), data)


def linen_inner(params, hparams, data):
    kernels = {k: params[k]["kernel"] for k in ("l1", "l2")}
    return _mse(LinenMLP().apply({"params": params}, data[0]), data) + _decay(hparams, kernels)


def linen_outer(params, hparams, data):
    del hparams
    return _mse(LinenMLP().apply({"params": params}, data[0]), data)


def eqx_inner(model, hparams, data):
    kernels = {k: getattr(model, k).weight for k in ("l1", "l2")}
    return _mse(model(data[0]), data) + _decay(hparams, kernels)


def eqx_outer(model, hparams, data):
    del hparams
    return _mse(model(data[0]), data)


FLAVOURS = {
    "nnx": (nnx_inner, nnx_outer, NNX_PARAMS),
    "linen": (linen_inner, linen_outer, linen_params(NNX_PARAMS)),
    "eqx": (eqx_inner, eqx_outer, eqx_params(NNX_PARAMS)),
}


def assert_same(flax_value, eqx_value):
    """Equal to 1e-12, leaf by leaf: `hparams`-shaped hypergradients, or outputs."""
    assert jax.tree.structure(flax_value) == jax.tree.structure(eqx_value)
    for a, b in zip(jax.tree.leaves(flax_value), jax.tree.leaves(eqx_value)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def assert_matches_fd(value_and_grad, hgrad, *, rtol, hparams=HPARAMS):
    """⟨hgrad, d⟩ equals the central difference, along a random direction d, of the value
    that `value_and_grad` (already compiled: no second program) returns."""
    d = random_direction(hparams, seed=3)
    fd = central_difference(lambda h: value_and_grad(h)[0], hparams, d)
    assert abs(fd) > 1e-4, fd  # not a vacuous comparison
    assert directional(hgrad, d) == pytest.approx(fd, rel=rtol)


# Each compiled program is built once and shared by the tests (compilation is most of their
# time): `hparams -> (E(w(λ)), dE/dλ)` for a flavour, through `inner_solve` with an adjoint.
@functools.cache
def solve_value_and_grad(flavour: str, adjoint: str):
    inner, outer, init = FLAVOURS[flavour]
    if adjoint == "implicit":
        options = dict(SOLVE, adjoint=bx.ImplicitAdjoint(CG))
    else:
        options = UNROLLED

    def objective(hparams, train=TRAIN):
        solution = bx.inner_solve(inner, init, hparams, train, **options)
        return outer(solution.params, hparams, VAL)

    return jax.jit(jax.value_and_grad(objective))


@functools.cache
def unrolled(flavour: str, mode: str):
    inner, outer, init = FLAVOURS[flavour]
    return jax.jit(
        lambda hparams, train=TRAIN: bx.unrolled_hypergrad(
            outer, inner, init, hparams, train, VAL, mode=mode, **UNROLL
        )
    )


# -- every primitive --------------------------------------------------------------------------


def test_the_pattern_and_the_twins():
    """The pattern's pytree holds `nnx.Param`s, float64 throughout, and the three libraries'
    models compute the same outputs from the same weights."""
    variables = jax.tree.leaves(NNX_PARAMS, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(variables) == 4 and all(isinstance(v, nnx.Param) for v in variables)
    assert all(x.dtype == f64 for x in jax.tree.leaves(NNX_PARAMS))
    X = TRAIN[0]
    out = nnx_model(NNX_PARAMS)(X)
    assert_same(out, eqx_params(NNX_PARAMS)(X))
    assert_same(LinenMLP().apply({"params": linen_params(NNX_PARAMS)}, X), out)


@pytest.mark.parametrize("flavour", ["nnx", pytest.param("linen", marks=pytest.mark.slow)])
def test_inner_solve_implicit_adjoint(flavour):
    value, hgrad = solve_value_and_grad(flavour, "implicit")(HPARAMS)
    assert_same((value, hgrad), solve_value_and_grad("eqx", "implicit")(HPARAMS))
    # The solves stop at ‖∇L‖ ≤ 1e-11: a central difference with step 1e-5 carries ~1e-6.
    assert_matches_fd(solve_value_and_grad(flavour, "implicit"), hgrad, rtol=1e-5)


@pytest.mark.slow
def test_inner_solve_solution_is_a_stationary_state():
    solution = bx.inner_solve(nnx_inner, NNX_PARAMS, HPARAMS, TRAIN, **SOLVE)
    assert solution.result == bx.RESULTS.successful
    assert jax.tree.structure(solution.params) == jax.tree.structure(NNX_PARAMS)
    grad = jax.grad(nnx_inner)(solution.params, HPARAMS, TRAIN)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) < 1e-10
    eqx_solution = bx.inner_solve(eqx_inner, eqx_params(NNX_PARAMS), HPARAMS, TRAIN, **SOLVE)
    assert_same(eqx_params(solution.params), eqx_solution.params)


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_inner_solve_unrolled_adjoint(flavour):
    value, hgrad = solve_value_and_grad(flavour, "unrolled")(HPARAMS)
    assert_same((value, hgrad), solve_value_and_grad("eqx", "unrolled")(HPARAMS))
    assert_matches_fd(solve_value_and_grad(flavour, "unrolled"), hgrad, rtol=1e-7)


@pytest.mark.parametrize(
    "flavour, mode",
    [
        ("nnx", "reverse"),
        pytest.param("nnx", "forward", marks=pytest.mark.slow),
        ("linen", "forward"),
        pytest.param("linen", "reverse", marks=pytest.mark.slow),
    ],
)
def test_unrolled_hypergrad(flavour, mode):
    value, hgrad = unrolled(flavour, mode)(HPARAMS)
    assert_same((value, hgrad), unrolled("eqx", "reverse")(HPARAMS))
    assert_matches_fd(unrolled(flavour, mode), hgrad, rtol=1e-7)


@functools.cache
def _implicit_hypergrad(flavour: str, mode: str):
    inner, outer, init = FLAVOURS[flavour]

    def hypergrad(hparams):
        star = bx.inner_solve(inner, init, hparams, TRAIN, **SOLVE).params
        return bx.implicit_hypergrad(
            outer, inner, star, hparams, TRAIN, VAL, linear_solver=CG, mode=mode
        )

    return jax.jit(hypergrad)


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["nnx", "linen"])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_implicit_hypergrad(flavour, mode):
    value, hgrad = _implicit_hypergrad(flavour, mode)(HPARAMS)
    assert_same((value, hgrad), _implicit_hypergrad("eqx", mode)(HPARAMS))
    # The total derivative of the solved problem: finite differences of fresh solves.
    assert_matches_fd(_implicit_hypergrad(flavour, mode), hgrad, rtol=1e-5)


@functools.cache
def _implicit_diff(flavour: str):
    """A solver made differentiable with `bx.implicit_diff`: its solution is a Flax state."""
    inner, outer, init = FLAVOURS[flavour]

    def solve(init, hparams, data):
        return bx.inner_solve(inner, init, hparams, data, **SOLVE).params

    solve = bx.implicit_diff(solve, jax.grad(inner), symmetric=True, linear_solver=CG)
    return lambda hparams: outer(solve(init, hparams, TRAIN), hparams, VAL)


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_implicit_diff(flavour):
    value_and_grad = jax.jit(jax.value_and_grad(_implicit_diff(flavour)))
    value, hgrad = value_and_grad(HPARAMS)
    assert_same((value, hgrad), jax.jit(jax.value_and_grad(_implicit_diff("eqx")))(HPARAMS))
    assert_matches_fd(value_and_grad, hgrad, rtol=1e-5)
    # Forward mode through the same custom JVP.
    d = random_direction(HPARAMS, seed=3)
    _, tangent = jax.jit(lambda d: jax.jvp(_implicit_diff(flavour), (HPARAMS,), (d,)))(d)
    assert float(tangent) == pytest.approx(directional(hgrad, d), rel=1e-10)


@pytest.mark.parametrize("flavour", ["nnx", pytest.param("linen", marks=pytest.mark.slow)])
def test_linearized_response(flavour):
    """A Flax model's outputs and their linearisation in a perturbation of its weights."""
    nnx_tangent = jax.tree.map(lambda d: 0.1 * d, random_direction(NNX_PARAMS, seed=4))
    if flavour == "nnx":
        fn, primal, tangent = lambda params, x: nnx_model(params)(x), NNX_PARAMS, nnx_tangent
    else:
        fn = lambda params, x: LinenMLP().apply({"params": params}, x)
        primal, tangent = linen_params(NNX_PARAMS), linen_params(nnx_tangent)
    out, out_lin = jax.jit(bx.linearized_response, static_argnums=0)(fn, primal, tangent, VAL[0])
    eqx_fn = lambda model, x: model(x)
    eqx_out, eqx_lin = jax.jit(bx.linearized_response, static_argnums=0)(
        eqx_fn, eqx_params(NNX_PARAMS), eqx_params(nnx_tangent), VAL[0]
    )
    assert_same((out, out_lin), (eqx_out, eqx_lin))
    # `out_lin - out` is the directional derivative, every output at once by central
    # differences; their rounding error is ~1e-16 |out| / 1e-5.
    eps = 1e-5
    shift = lambda s: jax.tree.map(lambda p, t: p + s * eps * t, primal, tangent)
    fd = jax.jit(lambda: (fn(shift(1.0), VAL[0]) - fn(shift(-1.0), VAL[0])) / (2 * eps))()
    assert float(jnp.linalg.norm(fd)) > 1e-3
    np.testing.assert_allclose(np.asarray(out_lin - out), np.asarray(fd), rtol=0, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_vmap_over_tasks(flavour):
    """Per-task hypergradients of a Flax problem under `jax.vmap`, each equal to the Equinox
    computation on that task alone and to its finite difference."""
    tasks = [_data(10 + i, 12) for i in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *tasks)
    per_task = lambda task: unrolled(flavour, "reverse")(HPARAMS, task)
    values, hgrads = jax.jit(jax.vmap(per_task))(stacked)
    for i, task in enumerate(tasks):
        ith = jax.tree.map(lambda g: g[i], (values, hgrads))
        assert_same(ith, unrolled("eqx", "reverse")(HPARAMS, task))
        assert_matches_fd(lambda h: unrolled(flavour, "reverse")(h, task), ith[1], rtol=1e-7)
    assert float(jnp.ptp(values)) > 1e-3  # the tasks differ


# -- batch statistics and RNG streams: partitioned out, or refused ---------------------------


class NnxNormed(nnx.Module):
    """Linear → BatchNorm → tanh → Dropout → Linear. Flax keeps batch statistics in float32;
    here they are float64 (and not the identity), so that the suite's float64 holds."""

    def __init__(self, rngs: nnx.Rngs, *, train: bool = False):
        # No bias before BatchNorm and no scale in it: either would leave the inner problem a
        # flat direction (a bias the normalisation's shift repeats; a scale that the
        # penalised kernel can hand its size to), and no isolated minimum to differentiate.
        self.l1 = nnx.Linear(3, 4, use_bias=False, param_dtype=f64, rngs=rngs)
        self.bn = nnx.BatchNorm(
            4, use_running_average=not train, use_scale=False, param_dtype=f64, dtype=f64,
            rngs=rngs,
        )  # fmt: skip
        self.bn.mean = nnx.BatchStat(jnp.asarray([0.1, -0.2, 0.3, 0.0], f64))
        self.bn.var = nnx.BatchStat(jnp.asarray([0.5, 2.0, 1.0, 1.5], f64))
        self.drop = nnx.Dropout(0.5, deterministic=not train, rngs=rngs)
        self.l2 = nnx.Linear(4, 1, param_dtype=f64, rngs=rngs)

    def __call__(self, x, rngs=None):
        return self.l2(self.drop(jnp.tanh(self.bn(self.l1(x))), rngs=rngs))[..., 0]


def _normed_losses(graphdef, rest_in_data: bool, rest=None):
    """The inner and outer losses of a normed model, its non-parameters (`rest`) either in
    the data, `(rest, X, y)`, or closed over."""

    def model_and_data(params, data):
        if rest_in_data:
            state, *data = data
            return nnx.merge(graphdef, params, state), data
        return nnx.merge(graphdef, params, rest), data

    def inner(params, hparams, data):
        model, (X, y) = model_and_data(params, data)
        kernels = {k: params[k]["kernel"][...] for k in ("l1", "l2")}
        return _mse(model(X), (X, y)) + _decay(hparams, kernels)

    def outer(params, hparams, data):
        del hparams
        model, (X, y) = model_and_data(params, data)
        return _mse(model(X), (X, y))

    return inner, outer


def test_statistics_and_rng_state_partitioned_out():
    """Evaluation mode: BatchNorm's statistics (float) and Dropout's RNG key (a typed PRNG
    key) and count (uint32) go in `rest`, here passed through the data; the hypergradient
    equals that of the same network written in plain JAX with the statistics as constants,
    and its finite difference, and `rest` is untouched."""
    graphdef, params, rest = nnx.split(NnxNormed(nnx.Rngs(0)), nnx.Param, ...)
    is_variable = lambda x: isinstance(x, nnx.Variable)
    kinds = {type(v).__name__ for v in jax.tree.leaves(rest, is_leaf=is_variable)}
    assert kinds == {"BatchStat", "RngKey", "RngCount"}
    before = jax.tree.map(lambda x: x, rest)
    inner, outer = _normed_losses(graphdef, rest_in_data=True)
    train, val = (rest, *TRAIN), (rest, *VAL)

    @jax.jit
    @jax.value_and_grad
    def objective(hparams):
        solution = bx.inner_solve(inner, params, hparams, train, **SOLVE)
        return outer(solution.params, hparams, val)

    bn = (rest["bn"]["mean"][...], rest["bn"]["var"][...])

    def plain_model(p, X):
        h = (X @ p["l1"]["kernel"] - bn[0]) / jnp.sqrt(bn[1] + 1e-5) + p["bn"]["bias"]
        return (jnp.tanh(h) @ p["l2"]["kernel"] + p["l2"]["bias"])[..., 0]

    def plain_inner(p, hparams, data):
        kernels = {k: p[k]["kernel"] for k in ("l1", "l2")}
        return _mse(plain_model(p, data[0]), data) + _decay(hparams, kernels)

    @jax.jit
    @jax.value_and_grad
    def plain_objective(hparams):
        solution = bx.inner_solve(plain_inner, nnx.to_pure_dict(params), hparams, TRAIN, **SOLVE)
        return _mse(plain_model(solution.params, VAL[0]), VAL)

    value, hgrad = objective(HPARAMS)
    assert_same((value, hgrad), plain_objective(HPARAMS))
    assert_matches_fd(objective, hgrad, rtol=1e-5)
    assert all(
        bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(rest), jax.tree.leaves(before))
    )


def test_refuses_non_parameters_in_the_optimised_pytree():
    """The whole state of `nnx.split(model)` as the parameters: its batch statistics are
    floating-point and would be optimised as weights, its RNG state kept fixed. Every
    primitive that takes parameters refuses it at trace time, naming the leaves."""
    graphdef, state = nnx.split(NnxNormed(nnx.Rngs(0)))

    def inner(state, hparams, data):
        kernels = {k: state[k]["kernel"][...] for k in ("l1", "l2")}
        return _mse(nnx.merge(graphdef, state)(data[0]), data) + _decay(hparams, kernels)

    outer = lambda state, hparams, data: _mse(nnx.merge(graphdef, state)(data[0]), data)
    named = r"`{0}\['bn'\]\['mean'\]` \(BatchStat\), `{0}\['bn'\]\['var'\]` \(BatchStat\), "
    named += r"`{0}\['drop'\]\['rngs'\]\['count'\]` \(RngCount\), "
    named += r"`{0}\['drop'\]\['rngs'\]\['key'\]` \(RngKey\)"
    with pytest.raises(TypeError, match=named.format("init")):
        bx.inner_solve(inner, state, HPARAMS, TRAIN)
    with pytest.raises(TypeError, match=named.format("init")):
        bx.unrolled_hypergrad(outer, inner, state, HPARAMS, TRAIN, VAL, mode="forward")
    with pytest.raises(TypeError, match=named.format("params_star")):
        bx.implicit_hypergrad(outer, inner, state, HPARAMS, TRAIN, VAL)
    solve = bx.implicit_diff(lambda init, hparams, data: init, jax.grad(inner))
    with pytest.raises(TypeError, match=named.format("solution")):
        solve(state, HPARAMS, TRAIN)
    # The module itself, a pytree in recent Flax, is refused too: its gradients lose its
    # structure, and the implicit adjoint would fail on them with an error about lineax.
    module = NnxMLP(nnx.Rngs(0))
    module_loss = lambda m, hparams, data: _mse(m(data[0]), data)
    with pytest.raises(TypeError, match=r"`init` holds a Flax NNX module .*nnx\.split"):
        bx.inner_solve(module_loss, module, HPARAMS, TRAIN)
    with pytest.raises(TypeError, match=r"`init\['net'\]` holds|module \(`init\['net'\]`\)"):
        bx.inner_solve(lambda p, h, d: module_loss(p["net"], h, d), {"net": module}, HPARAMS, TRAIN)
    # The same model split as the pattern says is accepted: only `Param`s to optimise.
    _, params, rest = nnx.split(NnxNormed(nnx.Rngs(0)), nnx.Param, ...)
    inner = _normed_losses(graphdef, False, rest)[0]
    solution = jax.eval_shape(lambda: bx.inner_solve(inner, params, HPARAMS, TRAIN).params)
    assert jax.tree.structure(solution) == jax.tree.structure(params)


@pytest.mark.parametrize("rest_in_data", [False, True])
def test_refuses_a_loss_that_updates_batch_statistics(rest_in_data):
    """BatchNorm in training mode updates its running statistics inside the loss: an update
    bilevax would drop at every step. Refused at trace time, whether the statistics are
    closed over or passed in the data (where they are named)."""
    graphdef, params, rest = nnx.split(NnxNormed(nnx.Rngs(0), train=True), nnx.Param, ...)
    inner, outer = _normed_losses(graphdef, rest_in_data, rest)
    train, val = ((rest, *TRAIN), (rest, *VAL)) if rest_in_data else (TRAIN, VAL)
    named = r"data\[0\]\['bn'\]\['mean'\]`, `data\[0\]\['bn'\]\['var'\]" if rest_in_data else (
        "closes over them"
    )  # fmt: skip
    # Flax computes batch statistics in at least float32 through a promotion that the
    # suite's strict mode refuses.
    with jax.numpy_dtype_promotion("standard"):
        with pytest.raises(TypeError, match=f"updates a Flax `BatchStat`.*{named}"):
            bx.inner_solve(inner, params, HPARAMS, train)
        with pytest.raises(TypeError, match="`inner_loss` updates a Flax `BatchStat`"):
            bx.implicit_hypergrad(outer, inner, params, HPARAMS, train, val)
        with pytest.raises(TypeError, match="updates a Flax `BatchStat`"):
            jax.jit(
                lambda h: bx.unrolled_hypergrad(outer, inner, params, h, train, val)
            )(HPARAMS)  # fmt: skip
    assert float(rest["bn"]["mean"][0]) == 0.1  # and nothing was updated


def test_refuses_a_loss_that_draws_from_an_rngs_stream():
    """Dropout drawing from the model's own `nnx.Rngs` advances the stream's count inside
    the loss: every step would see the same mask. Refused, naming the count."""
    model = NnxNormed(nnx.Rngs(0))
    model.drop.deterministic = False
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    inner, _ = _normed_losses(graphdef, True)
    match = r"updates a Flax `RngCount`.*`data\[0\]\['drop'\]\['rngs'\]\['count'\]`"
    with pytest.raises(TypeError, match=match):
        bx.inner_solve(inner, params, HPARAMS, (rest, *TRAIN))


@pytest.mark.slow
def test_dropout_with_a_key_in_the_data():
    """Randomness as data: the key is an argument, so the loss is a pure function, and the
    hypergradient through 12 steps is that of the network with that fixed dropout mask,
    written in plain JAX with the mask Flax draws from the same key."""
    model = NnxNormed(nnx.Rngs(0))
    model.drop.deterministic = False
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    key = jax.random.key(7)

    def inner(params, hparams, data):
        key, X, y = data
        net = nnx.merge(graphdef, params, rest)
        kernels = {k: params[k]["kernel"][...] for k in ("l1", "l2")}
        return _mse(net(X, rngs=key), (X, y)) + _decay(hparams, kernels)

    @jax.jit
    @jax.value_and_grad
    def objective(hparams):
        solution = bx.inner_solve(inner, params, hparams, (key, *TRAIN), **UNROLLED)
        net = nnx.merge(graphdef, solution.params, rest)
        net.eval()  # no dropout on validation
        return _mse(net(VAL[0]), VAL)

    ones = jnp.ones((TRAIN[0].shape[0], 4), f64)
    mask = nnx.Dropout(0.5, deterministic=False)(ones, rngs=key)  # the kept units, as 2.0
    assert 0 < float(jnp.sum(mask == 0)) < mask.size
    bn = (rest["bn"]["mean"][...], rest["bn"]["var"][...])

    def plain_model(p, X, mask):
        h = (X @ p["l1"]["kernel"] - bn[0]) / jnp.sqrt(bn[1] + 1e-5) + p["bn"]["bias"]
        return ((jnp.tanh(h) * mask) @ p["l2"]["kernel"] + p["l2"]["bias"])[..., 0]

    def plain_inner(p, hparams, data):
        kernels = {k: p[k]["kernel"] for k in ("l1", "l2")}
        return _mse(plain_model(p, data[0], mask), data) + _decay(hparams, kernels)

    @jax.jit
    @jax.value_and_grad
    def plain_objective(hparams):
        solution = bx.inner_solve(plain_inner, nnx.to_pure_dict(params), hparams, TRAIN, **UNROLLED)
        return _mse(plain_model(solution.params, VAL[0], 1.0), VAL)

    value, hgrad = objective(HPARAMS)
    assert_same((value, hgrad), plain_objective(HPARAMS))
    assert_matches_fd(objective, hgrad, rtol=1e-7)


def test_linen_refuses_to_update_batch_statistics():
    """Linen is functional: `apply` with BatchNorm in training mode and its `batch_stats`
    immutable raises Flax's own error, naming the variable and the collection; bilevax hands
    it on at trace time as a `TypeError` that keeps Flax's message (its error class takes
    other arguments than a message)."""

    class Normed(linen.Module):
        train: bool

        @linen.compact
        def __call__(self, x):
            h = linen.Dense(4, param_dtype=f64)(x)
            h = linen.BatchNorm(use_running_average=not self.train, param_dtype=f64, dtype=f64)(h)
            return linen.Dense(1, param_dtype=f64)(jnp.tanh(h))[..., 0]

    with jax.numpy_dtype_promotion("standard"):  # Linen's float32 statistics, at init
        variables = Normed(train=False).init(jax.random.key(0), TRAIN[0])
    stats = jax.tree.map(lambda x: x.astype(f64), variables["batch_stats"])  # Flax: float32

    def inner(train):
        def loss(params, hparams, data):
            pred = Normed(train=train).apply({"params": params, "batch_stats": stats}, data[0])
            return _mse(pred, data) + jnp.exp(hparams["l1"]) * jnp.sum(
                params["Dense_0"]["kernel"] ** 2
            )

        return loss

    with jax.numpy_dtype_promotion("standard"):
        match = r'Cannot update variable "mean" in "/BatchNorm_0" because collection "batch_stats"'
        with pytest.raises(TypeError, match=match):
            bx.inner_solve(inner(True), variables["params"], HPARAMS, TRAIN)
    # In evaluation mode the same loss is accepted (its statistics are constants).
    shapes = jax.eval_shape(
        lambda: bx.inner_solve(inner(False), variables["params"], HPARAMS, TRAIN)
    )
    assert jax.tree.structure(shapes.params) == jax.tree.structure(variables["params"])
