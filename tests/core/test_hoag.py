"""HOAG's adaptive tolerances reach the hyperparameters of a fixed tight tolerance with fewer
inner steps, and warm starts (carried in the state: the solution, the adjoint, a quasi-Newton
solver's state) and a quasi-Newton preconditioner save iterations without changing the
hypergradients. Steps are counted, not timed."""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import optimistix as optx
import pytest
from helpers import logistic, ridge

import bilevax as bx


def _run(problem, hoag, num_steps, init_args=(), optimizer=optax.sgd(1.0)):
    """`num_steps` steps of `optimizer` on HOAG's hypergradients: `(hparams, stats)`, with
    each step's value and hypergradient in the stats."""

    @eqx.filter_jit
    def run(init_args):
        state = hoag.init(problem.init, problem.hparams, *init_args)

        def body(carry, _):
            hparams, state, opt_state = carry
            value, hypergrad, state, stats = hoag.value_and_grad(
                problem.outer,
                problem.inner,
                hparams,
                state,
                problem.inner_data,
                problem.outer_data,
            )
            # Adam's bias correction mixes an int32 count with floats (strict promotion
            # refuses).
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = optimizer.update(hypergrad, opt_state, hparams)
            hparams = optax.apply_updates(hparams, updates)
            return (hparams, state, opt_state), dict(stats, value=value, hypergrad=hypergrad)

        carry = (problem.hparams, state, optimizer.init(problem.hparams))
        (hparams, _, _), stats = jax.lax.scan(body, carry, length=num_steps)
        return hparams, stats

    return run(init_args)


ADAM = optax.adam(optax.exponential_decay(0.1, 100, 0.3))


def _hoag(problem, **kwargs):
    kwargs = {"final_tol": 1e-10, "max_steps": 100_000, **kwargs}
    return bx.contrib.HOAG(bx.GradientDescent(problem.learning_rate, 0.5), **kwargs)


@pytest.mark.parametrize(
    "problem, lam_tol",
    [
        # One shared log L2 strength; both runs at the same point after 300 steps.
        (dataclasses.replace(ridge(n=30), hparams=jnp.asarray(0.0)), 1e-4),
        # Converged: the hypergradient is ~3e-7 at the end of both runs.
        pytest.param(logistic(n=40), 1e-5, marks=pytest.mark.slow),
    ],
    ids=["ridge", "logistic"],
)
def test_adaptive_tolerance_reaches_the_same_hparams_with_fewer_inner_steps(problem, lam_tol):
    adaptive_hoag = _hoag(problem, initial_tol=1e-2, decay=0.9)
    adaptive, adaptive_stats = _run(problem, adaptive_hoag, 300, optimizer=ADAM)
    fixed, fixed_stats = _run(
        problem, _hoag(problem, initial_tol=1e-10, decay=1.0), 300, optimizer=ADAM
    )
    assert float(jnp.max(jnp.abs(adaptive - fixed))) < lam_tol
    adaptive_steps = int(jnp.sum(adaptive_stats["inner_steps"]))
    fixed_steps = int(jnp.sum(fixed_stats["inner_steps"]))
    # Measured: ridge 8258 against 12953, logistic 24896 against 49902.
    assert adaptive_steps < 0.8 * fixed_steps
    # Every inner and linear solve reached its tolerance.
    for stats in (adaptive_stats, fixed_stats):
        assert bool(jnp.all(stats["inner_result"] == bx.RESULTS.successful))
        assert bool(jnp.all(stats["solve_result"] == bx.RESULTS.successful))
    tol = np.asarray(adaptive_stats["tol"])
    assert tol[0] == pytest.approx(1e-2) and tol[-1] == pytest.approx(1e-10)
    assert np.all(np.diff(tol) <= 0)


