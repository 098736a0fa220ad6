"""Carrying an inner solver's state from one solve to the next (`inner_solve(...,
solver_state=...)`, `Solution.state`): a resumed quasi-Newton solve reaches the same solution
in fewer steps, its derivative is the implicit one, and failures and misuse are reported."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimistix as optx
import pytest
from helpers import (
    central_difference,
    directional,
    logistic_loss,
    logistic_outer,
    random_direction,
    relerr,
)

import bilevax as bx


TOL = 1e-8


def _problem(d=40, n=120, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(2 * n, d)) * np.geomspace(1.0, 3.0, d)  # features on different scales
    y = (X @ rng.normal(size=d) + rng.normal(size=2 * n) > 0).astype(np.float64)
    train = (jnp.asarray(X[:n]), jnp.asarray(y[:n]))
    val = (jnp.asarray(X[n:]), jnp.asarray(y[n:]))
    lam = jnp.asarray(np.log(1e-2) + rng.uniform(-1.0, 1.0, d))
    step = jnp.asarray(0.05 * rng.choice([-1.0, 1.0], d))  # an Adam-sized outer step
    return train, val, lam, step


@eqx.filter_jit
def _two_steps(w, lam, train, state):
    return bx.inner_solve(
        logistic_loss, w, lam, train, solver=_lbfgs(), max_steps=2, solver_state=state
    )


def _newton(w, lam, train):
    grad = jax.grad(logistic_loss)
    for _ in range(20):
        w = w - jnp.linalg.solve(jax.hessian(logistic_loss)(w, lam, train), grad(w, lam, train))
    return w


def _lbfgs():
    return optx.LBFGS(rtol=TOL, atol=TOL, history_length=10)


# Jitted, so that the tests' repeated solves of one shape compile once.
@eqx.filter_jit
def _solve(w, lam, train, solver, state=None, adjoint=bx.ImplicitAdjoint()):
    return bx.inner_solve(
        logistic_loss,
        w,
        lam,
        train,
        solver=solver,
        tol=TOL,
        max_steps=5_000,
        solver_state=state,
        adjoint=adjoint,
    )


def test_resumed_bfgs_solve_reaches_the_same_solution_in_fewer_steps():
    """BFGS keeps a dense inverse-Hessian approximation: resumed at the next outer step, it
    starts with the curvature it built (measured: 25-45% fewer steps on these problems)."""
    solver = optx.BFGS(rtol=TOL, atol=TOL)
    for seed in range(3):
        train, _, lam, step = _problem(seed=seed)
        first = _solve(jnp.zeros(lam.shape), lam, train, solver)
        assert first.result == bx.RESULTS.successful
        # The next outer step: warm-started at the last solution, with and without its state.
        fresh = _solve(first.params, lam + step, train, solver)
        resumed = _solve(first.params, lam + step, train, solver, first.state)
        assert fresh.result == bx.RESULTS.successful
        assert resumed.result == bx.RESULTS.successful
        # Both stop at ‖∇L‖ ≤ 1e-8, the Hessian's smallest eigenvalue above e^λ > 1e-3.
        assert relerr(resumed.params, fresh.params) <= 1e-5
        assert int(resumed.stats["num_steps"]) < 0.9 * int(fresh.stats["num_steps"])


@pytest.mark.slow
def test_resumed_lbfgs_solve_uses_its_curvature_pairs_and_reaches_the_same_solution():
    """L-BFGS keeps its last `history_length` curvature pairs, which it would rebuild within
    as many steps: the first step differs, the solution does not (and the step count barely
    does, see docs/performance.md section 6)."""
    train, _, lam, step = _problem()
    first = _solve(jnp.zeros(lam.shape), lam, train, _lbfgs())
    one_step = lambda state: _two_steps(first.params, lam + step, train, state)
    # The first step only evaluates the starting point; the second moves along the direction
    # of the inverse-Hessian approximation: the carried one, or the identity.
    assert relerr(one_step(first.state).params, one_step(None).params) > 1e-6
    fresh = _solve(first.params, lam + step, train, _lbfgs())
    resumed = _solve(first.params, lam + step, train, _lbfgs(), first.state)
    assert resumed.result == bx.RESULTS.successful
    assert relerr(resumed.params, fresh.params) <= 1e-5


def test_the_loss_and_gradient_of_the_old_problem_are_not_carried():
    """The state holds the old loss; a resume that kept it would compare the new problem's
    loss with it in the first line search. At the very same point and a much larger λ, the
    new loss is far above the old one: the resumed solve must still converge there."""
    train, _, lam, _ = _problem()
    first = _solve(jnp.zeros(lam.shape), lam, train, _lbfgs())
    resumed = _solve(first.params, lam + 3.0, train, _lbfgs(), first.state)
    reference = _solve(jnp.zeros(lam.shape), lam + 3.0, train, _lbfgs())
    assert resumed.result == bx.RESULTS.successful
    assert relerr(resumed.params, reference.params) <= 1e-5


@pytest.mark.parametrize(
    "solver",
    [pytest.param(bx.GradientDescent(0.5), marks=pytest.mark.slow), optax.adam(0.05)],
    ids=["gd", "optax-adam"],
)
def test_solvers_without_curvature_start_afresh(solver):
    train, _, lam, step = _problem(d=5, n=40)
    lam = lam + 3.0  # well conditioned: first-order solvers converge quickly
    w0 = jnp.zeros(lam.shape)
    first = bx.inner_solve(logistic_loss, w0, lam, train, solver=solver, tol=1e-6, max_steps=5_000)
    solve = lambda state: bx.inner_solve(
        logistic_loss,
        first.params,
        lam + step,
        train,
        solver=solver,
        tol=1e-6,
        max_steps=5_000,
        solver_state=state,
    )
    fresh, resumed = solve(None), solve(first.state)
    assert int(resumed.stats["num_steps"]) == int(fresh.stats["num_steps"])
    assert relerr(resumed.params, fresh.params) == 0


@pytest.mark.slow  # 10-17 s, compilation
def test_the_hypergradient_of_a_resumed_solve_matches_finite_differences():
    """The state is a warm start, never differentiated: the derivative of a resumed solve is
    the implicit one, in float64 against central differences of a fresh solve."""
    train, val, lam, step = _problem(d=8, n=60)
    first = _solve(jnp.zeros(lam.shape), lam - step, train, _lbfgs())

    def objective(lam, state):
        return logistic_outer(_solve(first.params, lam, train, _lbfgs(), state).params, lam, val)

    hypergrad = eqx.filter_jit(jax.grad(objective))(lam, first.state)
    plain = eqx.filter_jit(jax.grad(objective))(lam, None)
    assert relerr(hypergrad, plain) <= 1e-6
    # The reference: Newton's method to machine precision (no bilevax solver), differenced.
    newton = lambda lam: logistic_outer(_newton(first.params, lam, train), lam, val)
    direction = random_direction(lam)
    fd = central_difference(jax.jit(newton), lam, direction)
    assert abs(directional(hypergrad, direction) - fd) <= 1e-6 * abs(fd)
    # No derivative flows into the state.
    state_grad = jax.grad(lambda s: objective(lam, s), allow_int=True)(first.state)
    assert all(
        float(jnp.max(jnp.abs(g))) == 0
        for g in jax.tree.leaves(state_grad)
        if eqx.is_inexact_array(g)
    )


@pytest.mark.slow  # 10-17 s, compilation
def test_unrolled_solve_resumes_and_reports_its_state():
    train, _, lam, step = _problem(d=8, n=60)
    adjoint = bx.UnrolledAdjoint()
    first = bx.inner_solve(
        logistic_loss, jnp.zeros(8), lam, train, solver=_lbfgs(), max_steps=30, adjoint=adjoint
    )
    resumed = bx.inner_solve(
        logistic_loss,
        first.params,
        lam + step,
        train,
        solver=_lbfgs(),
        max_steps=30,
        adjoint=adjoint,
        solver_state=first.state,
    )
    assert float(resumed.stats["grad_norm"]) <= 1e-8
    # Differentiable with respect to λ through the steps, the state held fixed.
    g = jax.grad(
        lambda lam: jnp.sum(
            bx.inner_solve(
                logistic_loss,
                first.params,
                lam,
                train,
                solver=_lbfgs(),
                max_steps=30,
                adjoint=adjoint,
                solver_state=first.state,
            ).params
        )
    )(lam + step)
    assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.slow  # 10-17 s, compilation
def test_a_state_is_carried_through_scan_and_vmap():
    """The state is a pytree of arrays: the carry of a jitted outer loop, batched over tasks.
    `inner_solve(..., max_steps=0).state` is the loop's first carry."""
    train, val, lam, _ = _problem(d=10, n=60)
    w0 = jnp.zeros(lam.shape)

    @jax.jit
    def loop(lam):
        state0 = bx.inner_solve(logistic_loss, w0, lam, train, solver=_lbfgs(), max_steps=0).state

        def step(carry, _):
            lam, w, state = carry
            sol = _solve(w, lam, train, _lbfgs(), state)
            grad = jax.grad(
                lambda lam: logistic_outer(_solve(w, lam, train, _lbfgs(), state).params, lam, val)
            )(lam)
            return (lam - 0.5 * jnp.sign(grad) * 0.05, sol.params, sol.state), sol.stats[
                "num_steps"
            ]

        (lam, *_), steps = jax.lax.scan(step, (lam, w0, state0), length=5)
        return lam, steps

    lam_out, steps = loop(lam)
    assert bool(jnp.all(jnp.isfinite(lam_out))) and int(steps[0]) > int(steps[-1])
    lams = jnp.stack([lam, lam + 0.1])
    batched = jax.vmap(lambda lam: _solve(w0, lam, train, _lbfgs()))(lams)
    resumed = jax.vmap(lambda lam, s: _solve(w0, lam, train, _lbfgs(), s))(
        lams + 0.05, batched.state
    )
    assert bool(jnp.all(resumed.stats["grad_norm"] <= TOL))


