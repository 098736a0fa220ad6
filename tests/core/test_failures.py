"""The failure zoo: every public path either raises or returns NaN with a result code; none
returns a finite number that looks right (the failure policy, docs/trustworthy-hypergradients.md).

Each case breaks one thing on the ridge problem (or uses the indefinite `saddle`), and each
path is run as a user would: `jax.grad` through `inner_solve`, `implicit_hypergrad` in both
modes and with `has_aux`, `implicit_diff`, HOAG, `unrolled_hypergrad` and the stochastic
directions; under `jit`, and for one bad task in a `vmap`ped batch.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import pytest
from helpers import reference_solution, ridge, saddle

import bilevax as bx
from bilevax import RESULTS


PROBLEM = ridge()
W_STAR = reference_solution(PROBLEM)
NAN_INNER = (PROBLEM.inner_data[0].at[0, 0].set(jnp.nan), PROBLEM.inner_data[1])
NAN_OUTER = (PROBLEM.outer_data[0].at[0, 0].set(jnp.nan), PROBLEM.outer_data[1])
# The Hessian's largest eigenvalue is below 1 / learning_rate: a Neumann scale of 5 / that
# diverges (the series' ratio is 1 - scale * eigenvalue < -1).
DIVERGENT = bx.Neumann(60, 5.0 / PROBLEM.learning_rate)
TRUNCATED = bx.CG(rtol=1e-14, atol=0.0, max_steps=1)


def floats(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))]


def outcome(run) -> str:
    """ "raises", "nan" (every number NaN) or "finite" (some number finite)."""
    try:
        out = jax.block_until_ready(run())
    except Exception as error:  # equinox raises through a callback: the type varies with jit
        if "linear solve" not in str(error) and "non-finite" not in str(error):
            raise
        return "raises"
    leaves = floats(out)
    return "nan" if all(np.isnan(x).all() for x in leaves) else "finite"


def through_inner_solve(inner_data, outer_data, linear_solver=None, throw=True):
    def E(lam):
        sol = bx.inner_solve(
            PROBLEM.inner,
            PROBLEM.init,
            lam,
            inner_data,
            solver=bx.GradientDescent(PROBLEM.learning_rate),
            max_steps=5000,
            tol=1e-10,
            adjoint=bx.ImplicitAdjoint(linear_solver, throw=throw),
        )
        return PROBLEM.outer(sol.params, lam, outer_data)

    return jax.value_and_grad(E)(PROBLEM.hparams)


def implicit(
    inner_data=PROBLEM.inner_data,
    outer_data=PROBLEM.outer_data,
    mode="reverse",
    linear_solver=None,
    throw=True,
    params=W_STAR,
    **kwargs,
):
    return bx.implicit_hypergrad(
        PROBLEM.outer,
        PROBLEM.inner,
        params,
        PROBLEM.hparams,
        inner_data,
        outer_data,
        linear_solver=linear_solver,
        mode=mode,
        throw=throw,
        **kwargs,
    )


def implicit_diff(inner_data, outer_data, linear_solver=None, throw=True):
    def closed_form(init, lam, data):
        del init
        X, y = data
        A = X.T @ X / X.shape[0] + jnp.diag(jnp.exp(lam))
        return jnp.linalg.solve(A, X.T @ y / X.shape[0])

    solve = bx.implicit_diff(
        closed_form,
        jax.grad(PROBLEM.inner),
        symmetric=True,
        linear_solver=linear_solver,
        throw=throw,
    )
    E = lambda lam: PROBLEM.outer(solve(None, lam, inner_data), lam, outer_data)
    return jax.value_and_grad(E)(PROBLEM.hparams)


def hoag(inner_data, outer_data, throw=True):
    hoag = bx.contrib.HOAG(bx.GradientDescent(PROBLEM.learning_rate), max_steps=2000, throw=throw)
    state = hoag.init(PROBLEM.init, PROBLEM.hparams)
    value, hypergrad, _, _ = hoag.value_and_grad(
        PROBLEM.outer, PROBLEM.inner, PROBLEM.hparams, state, inner_data, outer_data
    )
    optimizer = optax.adam(1e-2)
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = optimizer.update(hypergrad, optimizer.init(PROBLEM.hparams))
    return optax.apply_updates(PROBLEM.hparams, updates), value, hypergrad


def unrolled(inner_data, outer_data, learning_rate=None):
    return bx.unrolled_hypergrad(
        PROBLEM.outer,
        PROBLEM.inner,
        PROBLEM.init,
        PROBLEM.hparams,
        inner_data,
        outer_data,
        solver=bx.GradientDescent(learning_rate or PROBLEM.learning_rate),
        num_steps=200,
    )


def directions(inner_data, outer_data):
    # D_w = ∇_w L does not depend on the outer data; D_v and D_λ do, on both.
    directions = bx.contrib.stochastic_directions(
        PROBLEM.outer,
        PROBLEM.inner,
        W_STAR,
        jnp.zeros_like(W_STAR),
        PROBLEM.hparams,
        inner_data,
        outer_data,
    )
    return directions.v, directions.hparams


NAN_DATA = {
    "nan inner data": (NAN_INNER, PROBLEM.outer_data),
    "nan outer data": (PROBLEM.inner_data, NAN_OUTER),
}


PATHS = [
    "inner_solve",
    "implicit reverse",
    "implicit forward",
    "implicit_diff",
    "hoag",
    "unrolled",
    "directions",
]


# Every path with each case, and every path under `jit` with one case; HOAG's are slow.
NONFINITE_CASES = [(case, path, False) for case in NAN_DATA for path in PATHS] + [
    ("nan inner data", path, True) for path in PATHS
]


@pytest.mark.parametrize(
    "case, path, jit",
    [pytest.param(*c, marks=pytest.mark.slow) if c[1] == "hoag" else c for c in NONFINITE_CASES],
)
def test_nonfinite_data(case, path, jit):
    inner_data, outer_data = NAN_DATA[case]
    runs = {
        "inner_solve": lambda throw: through_inner_solve(inner_data, outer_data, throw=throw),
        # The value E(w*, λ) at the given w* is computed from no broken input: the hypergradient.
        "implicit reverse": lambda throw: implicit(inner_data, outer_data, "reverse", throw=throw)[
            1
        ],
        "implicit forward": lambda throw: implicit(inner_data, outer_data, "forward", throw=throw)[
            1
        ],
        "implicit_diff": lambda throw: implicit_diff(inner_data, outer_data, throw=throw),
        "hoag": lambda throw: hoag(inner_data, outer_data, throw=throw),
        "unrolled": lambda throw: unrolled(inner_data, outer_data),
        "directions": lambda throw: directions(inner_data, outer_data),
    }
    run = runs[path]
    wrap = (lambda f: jax.jit(f)) if jit else (lambda f: f)
    # The default raises, or (no linear solve to fail) gives NaN; `throw=False` gives NaN.
    assert outcome(wrap(lambda: run(True))) in ("raises", "nan")
    assert outcome(wrap(lambda: run(False))) == "nan"


@pytest.mark.parametrize("case", list(NAN_DATA))
def test_nonfinite_data_info(case):
    inner_data, outer_data = NAN_DATA[case]
    value, hgrad, info = implicit(inner_data, outer_data, has_aux=True, throw=False)
    assert np.isnan(np.asarray(hgrad)).all()
    assert info.result == RESULTS.nonfinite


def test_inner_solve_nonfinite_returns_nan_params():
    sol = bx.inner_solve(
        PROBLEM.inner,
        PROBLEM.init,
        PROBLEM.hparams,
        NAN_INNER,
        solver=bx.GradientDescent(PROBLEM.learning_rate),
        max_steps=100,
    )
    assert sol.result == bx.RESULTS.nonfinite
    assert np.isnan(np.asarray(sol.params)).all()


@pytest.mark.slow
def test_one_nan_task_in_a_batch_poisons_the_meta_gradient():
    # Three tasks, one with NaN data: the meta-gradient must not be the other two's (2/3 of
    # the truth, which is what returning the last finite iterate gave).
    X, y = PROBLEM.inner_data
    Xs = jnp.stack([X, X.at[0, 0].set(jnp.nan), X])
    ys = jnp.stack([y, y, y])

    def meta_loss(lam, throw):
        def task(X, y):
            sol = bx.inner_solve(
                PROBLEM.inner,
                PROBLEM.init,
                lam,
                (X, y),
                solver=bx.GradientDescent(PROBLEM.learning_rate),
                max_steps=5000,
                tol=1e-10,
                adjoint=bx.ImplicitAdjoint(throw=throw),
            )
            return PROBLEM.outer(sol.params, lam, PROBLEM.outer_data), sol.result

        losses, results = jax.vmap(task)(Xs, ys)
        return jnp.mean(losses), results

    value, results = meta_loss(PROBLEM.hparams, True)
    assert np.isnan(float(value))
    assert np.asarray(results == bx.RESULTS.nonfinite).tolist() == [False, True, False]
    grad = lambda throw: jax.grad(lambda lam: meta_loss(lam, throw)[0])(PROBLEM.hparams)
    assert outcome(lambda: grad(True)) == "raises"
    assert outcome(lambda: grad(False)) == "nan"


def with_linear_solver(path, mode, linear_solver, throw):
    """The hypergradient on clean data along `path` with `linear_solver` (`mode` for the
    `implicit_hypergrad` path)."""
    data = (PROBLEM.inner_data, PROBLEM.outer_data)
    if path == "inner_solve":
        return through_inner_solve(*data, linear_solver, throw)
    if path == "implicit":
        return implicit(*data, mode, linear_solver, throw)
    return implicit_diff(*data, linear_solver, throw)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("path", ["inner_solve", "implicit", "implicit_diff"])
def test_truncated_linear_solve(mode, path):
    # Cut short: raises by default; with `throw=False` an approximation (finite, and wrong by
    # more than rounding), flagged in the info.
    assert outcome(lambda: with_linear_solver(path, mode, TRUNCATED, True)) == "raises"
    _, hgrad = with_linear_solver(path, mode, TRUNCATED, False)
    exact = PROBLEM.exact_hypergrad(PROBLEM.hparams)
    assert np.all(np.isfinite(np.asarray(hgrad)))
    assert np.linalg.norm(np.asarray(hgrad) - exact) > 1e-6 * np.linalg.norm(exact)
    if path == "implicit":
        info = implicit(mode=mode, linear_solver=TRUNCATED, throw=False, has_aux=True)[2]
        assert info.result == RESULTS.max_steps_reached


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("path", ["inner_solve", "implicit", "implicit_diff"])
def test_divergent_neumann_series(mode, path):
    assert outcome(lambda: with_linear_solver(path, mode, DIVERGENT, True)) == "raises"
    _, hgrad = with_linear_solver(path, mode, DIVERGENT, False)
    assert np.isnan(np.asarray(hgrad)).all()


def test_divergent_neumann_series_info():
    info = implicit(linear_solver=DIVERGENT, throw=False, has_aux=True)[2]
    assert info.result == RESULTS.breakdown


def test_short_neumann_series_is_approximate_not_failed():
    # Approximate by design: a convergent but short series is not a failure.
    scale = 0.5 * PROBLEM.learning_rate
    _, hgrad, info = implicit(linear_solver=bx.Neumann(3, scale), has_aux=True)
    assert info.result == RESULTS.successful
    assert np.all(np.isfinite(np.asarray(hgrad)))


def test_non_stationary_point_is_reported():
    # Three gradient steps from zero: far from stationary; the info must not say successful.
    w = PROBLEM.init
    for _ in range(3):
        w = w - PROBLEM.learning_rate * jax.grad(PROBLEM.inner)(
            w, PROBLEM.hparams, PROBLEM.inner_data
        )
    _, _, info = implicit(params=w, has_aux=True)
    assert info.result == RESULTS.not_stationary
    assert float(info.inner_grad_norm) > 1e-6
    # At the solution the same call is successful.
    _, _, info = implicit(has_aux=True)
    assert info.result == RESULTS.successful


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_indefinite_hessian_with_cg(mode):
    problem = saddle()
    w_star = problem.exact_params(problem.hparams)

    def run(throw):
        return bx.implicit_hypergrad(
            problem.outer,
            problem.inner,
            w_star,
            problem.hparams,
            problem.inner_data,
            problem.outer_data,
            mode=mode,
            throw=throw,
        )[1]

    assert outcome(lambda: run(True)) == "raises"
    hgrad = np.asarray(run(False))
    exact = np.asarray(problem.exact_hypergrad(problem.hparams))
    if mode == "reverse":
        assert np.isnan(hgrad).all()
    else:
        # One solve per hyperparameter: here (H diagonal) each sees one eigenvalue, so the
        # solves along negative curvature fail (NaN) and the others are exact, not wrong.
        negative = np.asarray(problem.inner_data) < 0
        assert np.isnan(hgrad[negative]).all()
        np.testing.assert_allclose(hgrad[~negative], exact[~negative], rtol=1e-12)
    info = bx.implicit_hypergrad(
        problem.outer,
        problem.inner,
        w_star,
        problem.hparams,
        problem.inner_data,
        problem.outer_data,
        has_aux=True,
        throw=False,
    )[2]
    assert info.result == RESULTS.breakdown
    # An indefinite solver gets the right answer at the same saddle.
    _, hgrad = bx.implicit_hypergrad(
        problem.outer,
        problem.inner,
        w_star,
        problem.hparams,
        problem.inner_data,
        problem.outer_data,
        linear_solver=lx.LU(),
        mode=mode,
    )
    np.testing.assert_allclose(hgrad, problem.exact_hypergrad(problem.hparams), rtol=1e-12)


def test_diverging_unroll_is_nan():
    # A step size far above 2 / L: the unrolled iterates overflow; the hypergradient is NaN,
    # never a finite number.
    value, hgrad = unrolled(PROBLEM.inner_data, PROBLEM.outer_data, learning_rate=1e3)
    assert np.isnan(float(value))
    assert np.isnan(np.asarray(hgrad)).all()


def test_linear_results_promote_to_the_item_of_the_same_message():
    """Every code a linear solve returns becomes the bilevax code with lineax's message, for a
    batch of codes under `jit` (the path of `vmap`ped and sharded tasks), as equinox's
    `promote` would give it."""
    from bilevax._solution import promote_linear_result

    items = list(lx.RESULTS._name_to_item.values())

    def promote_item(index):
        result = lx.RESULTS.successful
        for i, item in enumerate(items):
            result = lx.RESULTS.where(index == i, item, result)
        return promote_linear_result(result)

    promoted = jax.jit(jax.vmap(promote_item))(jnp.arange(len(items)))
    for i, item in enumerate(items):
        expected = RESULTS.promote(item)
        assert int(promoted._value[i]) == int(expected._value)
        assert RESULTS[expected] == lx.RESULTS[item]