@pytest.mark.slow
def test_warm_starts_save_iterations_and_keep_the_hypergradients():
    problem = ridge(n=150, d=40)
    kwargs = {"solver": bx.GradientDescent(problem.learning_rate, 0.5)}
    kwargs |= {"initial_tol": 1e-10, "decay": 1.0, "final_tol": 1e-10, "max_steps": 100_000}
    warm, warm_stats = _run(problem, bx.contrib.HOAG(**kwargs), 60)
    cold, cold_stats = _run(
        problem, bx.contrib.HOAG(**kwargs, warm_start_params=False, warm_start_adjoint=False), 60
    )
    # The same hypergradients at every step, so the same path (to the tolerance 1e-10).
    np.testing.assert_allclose(
        warm_stats["hypergrad"], cold_stats["hypergrad"], rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(warm, cold, rtol=0, atol=1e-8)
    # Measured: 1202 against 1415 CG iterations, 3287 against 4273 inner steps.
    assert int(jnp.sum(warm_stats["solve_steps"])) < 0.9 * int(jnp.sum(cold_stats["solve_steps"]))
    assert int(jnp.sum(warm_stats["inner_steps"])) < 0.9 * int(jnp.sum(cold_stats["inner_steps"]))
    # The first step has nothing to warm-start from.
    assert int(warm_stats["solve_steps"][0]) == int(cold_stats["solve_steps"][0])


@functools.cache
def _bfgs_run(**kwargs):
    """30 outer steps of Adam with a dense BFGS inner solver: `(final λ, inner steps, CG steps)`.
    The tolerances reach 1e-8 by step 10; below ~5e-9 BFGS's line search stalls here."""
    problem = logistic(n=80, d=20)
    hoag = bx.contrib.HOAG(
        optx.BFGS(rtol=1e-8, atol=1e-8),
        initial_tol=1e-5,
        decay=0.5,
        final_tol=1e-8,
        max_steps=1_000,
        **kwargs,
    )
    lam, stats = _run(problem, hoag, 30, (problem.inner, problem.inner_data), optax.adam(0.1))
    assert bool(jnp.all(stats["inner_result"] == bx.RESULTS.successful))
    assert bool(jnp.all(stats["solve_result"] == bx.RESULTS.successful))
    total = lambda key: int(jnp.sum(stats[key]))
    return float(lam), total("inner_steps"), total("solve_steps")


def test_a_resumed_quasi_newton_state_saves_inner_steps():
    lam, inner_steps, solve_steps = _bfgs_run()
    fresh_lam, fresh_inner_steps, fresh_solve_steps = _bfgs_run(resume_solver_state=False)
    # The same path to the inner tolerance (λ ≈ -5.08; measured 1.1e-7 apart).
    assert abs(lam - fresh_lam) <= 1e-6
    # BFGS keeps the matrix it built: measured 298 against 1214 inner steps.
    assert inner_steps < 0.5 * fresh_inner_steps
    assert solve_steps == pytest.approx(fresh_solve_steps, rel=0.1)


def test_the_quasi_newton_preconditioner_saves_cg_steps():
    lam, inner_steps, solve_steps = _bfgs_run()
    precond_lam, precond_inner_steps, precond_solve_steps = _bfgs_run(precondition=True)
    # The same hypergradients to CG's tolerance, absolute here (‖∇_w E‖ < 1) and 1e-5 at
    # first: measured 1.0e-6 apart after 30 Adam steps of 0.1.
    assert abs(precond_lam - lam) <= 3e-6
    # Measured: 213 against 397 CG steps; the inner solves barely change (298 both).
    assert precond_solve_steps < 0.7 * solve_steps
    assert precond_inner_steps == pytest.approx(inner_steps, rel=0.1)


def test_adjoint_init_is_the_solves_starting_point():
    # Starting CG at the exact adjoint: converged at once, same hypergradient.
    problem = ridge(n=150, d=40)
    w_star = problem.exact_params(problem.hparams)
    run = jax.jit(
        lambda v0: bx.implicit_hypergrad(
            problem.outer,
            problem.inner,
            w_star,
            problem.hparams,
            problem.inner_data,
            problem.outer_data,
            linear_solver=lx.CG(rtol=1e-12, atol=1e-12),
            adjoint_init=v0,
            has_aux=True,
        )
    )
    _, cold, info = run(jnp.zeros(40))
    _, warm, warm_info = run(info.adjoint)
    assert int(warm_info.solve_steps) <= 2 < int(info.solve_steps)
    np.testing.assert_allclose(warm, cold, rtol=1e-8)
    np.testing.assert_allclose(cold, problem.exact_hypergrad(problem.hparams), rtol=1e-8)


@pytest.mark.slow
def test_a_truncated_linear_solve_raises_or_is_reported():
    # One CG iteration cannot reach 1e-10 on a 40-dimensional Hessian.
    problem = ridge(n=150, d=40)
    kwargs = {"solver": bx.GradientDescent(problem.learning_rate, 0.5)}
    kwargs |= {"initial_tol": 1e-10, "decay": 1.0, "max_steps": 100_000, "linear_max_steps": 1}
    with pytest.raises((eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)):
        jax.block_until_ready(_run(problem, bx.contrib.HOAG(**kwargs), 2))
    hparams, stats = _run(problem, bx.contrib.HOAG(**kwargs, throw=False), 2)
    assert bool(jnp.all(stats["inner_result"] == bx.RESULTS.successful))
    assert bool(jnp.all(stats["solve_result"] == bx.RESULTS.max_steps_reached))
    assert np.all(np.asarray(stats["solve_steps"]) == 1)
    # Cut short is approximate, not meaningless: the one-step answer is kept.
    assert bool(jnp.all(jnp.isfinite(stats["hypergrad"])))
    assert bool(jnp.all(jnp.isfinite(hparams)))


def test_schedule_and_arguments():
    hoag = bx.contrib.HOAG(initial_tol=1e-2, decay=0.5, final_tol=1e-4)
    tols = [float(hoag.tolerance(jnp.asarray(k))) for k in range(10)]
    assert tols[:3] == pytest.approx([1e-2, 5e-3, 2.5e-3])
    assert tols[-1] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="decay"):
        bx.contrib.HOAG(decay=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        bx.contrib.HOAG(max_steps=0)
    with pytest.raises(TypeError, match="solver"):
        bx.contrib.HOAG(optax.sgd)


@pytest.mark.parametrize(
    "solver",
    [bx.GradientDescent(0.1), optax.adam(0.1), optx.BFGS(1e-8, 1e-8, use_inverse=False)],
    ids=["gd", "optax-adam", "bfgs-hessian"],
)
def test_precondition_needs_an_inverse_hessian_approximation(solver):
    problem = logistic()
    hoag = bx.contrib.HOAG(solver, resume_solver_state=False, precondition=True)
    state = hoag.init(problem.init, problem.hparams)
    with pytest.raises(ValueError, match="precondition"):
        hoag.value_and_grad(
            problem.outer,
            problem.inner,
            problem.hparams,
            state,
            problem.inner_data,
            problem.outer_data,
        )


def test_the_solver_state_is_carried_only_where_it_resumes_something():
    problem = logistic()
    # Gradient descent and optax keep nothing between solves: no state, no loss needed.
    for solver in (bx.GradientDescent(0.1), optax.adam(0.1)):
        hoag = bx.contrib.HOAG(solver)
        assert hoag.init(problem.init, problem.hparams).solver_state is None
    bfgs = optx.BFGS(rtol=1e-8, atol=1e-8)
    init = bx.contrib.HOAG(bfgs).init
    # Shapes only: the solve that builds the state is covered by the runs above.
    state = eqx.filter_eval_shape(
        init, problem.init, problem.hparams, problem.inner, problem.inner_data
    )
    assert state.solver_state is not None
    # A quasi-Newton solver's first state is built from the loss: `init` must be given it.
    with pytest.raises(ValueError, match="inner_loss"):
        bx.contrib.HOAG(bfgs).init(problem.init, problem.hparams)
    no_resume = bx.contrib.HOAG(bfgs, resume_solver_state=False)
    assert no_resume.init(problem.init, problem.hparams).solver_state is None
