"""Each of the plausible wrong numbers users found is now a raise or a flagged NaN: every
test here failed on the code before it (a finite, `successful` answer that was wrong)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import implicit, ridge, saddle

import bilevax as bx
from bilevax.diagnostics import hypergrad_info


SPD_TAGS = (lx.symmetric_tag, lx.positive_semidefinite_tag)


@pytest.mark.parametrize("dtype, scale", [(jnp.float64, 1e-170), (jnp.float32, 1e-25)])
def test_cg_solves_a_tiny_right_hand_side(dtype, scale):
    # ‖b‖² underflows (below ~1e-154 in float64, ~1e-19 in float32): CG returned its zero
    # start as `successful`.
    A = jnp.asarray([[3.0, 1.0], [1.0, 2.0]], dtype)
    b = jnp.asarray([1.0, -2.0], dtype) * scale
    solution = lx.linear_solve(lx.MatrixLinearOperator(A, SPD_TAGS), b, bx.CG(1e-5, 0.0))
    want = np.linalg.solve(np.asarray(A, np.float64), np.asarray([1.0, -2.0]))
    np.testing.assert_allclose(np.asarray(solution.value, np.float64) / scale, want, rtol=1e-4)


@pytest.mark.parametrize("steps", [2, 5, 6])
def test_a_slowly_divergent_neumann_series_is_a_breakdown(steps):
    # ρ(I − A) = 1.1: the last term was still below ‖b‖, so the series was called converged.
    A = lx.MatrixLinearOperator(jnp.diag(jnp.asarray([1.0, 2.1])), SPD_TAGS)
    b = jnp.asarray([1.0, 0.3])
    solution = lx.linear_solve(A, b, bx.Neumann(steps, 1.0), throw=False)
    assert solution.result == lx.RESULTS.breakdown


def test_a_zero_neumann_scale_traced_is_a_breakdown():
    # A concrete scale 0 is refused; a traced one gave 0, `successful`.
    A = lx.MatrixLinearOperator(jnp.diag(jnp.asarray([1.0, 2.0])), SPD_TAGS)
    solve = jax.jit(lambda s: lx.linear_solve(A, jnp.ones(2), bx.Neumann(5, s), throw=False))
    assert solve(0.0).result == lx.RESULTS.breakdown
    assert solve(0.4).result == lx.RESULTS.successful


def test_a_convergent_neumann_series_is_not_flagged():
    A = lx.MatrixLinearOperator(jnp.diag(jnp.asarray([1.0, 2.1])), SPD_TAGS)
    solution = lx.linear_solve(A, jnp.asarray([1.0, 0.3]), bx.Neumann(80, 0.4))
    np.testing.assert_allclose(solution.value, [1.0, 0.3 / 2.1], rtol=1e-12)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: bx.CG(rtol=jnp.asarray(-1.0), atol=0.0), "rtol"),
        (lambda: bx.Damped(bx.CG(1e-8, 0.0), jnp.asarray(-0.5)), "damping"),
        (lambda: bx.GradientDescent(jnp.asarray(-0.1)), "learning_rate"),
        (lambda: bx.contrib.HOAG(decay=2.0), "decay"),
        (lambda: bx.Neumann(True), "steps"),
        (lambda: bx.prox_lasso(jnp.ones(3), -1.0), "l1reg"),
        (lambda: bx.nn.dropout(jnp.ones(3), jnp.nan, None, train=False), "rate"),
    ],
)
def test_values_that_gave_wrong_numbers_are_refused(make, name):
    with pytest.raises((TypeError, ValueError), match=f"`{name}`"):
        make()


def test_traced_invalid_strengths_and_rates_give_nan():
    x, key = jnp.linspace(-1.0, 1.0, 5), jax.random.key(0)
    assert np.isnan(jax.jit(bx.prox_lasso)(x, -1.0)).all()
    assert np.isfinite(jax.jit(bx.prox_lasso)(x, 0.5)).all()
    dropout = jax.jit(lambda r: bx.nn.dropout(x, r, key, train=True))
    assert np.isnan(dropout(-0.5)).all() and np.isnan(dropout(jnp.nan)).all()
    assert np.isfinite(dropout(0.5)).all()
    image = jnp.ones((1, 8, 8))
    cutout = jax.jit(lambda n: bx.nn.cutout(image, 3.0, n, key, max_holes=2))
    assert np.isnan(cutout(jnp.nan)).all()
    assert (cutout(1.0) == 0).any()


def test_stn_mlp_refuses_one_rate_for_three_layers():
    model = bx.nn.StnMLP((4, 3, 3, 2), 1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="`rates`"):
        model(jnp.ones(4), jnp.zeros(1), jnp.asarray([0.1]), None, train=False)


def test_hoag_from_a_python_float_moves_as_from_an_array():
    problem = ridge(d=3)
    inner = lambda w, lam, data: problem.inner(w, jnp.full(3, lam), data)

    def run(lam0):
        hoag = bx.contrib.HOAG(bx.GradientDescent(problem.learning_rate))
        state = hoag.init(problem.init, lam0)
        value_and_grad = eqx.filter_jit(hoag.value_and_grad)
        lam = lam0
        for _ in range(3):
            _, hypergrad, state, _ = value_and_grad(
                problem.outer, inner, lam, state, problem.inner_data, problem.outer_data
            )
            lam = lam - hypergrad
        return lam

    from_float, from_array = run(-1.0), run(jnp.asarray(-1.0))
    assert float(from_array) != -1.0  # it moves
    np.testing.assert_allclose(from_float, from_array, rtol=1e-12)


def test_hypergrad_info_of_a_python_float_is_that_of_an_array():
    problem = ridge(d=3)
    inner = lambda w, lam, data: problem.inner(w, jnp.full(3, lam), data)
    w = problem.exact_params(jnp.full(3, -1.0)) + 1e-3  # inexact: the estimate is not 0
    args = (problem.outer, inner, w)
    data = (problem.inner_data, problem.outer_data)
    _, _, info = bx.implicit_hypergrad(*args, jnp.asarray(-1.0), *data, has_aux=True)
    from_float = hypergrad_info(*args, -1.0, *data, info, lanczos_steps=0)
    from_array = hypergrad_info(*args, jnp.asarray(-1.0), *data, info, lanczos_steps=0)
    assert float(from_array.error_estimate) > 1e-6
    np.testing.assert_allclose(from_float.error_estimate, from_array.error_estimate, rtol=1e-6)


def _ridge_solution_off_the_root(init, lam, X, y):
    del init
    A = X.T @ X / len(y) + jnp.exp(lam) * jnp.eye(X.shape[1])
    return jnp.linalg.solve(A, X.T @ y / len(y)) + 1e-3  # not a root


def test_implicit_diff_at_a_point_that_is_not_a_root():
    problem = ridge(d=3)
    X, y = problem.inner_data
    loss = lambda w, lam, X, y: 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.exp(lam) * w @ w
    objective = lambda throw, tol=None: (
        lambda lam: jnp.sum(
            bx.implicit_diff(
                _ridge_solution_off_the_root, jax.grad(loss), symmetric=True, throw=throw, tol=tol
            )(None, lam, X, y)
        )
    )
    with pytest.raises(Exception, match="not a root"):
        jax.grad(objective(True))(0.0)
    assert np.isnan(jax.grad(objective(False))(0.0))
    # Told the solution is only accurate to 1e-1, it differentiates it.
    assert np.isfinite(jax.grad(objective(True, 1e-1))(0.0))


def test_soba_flags_nan_data_its_batches_have_not_drawn():
    problem = ridge(d=3)
    X, y = problem.inner_data
    X = X.at[-1, 0].set(jnp.nan)  # one sample of 60; batches of 2 rarely draw it
    soba = bx.contrib.SOBA(0.01, 0.01, batch_size=2, outer_batch_size=2)
    state = soba.init(
        problem.outer, problem.inner, problem.init, problem.hparams, (X, y), problem.outer_data
    )
    state = soba.step(
        problem.outer, problem.inner, state, (X, y), problem.outer_data, jax.random.key(1)
    )
    assert state.result == bx.RESULTS.nonfinite
    assert np.isnan(np.asarray(state.hparams)).all()


def test_tol_nan_is_refused():
    with pytest.raises(ValueError, match="`tol`"):
        bx.inner_solve(lambda w, h, d: jnp.sum(w**2), jnp.ones(2), jnp.ones(()), tol=jnp.nan)


def test_a_step_that_changes_the_dtype_names_the_leaf():
    X = jnp.ones((5, 3), jnp.float32)
    loss = lambda w, lam, X: jnp.mean((X @ w["w"]) ** 2) + lam * jnp.sum(w["w"] ** 2)
    step = 1.0 / jnp.linalg.norm(X.astype(jnp.float64)) ** 2  # float64 under x64
    match = r"\['w'\] from float32\[3\] to float64\[3\]"
    with jax.numpy_dtype_promotion("standard"), pytest.raises(TypeError, match=match):
        bx.inner_solve(
            loss,
            {"w": jnp.zeros(3, jnp.float32)},
            jnp.asarray(0.1, jnp.float32),
            X,
            solver=bx.GradientDescent(step),
        )


def _saddle_grad(linear_solver, max_steps):
    problem = saddle()

    def objective(lam):
        solution = bx.inner_solve(
            problem.inner,
            problem.init,
            lam,
            problem.inner_data,
            solver=bx.GradientDescent(0.1),
            max_steps=max_steps,
            tol=1e-10,
            adjoint=bx.ImplicitAdjoint(linear_solver),
        )
        return problem.outer(solution.params, lam, problem.outer_data)

    return jax.grad(objective)(problem.hparams)


def test_the_failed_inner_solve_is_named_first():
    with pytest.raises(Exception, match="The inner solve did not succeed") as error:
        _saddle_grad(None, 20)
    assert "GMRES" in str(error.value) and "lx.Normal" in str(error.value)


def test_cholesky_at_a_saddle_says_what_failed():
    # Exact start at the saddle: the inner solve succeeds, the Cholesky factor does not exist.
    problem = saddle()
    w = problem.exact_params(problem.hparams)
    with pytest.raises(Exception, match="non-finite answer from a finite system"):
        implicit(problem, w, linear_solver=lx.Cholesky())


def test_a_nan_adjoint_init_is_named():
    problem = ridge(d=3)
    w = problem.exact_params(problem.hparams)
    with pytest.raises(Exception, match="initial guess"):
        implicit(problem, w, adjoint_init=jnp.full(3, jnp.nan))


def test_a_non_symmetric_jacobian_declared_symmetric_is_named():
    J = jnp.asarray([[2.0, 3.0], [-3.0, 1.0]])  # not symmetric, not definite
    optimality = lambda w, b: J @ w - b
    solve = bx.implicit_diff(
        lambda init, b: jnp.linalg.solve(J, b),
        optimality,
        symmetric=True,
        linear_solver=bx.CG(1e-10, 0.0, max_steps=20),
    )
    with pytest.raises(Exception, match="declared symmetric that is not"):
        jax.grad(lambda b: jnp.sum(solve(None, b)))(jnp.asarray([1.0, 2.0]))
