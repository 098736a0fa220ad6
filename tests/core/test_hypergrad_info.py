"""`bx.HypergradInfo`, which `implicit_hypergrad(..., has_aux=True)` returns, and
`bx.diagnostics.hypergrad_info` on it: the reported diagnostics are what they say, and the
error estimate and bound track the true error against the closed-form ridge hypergradient."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import diagnose, implicit, logistic, reference_solution, relerr, ridge

import bilevax as bx


INNER_TOLS = [1e-2, 1e-4, 1e-6, 1e-8, 1e-10]
Result = bx.RESULTS


def _ridge_hypergrad_at_tol(problem):
    @jax.jit
    def run(tol, linear_tol):
        sol = bx.inner_solve(
            problem.inner,
            problem.init,
            problem.hparams,
            problem.inner_data,
            solver=bx.GradientDescent(problem.learning_rate),
            max_steps=100_000,
            tol=tol,
        )
        linear_solver = lx.CG(rtol=linear_tol, atol=linear_tol)
        _, hgrad, aux = implicit(
            problem, sol.params, linear_solver=linear_solver, has_aux=True, tol=tol
        )
        info = diagnose(problem, sol.params, aux)
        # The same point against the default stationarity test (1e-6).
        strict = implicit(problem, sol.params, linear_solver=linear_solver, has_aux=True)[2]
        return hgrad, aux, info, strict.result

    return run


@pytest.mark.slow
def test_error_estimate_and_bound_track_the_inner_error():
    # The inner tolerance sweeps 1e-2 ... 1e-10 with an exact linear solve: the estimate is
    # within 5% of the true error and the bound is above it, by at most a factor 1.5.
    problem = ridge()
    exact = problem.exact_hypergrad(problem.hparams)
    run = _ridge_hypergrad_at_tol(problem)
    errors = []
    for tol in INNER_TOLS:
        hgrad, aux, info, strict = run(tol, 1e-13)
        error = float(jnp.linalg.norm(hgrad - exact))
        errors.append(error)
        assert aux.result == Result.successful
        assert info.result == Result.successful
        assert float(aux.inner_grad_norm) <= tol
        assert 0.95 * error <= float(info.error_estimate) <= 1.05 * error
        assert error <= float(info.error_bound) <= 1.5 * error
        # A solution stopped above the default tolerance is reported as not stationary.
        if float(aux.inner_grad_norm) > 1e-6:
            assert strict == Result.not_stationary
        else:
            assert strict == Result.successful
    # The error falls with the tolerance, over eight orders of magnitude.
    assert errors[0] > 1e7 * errors[-1]


@pytest.mark.slow
def test_error_estimate_and_bound_track_the_linear_solve_error():
    # Exact w*, CG stopped early on a 40-dimensional Hessian: the error is the linear solve's.
    problem = ridge(n=150, d=40)
    w_star = problem.exact_params(problem.hparams)
    exact = problem.exact_hypergrad(problem.hparams)

    @jax.jit
    def run(linear_tol):
        _, hgrad, aux = implicit(
            problem,
            w_star,
            linear_solver=lx.CG(rtol=linear_tol, atol=linear_tol),
            has_aux=True,
        )
        return hgrad, diagnose(problem, w_star, aux)

    for linear_tol in [1e-2, 1e-4, 1e-6]:
        hgrad, info = run(linear_tol)
        error = float(jnp.linalg.norm(hgrad - exact))
        assert error > 1e-12  # the solve's error dominates, not round-off
        assert 0.9 * error <= float(info.error_estimate) <= 1.1 * error
        assert error <= float(info.error_bound)


@pytest.mark.slow
def test_info_reports_what_it_says():
    problem = logistic()
    w_star = reference_solution(problem)
    w = w_star + 1e-3  # not a minimiser: a visible inner gradient
    solver = lx.CG(rtol=1e-13, atol=1e-13)
    value, hgrad = jax.jit(lambda w: implicit(problem, w, linear_solver=solver))(w)
    value_fwd, hgrad_fwd = jax.jit(
        lambda w: implicit(problem, w, linear_solver=solver, mode="forward")
    )(w)
    value_aux, hgrad_aux, aux = jax.jit(
        lambda w: implicit(problem, w, linear_solver=solver, has_aux=True)
    )(w)
    info = jax.jit(lambda w, aux: diagnose(problem, w, aux))(w, aux)
    # The explicit adjoint path computes the same hypergradient as the custom-JVP path.
    assert float(value_aux) == pytest.approx(float(value), rel=1e-14)
    assert float(value_fwd) == pytest.approx(float(value), rel=1e-14)
    assert relerr(hgrad_aux, hgrad) < 1e-10
    assert relerr(hgrad_aux, hgrad_fwd) < 1e-10
    grad = jax.grad(problem.inner)(w, problem.hparams, problem.inner_data)
    assert float(aux.inner_grad_norm) == pytest.approx(float(jnp.linalg.norm(grad)), rel=1e-12)
    # The diagnostics carry the info they were computed from (through `jit`: equal values).
    assert relerr(info.info.adjoint, aux.adjoint) == 0
    assert float(info.info.residual_norm) == float(aux.residual_norm)
    H = jax.hessian(problem.inner)(w, problem.hparams, problem.inner_data)
    gE = jax.grad(problem.outer)(w, problem.hparams, problem.outer_data)
    assert relerr(aux.adjoint, jnp.linalg.solve(H, gE)) < 1e-10
    assert float(aux.residual_norm) == pytest.approx(
        float(jnp.linalg.norm(H @ aux.adjoint - gE)), rel=1e-6, abs=1e-15
    )
    # Six parameters, 20 Lanczos steps: the extreme Ritz values are the extreme eigenvalues.
    eigs = np.linalg.eigvalsh(np.asarray(H))
    assert float(info.hessian_min) == pytest.approx(eigs[0], rel=1e-10)
    assert float(info.hessian_max) == pytest.approx(eigs[-1], rel=1e-10)
    assert 0 < int(aux.solve_steps) <= 60
    assert bool(info.positive_definite)
    # The inner gradient is far above the stationarity test: both reports say so.
    assert aux.result == Result.not_stationary
    assert info.result == Result.not_stationary


def test_info_without_estimates_is_cheap_and_nan():
    problem = ridge()
    w_star = problem.exact_params(problem.hparams)
    _, hgrad, aux = implicit(problem, w_star, has_aux=True)
    assert relerr(hgrad, problem.exact_hypergrad(problem.hparams)) < 1e-8
    assert aux.result == Result.successful
    # The core's info holds only what the hypergradient had at hand.
    for name in ("error_estimate", "error_bound", "hessian_min", "hessian_max", "mixed_norm"):
        assert not hasattr(aux, name), name
    info = diagnose(problem, w_star, aux, lanczos_steps=0, estimate_error=False)
    assert np.isnan(float(info.error_estimate)) and np.isnan(float(info.hessian_min))
    assert info.result == Result.successful


def test_bad_arguments_are_named():
    problem = ridge()
    w = problem.init
    _, _, aux = implicit(problem, w, has_aux=True)
    with pytest.raises(ValueError, match="mode"):
        implicit(problem, w, has_aux=True, mode="sideways")
    with pytest.raises(ValueError, match="adjoint_init"):
        implicit(problem, w, adjoint_init=jnp.zeros(3))
    with pytest.raises(TypeError, match="throw"):
        implicit(problem, w, throw=None)
    with pytest.raises(ValueError, match="lanczos_steps"):
        bx.diagnostics.hypergrad_info(
            problem.outer, problem.inner, w, problem.hparams, None, None, aux, lanczos_steps=-1
        )
    with pytest.raises(TypeError, match="info"):
        bx.diagnostics.hypergrad_info(
            problem.outer, problem.inner, w, problem.hparams, None, None, aux.adjoint
        )
    with pytest.raises(ValueError, match="info.adjoint"):
        wrong = eqx.tree_at(lambda i: i.adjoint, aux, jnp.zeros(3))
        bx.diagnostics.hypergrad_info(
            problem.outer, problem.inner, w, problem.hparams, None, None, wrong
        )
    with pytest.raises(TypeError, match="preconditioner"):
        bx.Preconditioned(bx.CG(1e-10, 0.0), "jacobi")
    # The diagnostics' options left `implicit_hypergrad` for `bx.diagnostics.hypergrad_info`.
    for removed in ("lanczos_steps", "estimate_error", "preconditioner", "key"):
        with pytest.raises(TypeError, match=removed):
            implicit(problem, w, has_aux=True, **{removed: None})


def test_info_under_vmap_and_jit():
    problem = ridge()
    lams = jnp.stack([problem.hparams, problem.hparams + 0.5])

    @eqx.filter_jit
    @jax.vmap
    def run(lam):
        w = problem.exact_params(lam)
        args = (problem.outer, problem.inner, w, lam, problem.inner_data, problem.outer_data)
        value, hgrad, aux = bx.implicit_hypergrad(*args, has_aux=True)
        info = bx.diagnostics.hypergrad_info(*args, aux, estimate_error=False)
        return value, hgrad, info

    _, hgrads, info = run(lams)
    for i in range(2):
        assert relerr(hgrads[i], problem.exact_hypergrad(lams[i])) < 1e-8
    assert info.hessian_min.shape == (2,)
    assert bool(jnp.all(info.hessian_min > 0))


def test_ritz_values_are_the_eigenvalues_when_the_krylov_space_closes_early():
    from bilevax.diagnostics._spectrum import ritz_values

    # Two distinct eigenvalues: Lanczos closes an invariant subspace after two steps and
    # continues with fresh random directions; the values stay inside the spectrum.
    A = jnp.diag(jnp.asarray([1.0, 1.0, 1.0, 5.0, 5.0]))
    full = ritz_values(lambda x: A @ x, 5, 20, jnp.float64, jax.random.key(0))
    np.testing.assert_allclose(full, [1, 1, 1, 5, 5], atol=1e-12)
    few = ritz_values(lambda x: A @ x, 5, 3, jnp.float64, jax.random.key(1))
    assert np.all((np.asarray(few) >= 1 - 1e-12) & (np.asarray(few) <= 5 + 1e-12))