def test_a_state_of_another_structure_is_refused():
    train, _, lam, _ = _problem(d=6, n=30)
    gd_state = _solve(jnp.zeros(6), lam, train, bx.GradientDescent(0.1)).state
    with pytest.raises(ValueError, match="solver_state"):
        _solve(jnp.zeros(6), lam, train, _lbfgs(), gd_state)


def test_a_diverged_solve_returns_a_nan_state():
    train, _, lam, _ = _problem(d=6, n=30)
    bad = (train[0].at[0, 0].set(jnp.nan), train[1])
    sol = _solve(jnp.zeros(6), lam, bad, _lbfgs())
    assert sol.result == bx.RESULTS.nonfinite
    floats = [x for x in jax.tree.leaves(sol.state) if eqx.is_inexact_array(x)]
    assert floats and all(bool(jnp.all(jnp.isnan(x))) for x in floats)


# -- the inner solver's inverse Hessian as the adjoint solve's preconditioner ------------------


@eqx.filter_jit
def _hypergrad(w, lam, train, val, linear_solver):
    return bx.implicit_hypergrad(
        logistic_outer,
        logistic_loss,
        w,
        lam,
        train,
        val,
        linear_solver=linear_solver,
        has_aux=True,
        tol=TOL,
    )


@pytest.mark.slow
@pytest.mark.parametrize("solver", [optx.BFGS(rtol=TOL, atol=TOL), _lbfgs()], ids=["bfgs", "lbfgs"])
def test_the_quasi_newton_preconditioner_gives_the_same_hypergradient(solver):
    train, val, lam, _ = _problem(d=20, n=60)
    sol = _solve(jnp.zeros(lam.shape), lam, train, solver)
    assert sol.result == bx.RESULTS.successful
    cg = bx.CG(rtol=1e-10, atol=0.0)
    preconditioned = bx.Preconditioned(cg, bx.QuasiNewtonPreconditioner(solver, sol.state))
    _, plain, plain_info = _hypergrad(sol.params, lam, train, val, cg)
    _, hypergrad, info = _hypergrad(sol.params, lam, train, val, preconditioned)
    assert info.result == bx.RESULTS.successful
    # Both stop at ‖H v − ∇_w E‖ ≤ 1e-10 ‖∇_w E‖: the preconditioner changes the path only.
    assert float(info.residual_norm) <= 1e-9 * float(
        jnp.linalg.norm(jax.grad(logistic_outer)(sol.params, lam, val))
    )
    assert relerr(hypergrad, plain) <= 1e-7
    # Against central differences of Newton's solution (float64, no bilevax solver). The
    # inner solve stopped at ‖∇L‖ ≤ 1e-8, so w* (and the hypergradient) is good to ~1e-6.
    newton = lambda lam: logistic_outer(_newton(sol.params, lam, train), lam, val)
    direction = random_direction(lam)
    fd = central_difference(jax.jit(newton), lam, direction)
    assert abs(directional(hypergrad, direction) - fd) <= 1e-5 * abs(fd)
    if isinstance(solver, optx.BFGS):
        # A dense BFGS approximation is good: CG needs far fewer iterations with it.
        assert int(info.solve_steps) <= 0.7 * int(plain_info.solve_steps)


def test_the_quasi_newton_preconditioner_needs_a_quasi_newton_solver():
    train, val, lam, _ = _problem(d=6, n=30)
    solver = bx.GradientDescent(0.1)
    sol = _solve(jnp.zeros(6), lam, train, solver)
    linear_solver = bx.Preconditioned(
        bx.CG(rtol=1e-8, atol=0.0), bx.QuasiNewtonPreconditioner(solver, sol.state)
    )
    with pytest.raises(TypeError, match="QuasiNewtonPreconditioner"):
        _hypergrad(sol.params, lam, train, val, linear_solver)
