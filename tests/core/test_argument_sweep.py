"""A property-based sweep of the public constructors and functions that take numbers: any
invalid value of each numeric argument (wrong type, wrong sign, NaN, wrong shape, a JAX array
as well as a Python number) raises a `TypeError` or `ValueError` that names the argument,
never a raw JAX error and never a plausible wrong number; every valid value is accepted."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ridge
from hypothesis import HealthCheck, given, settings, strategies as st

import bilevax as bx


X = jnp.linspace(-1.0, 1.0, 4)

# (name of the case, argument, its interval (lower, upper, lower_open, upper_open), scalar
# only, and a call taking the value).
CASES = [
    ("CG", "rtol", (0, None, False, False), True, lambda v: bx.CG(rtol=v, atol=1e-12)),
    ("CG", "atol", (0, None, False, False), True, lambda v: bx.CG(rtol=1e-6, atol=v)),
    ("Neumann", "scale", (0, None, True, False), True, lambda v: bx.Neumann(5, v)),
    ("Damped", "damping", (0, None, False, False), True, lambda v: bx.Damped(bx.CG(1e-6, 0), v)),
    ("GradientDescent", "learning_rate", (0, None, True, False), False, bx.GradientDescent),
    (
        "GradientDescent",
        "momentum",
        (0, 1, False, True),
        False,
        lambda v: bx.GradientDescent(0.1, v),
    ),
    (
        "ProximalGradient",
        "learning_rate",
        (0, None, True, False),
        True,
        lambda v: bx.ProximalGradient(v, bx.prox_lasso),
    ),
    (
        "ProjectedGradient",
        "learning_rate",
        (0, None, True, False),
        True,
        lambda v: bx.ProjectedGradient(v, lambda x, h: x),
    ),
    ("prox_lasso", "l1reg", (0, None, False, False), False, lambda v: bx.prox_lasso(X, v)),
    ("prox_lasso", "scaling", (0, None, False, False), False, lambda v: bx.prox_lasso(X, 1.0, v)),
    (
        "prox_elastic_net",
        "l2reg",
        (0, None, False, False),
        False,
        lambda v: bx.prox_elastic_net(X, (1.0, v)),
    ),
    (
        "prox_group_lasso",
        "l2reg",
        (0, None, False, False),
        False,
        lambda v: bx.prox_group_lasso(X, v),
    ),
    (
        "HOAG",
        "decay",
        (0, 1, True, False),
        True,
        lambda v: bx.contrib.HOAG(decay=v),
    ),
    (
        "HOAG",
        "initial_tol",
        (0, None, True, False),
        True,
        lambda v: bx.contrib.HOAG(initial_tol=v),
    ),
    (
        "HOAG",
        "final_tol",
        (0, None, True, False),
        True,
        lambda v: bx.contrib.HOAG(final_tol=v),
    ),
    ("SOBA", "inner_lr", (0, None, True, False), True, lambda v: bx.contrib.SOBA(v, 0.1)),
    ("SOBA", "outer_lr", (0, None, True, False), True, lambda v: bx.contrib.SOBA(0.1, v)),
    ("SABA", "inner_lr", (0, None, True, False), True, lambda v: bx.contrib.SABA(v, 0.1)),
    (
        "dropout",
        "rate",
        (0, 1, False, True),
        False,
        lambda v: bx.nn.dropout(X, v, None, train=False),
    ),
    (
        "inner_solve",
        "tol",
        (0, None, False, False),
        True,
        lambda v: bx.inner_solve(
            lambda w, h, d: jnp.sum((w - h) ** 2), jnp.zeros(2), jnp.ones(2), tol=v, max_steps=0
        ),
    ),
]

# Values of every type a user may pass by mistake, each with the reason it is invalid
# (`None` where only the interval decides).
NOT_NUMBERS = [None, "0.1", True, 1 + 2j, [0.1], {"a": 0.1}]


def _inside(value: float, interval) -> bool:
    lower, upper, lower_open, upper_open = interval
    if math.isnan(value):
        return False
    ok = True
    if lower is not None:
        ok &= value > lower if lower_open else value >= lower
    if upper is not None:
        ok &= value < upper if upper_open else value <= upper
    if upper is None and math.isinf(value):
        ok &= value > 0
    return bool(ok)


def _raises_naming(call, value, name):
    with pytest.raises((TypeError, ValueError)) as error:
        call(value)
    assert f"`{name}`" in str(error.value), str(error.value)


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, 1.0, 1.0 - 1e-12, 1e-300, -1e-300]),
    st.integers(-3, 3),
)
as_given = st.sampled_from(["python", "jax", "numpy"])


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=numbers, form=as_given)
def test_numbers_inside_are_accepted_outside_are_named(case, value, form):
    _, name, interval, _, call = case
    given_value = {
        "python": value,
        "jax": jnp.asarray(float(value), jnp.float64),
        "numpy": np.float64(value),
    }[form]
    if _inside(float(value), interval):
        call(given_value)
    else:
        _raises_naming(call, given_value, name)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
def test_non_numbers_are_named(case, value):
    _, name, _, _, call = case
    _raises_naming(call, value, name)


@pytest.mark.parametrize("case", [c for c in CASES if c[3]], ids=lambda c: f"{c[0]}-{c[1]}")
def test_arrays_where_a_scalar_is_due_are_named(case):
    _, name, interval, _, call = case
    valid = 0.5 if interval[1] is not None else 1.0
    _raises_naming(call, jnp.full(3, valid), name)


@pytest.mark.parametrize("make", [bx.Neumann, bx.JacobiPreconditioner, lambda v: bx.CG(0, 0, v)])
@pytest.mark.parametrize("value", [True, -1, 2.5, "3", None])
def test_counts_are_named(make, value):
    if make is not bx.Neumann and value is None:
        pytest.skip("`max_steps=None` and `num_samples`' default are valid")
    with pytest.raises((TypeError, ValueError)) as error:
        make(value)
    assert any(n in str(error.value) for n in ("`steps`", "`num_samples`", "`max_steps`"))


def _ridge_soba():
    problem = ridge(d=3)
    soba = bx.contrib.SOBA(0.01, 0.01, batch_size=4, outer_batch_size=4)
    saba = bx.contrib.SABA(0.01, 0.01, batch_size=4, outer_batch_size=4)
    data = (problem.inner_data, problem.outer_data)
    state = soba.init(problem.outer, problem.inner, problem.init, problem.hparams, *data)
    return problem, soba, saba, data, state, jax.random.key(0)


def _stn_layer():
    hparams = bx.nn.HyperParameters([bx.nn.Hyperparameter("p", 0.2)])
    layer = bx.nn.StnLinear(3, 2, 1, key=jax.random.key(0))
    apply = lambda m, x, h, lam, key, train: m(x, h)
    loss = lambda out, y, lam: jnp.sum((out - y) ** 2)
    return hparams, layer, apply, loss, jax.random.key(0)


def _weight_grads_1d():
    hparams, layer, apply, loss, key = _stn_layer()
    bx.nn.weight_grads("delta", apply, loss, layer, hparams, jnp.ones(5), jnp.ones((5, 2)), key)


def _saba_on_a_soba_state():
    problem, _, saba, data, state, key = _ridge_soba()
    saba.step(problem.outer, problem.inner, state, *data, key)


def _directions_with_a_misshapen_v():
    problem, *_ = _ridge_soba()
    bx.contrib.stochastic_directions(
        problem.outer,
        problem.inner,
        problem.init,
        jnp.zeros(4),
        problem.hparams,
        problem.inner_data,
        problem.outer_data,
    )


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: bx.nn.Hyperparameter("p", None), "init"),
        (lambda: bx.nn.Hyperparameter("p", 0.5, lower=float("nan")), "lower"),
        (lambda: bx.nn.Hyperparameter(3, 0.5), "name"),
        (lambda: bx.nn.HyperParameters([bx.nn.Hyperparameter("p", 0.5)], scale=None), "scale"),
        (
            lambda: bx.nn.HyperParameters([bx.nn.Hyperparameter("p", 0.5)], scale=jnp.nan),
            "scale",
        ),
        (_weight_grads_1d, "x"),
        (_saba_on_a_soba_state, "state"),
        (_directions_with_a_misshapen_v, "v"),
    ],
    ids=["init-None", "lower-nan", "name-int", "scale-None", "scale-nan", "1d-x", "state", "v"],
)
def test_structured_arguments_are_named(call, name):
    with pytest.raises((TypeError, ValueError)) as error:
        call()
    assert f"`{name}`" in str(error.value), str(error.value)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: bx.Preconditioned(bx.CG(1e-6, 0.0), bx.JacobiPreconditioner(), key="a"), "key"),
        (lambda: bx.QuasiNewtonPreconditioner(None, None), "solver"),
        (lambda: bx.QuasiNewtonPreconditioner(bx.GradientDescent(0.1), None), "state"),
    ],
    ids=["key", "solver", "state"],
)
def test_preconditioner_arguments_are_named(call, name):
    with pytest.raises((TypeError, ValueError)) as error:
        call()
    assert f"`{name}`" in str(error.value), str(error.value)
    # A legacy key is still a key.
    bx.Preconditioned(bx.CG(1e-6, 0.0), bx.JacobiPreconditioner(), key=jax.random.PRNGKey(0))
