"""The approximate adjoints (`bx.OneStepAdjoint`, `bx.FiniteDifferenceAdjoint` (DARTS),
`bx.SAMAAdjoint`): each against a hand-written implementation of its formula, against the exact
hypergradient where the approximation is exact, and their error estimates
(`bx.diagnostics.hypergrad_info(..., hypergrad=h)`) against the true error."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimistix as optx
import pytest
from helpers import (
    biased_ridge,
    diagnose,
    implicit,
    logistic,
    mlp,
    quadratic,
    reference_hypergrad,
    reference_solution,
    relerr,
    ridge,
    solve,
)
from jax.flatten_util import ravel_pytree

import bilevax as bx


def _slow(*makes):
    """The problems after the first are `slow`: the default run checks each property on ridge
    (the test budget), CI's slow session on the whole zoo."""
    first, *rest = makes
    return [first, *(pytest.param(m, marks=pytest.mark.slow) for m in rest)]


ZOO = _slow(ridge, biased_ridge, logistic, quadratic, mlp)
CONVEX = _slow(ridge, biased_ridge, logistic, quadratic)


def _solution(problem):
    """A minimiser: Newton's for the convex problems, Adam to ‖∇L‖ ≤ 1e-8 for the MLP (from
    its initial point Newton may stop at a saddle)."""
    if problem.strongly_convex:
        return reference_solution(problem)
    return solve(problem, tol=1e-8, max_steps=100_000).params


def _flat(problem, params):
    """The losses on the flattened parameters (plain JAX): `(w, L(w, λ), E(w, λ))`."""
    float_params, static = eqx.partition(params, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(float_params)
    L = lambda w, lam: problem.inner(eqx.combine(unravel(w), static), lam, problem.inner_data)
    E = lambda w, lam: problem.outer(eqx.combine(unravel(w), static), lam, problem.outer_data)
    return flat, L, E


def _step_size(problem):
    # The MLP's safe step for gradient descent is smaller than its `learning_rate` (Adam's).
    return problem.learning_rate if problem.strongly_convex else 0.05


def _approximate(problem, params, adjoint, solver, **kwargs):
    return implicit(problem, params, adjoint=adjoint, solver=solver, **kwargs)


def _hand_written(problem, params, v_of, mixed="exact", radius=None):
    r"""∂_λE − Bᵀv with v = `v_of(w, ∇_wE)`, the mixed product exact or by DARTS' central
    difference of ∇_λL at w ± εv, ε = radius / ‖v‖."""
    lam = problem.hparams
    w, L, E = _flat(problem, params)
    v = v_of(w, jax.grad(E)(w, lam))
    if mixed == "exact":
        product = jax.grad(lambda lam: jnp.vdot(jax.grad(L)(w, lam), v))(lam)
    else:
        eps = radius / jnp.linalg.norm(v)
        grad_lam = jax.grad(L, argnums=1)
        product = (grad_lam(w + eps * v, lam) - grad_lam(w - eps * v, lam)) / (2 * eps)
    return jax.grad(E, argnums=1)(w, lam) - product


@pytest.mark.parametrize("make", ZOO)
@pytest.mark.parametrize("mode", ["reverse", pytest.param("forward", marks=pytest.mark.slow)])
def test_one_step_is_its_formula(make, mode):
    """v = η∇_wE for gradient descent, through `implicit_hypergrad` and through
    `inner_solve(..., adjoint=OneStepAdjoint())` (`jax.grad`, or `jax.jacfwd` in forward
    mode)."""
    problem = make()
    eta = _step_size(problem)
    params = _solution(problem)
    expected = _hand_written(problem, params, lambda w, g: eta * g)
    solver = bx.GradientDescent(eta)
    _, hgrad = _approximate(problem, params, bx.OneStepAdjoint(), solver, mode=mode)
    assert relerr(hgrad, expected) < 1e-10

    def through_solve(lam):
        sol = bx.inner_solve(
            problem.inner,
            params,  # already a solution: the solve stops at once, and `params` is returned
            lam,
            problem.inner_data,
            solver=solver,
            tol=1e-3,
            adjoint=bx.OneStepAdjoint(),
        )
        return problem.outer(sol.params, lam, problem.outer_data)

    derivative = jax.grad if mode == "reverse" else jax.jacfwd
    assert relerr(derivative(through_solve)(problem.hparams), expected) < 1e-10


@pytest.mark.parametrize("make", ZOO)
@pytest.mark.parametrize("learning_rate", [None, pytest.param(1.0, marks=pytest.mark.slow)])
def test_finite_difference_is_darts(make, learning_rate):
    """DARTS: v = ξ∇_wE (ξ the solver's step, or betty's 1.0), Bᵀv by the central difference
    at ε = 0.01/‖v‖; through `implicit_hypergrad` and through `inner_solve` (jitted)."""
    problem = make()
    eta = _step_size(problem)
    params = _solution(problem)
    xi = eta if learning_rate is None else learning_rate
    expected = _hand_written(problem, params, lambda w, g: xi * g, "fd", 0.01)
    adjoint = bx.FiniteDifferenceAdjoint(learning_rate=learning_rate)
    solver = bx.GradientDescent(eta)
    _, hgrad = _approximate(problem, params, adjoint, solver)
    assert relerr(hgrad, expected) < 1e-9

    @jax.jit
    def through_solve(lam):
        sol = bx.inner_solve(
            problem.inner, params, lam, problem.inner_data, solver=solver, tol=1e-3, adjoint=adjoint
        )
        return problem.outer(sol.params, lam, problem.outer_data)

    assert relerr(jax.grad(through_solve)(problem.hparams), expected) < 1e-9
    # Every zoo penalty is e^λ‖w‖²: ∇_λL is quadratic in w, and the central difference is the
    # exact product up to rounding.
    exact_product = _hand_written(problem, params, lambda w, g: xi * g)
    assert relerr(hgrad, exact_product) < 1e-8


@pytest.mark.parametrize("make", _slow(ridge, logistic))
def test_sama_is_betty(make):
    """SAMA after an Adam solve: v = η d ⊙ ∇_wE with betty's Adam derivative d from the
    solve's moments and the gradient at its point, Bᵀv by the central difference at
    ε = 1/‖v‖; through `implicit_hypergrad` and through `inner_solve`."""
    problem = make()
    lr, b1, b2, eps = 1e-2, 0.9, 0.99, 1e-8
    adam = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    sol = solve(problem, solver=adam, tol=1e-8)
    adam_state = sol.state[0]
    mu, nu = adam_state.mu, adam_state.nu

    def v_of(w, outer_grad):
        _, L, _ = _flat(problem, sol.params)
        g = jax.grad(L)(w, problem.hparams)
        s_next = b2 * nu + (1 - b2) * g**2
        d = ((1 - b1) * b2 * nu - b1 * (1 - b2) * g * mu) / (jnp.sqrt(s_next) + eps) ** 3
        return lr * d * outer_grad

    expected = _hand_written(problem, sol.params, v_of, "fd", 1.0)
    adjoint = bx.SAMAAdjoint(lr, b1=b1, b2=b2, eps=eps)
    _, hgrad = _approximate(problem, sol.params, adjoint, adam, solver_state=sol.state)
    assert relerr(hgrad, expected) < 1e-9

    def through_solve(lam):
        solution = bx.inner_solve(
            problem.inner,
            problem.init,
            lam,
            problem.inner_data,
            solver=adam,
            max_steps=20_000,
            tol=1e-8,
            adjoint=adjoint,
        )
        return problem.outer(solution.params, lam, problem.outer_data)

    assert relerr(jax.grad(through_solve)(problem.hparams), expected) < 1e-8


def _identity_quadratic(scale=4.0, seed=0):
    """L = ½ c‖w‖² − (Bλ)ᵀw + ½ λᵀλ‖w‖²/10: H = cI + ..., so gradient descent with η = 1/c
    is Newton's method only where λ = 0; with the last term dropped (`coupled=False`) it is
    exactly Newton's, and the one-step estimate is exact."""
    rng = np.random.default_rng(seed)
    B = jnp.asarray(rng.normal(size=(6, 3)))
    c = jnp.asarray(rng.normal(size=6))

    def inner(w, lam, data):
        del data
        return 0.5 * scale * jnp.sum(w**2) - jnp.vdot(B @ lam, w)

    def outer(w, lam, data):
        del data
        return 0.5 * jnp.sum((w - c) ** 2) + 0.1 * jnp.sum(lam**2)

    lam = jnp.asarray([0.5, -1.0, 2.0])
    w_star = B @ lam / scale
    exact = B.T @ (w_star - c) / scale + 0.2 * lam
    return inner, outer, w_star, lam, exact


@pytest.mark.parametrize(
    "adjoint", [bx.OneStepAdjoint(), bx.FiniteDifferenceAdjoint()], ids=["one_step", "darts"]
)
def test_exact_where_the_step_is_newton(adjoint):
    """With H = I/η the step's derivative is H⁻¹: the one-step adjoint is the exact adjoint,
    and DARTS' difference (of a ∇_λL linear in w) the exact product."""
    scale = 4.0
    inner, outer, w_star, lam, exact = _identity_quadratic(scale)
    _, hgrad, info = bx.implicit_hypergrad(
        outer,
        inner,
        w_star,
        lam,
        adjoint=adjoint,
        solver=bx.GradientDescent(1 / scale),
        has_aux=True,
    )
    assert relerr(hgrad, exact) < 1e-12
    assert float(info.residual_norm) < 1e-12


METHODS = {
    "one_step": lambda p: (bx.OneStepAdjoint(), bx.GradientDescent(_step_size(p))),
    "darts": lambda p: (bx.FiniteDifferenceAdjoint(), bx.GradientDescent(_step_size(p))),
    "betty_darts": lambda p: (
        bx.FiniteDifferenceAdjoint(learning_rate=1.0),
        bx.GradientDescent(_step_size(p)),
    ),
}


def _estimate(problem, params, method, **kwargs):
    """`(hypergrad, diagnostics)` of an approximate adjoint at `params`."""
    adjoint, solver = METHODS[method](problem)
    _, hgrad, info = _approximate(problem, params, adjoint, solver, has_aux=True, tol=1.0)
    diagnostics = diagnose(problem, params, info, hypergrad=hgrad, **kwargs)
    return hgrad, diagnostics


@pytest.mark.parametrize("make", CONVEX)
@pytest.mark.parametrize("method", ["darts", *_slow("one_step", "betty_darts")[1:]])
def test_error_estimate_at_a_solution(make, method):
    """At an exact minimiser the estimate is the true error (the adjoint's error is linear in
    its residual, which the estimate solves for exactly), and the bound (Lanczos run to the
    dimension, so μ and ‖B‖ are exact) is above it."""
    problem = make()
    params = _solution(problem)
    hgrad, diagnostics = _estimate(problem, params, method)
    true_error = relerr(hgrad, reference_hypergrad(problem)) * float(
        np.linalg.norm(np.ravel(reference_hypergrad(problem)))
    )
    assert true_error > 1e-4  # a real approximation error, not rounding
    assert abs(float(diagnostics.error_estimate) - true_error) < 1e-6 * true_error
    assert float(diagnostics.error_bound) >= true_error
    assert diagnostics.result == bx.RESULTS.successful


@pytest.mark.slow
@pytest.mark.parametrize("make", CONVEX)
def test_error_estimate_at_an_approximate_solution(make):
    """At a point solved to ‖∇_wL‖ ≈ 1e-3 only, the error against h*(w*) has a first-order
    part from the inner error as well: the estimate stays within 5% of it, the bound above."""
    problem = make()
    params = solve(problem, tol=1e-3).params
    true = reference_hypergrad(problem)
    hgrad, diagnostics = _estimate(problem, params, "darts")
    true_error = relerr(hgrad, true) * float(np.linalg.norm(np.ravel(true)))
    assert abs(float(diagnostics.error_estimate) - true_error) < 0.05 * true_error
    assert float(diagnostics.error_bound) >= true_error


@pytest.mark.slow
def test_error_estimate_on_the_mlp():
    """The non-convex MLP: at a minimiser the estimate is still the error against the exact
    implicit hypergradient there; the bound is only a first-order bound where Lanczos found
    μ (20 steps on 25 parameters, so μ may be overestimated): the docs say it is not
    guaranteed, and it is 3 orders of magnitude loose here."""
    problem = mlp()
    params = _solution(problem)
    exact = implicit(problem, params)[1]
    for method in METHODS:
        hgrad, diagnostics = _estimate(problem, params, method)
        true_error = float(jnp.linalg.norm(jnp.ravel(hgrad - exact)))
        assert abs(float(diagnostics.error_estimate) - true_error) < 1e-4 * true_error, method


def test_reverse_only_and_bad_arguments():
    problem = ridge()
    params = reference_solution(problem)
    gd = bx.GradientDescent(problem.learning_rate)

    def through_solve(adjoint, solver=gd):
        def f(lam):
            sol = bx.inner_solve(
                problem.inner, params, lam, problem.inner_data, solver=solver, adjoint=adjoint
            )
            return problem.outer(sol.params, lam, problem.outer_data)

        return f

    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(through_solve(bx.FiniteDifferenceAdjoint()), (problem.hparams,), (problem.hparams,))
    with pytest.raises(ValueError, match='`mode="forward"`'):
        _approximate(problem, params, bx.FiniteDifferenceAdjoint(), gd, mode="forward")
    with pytest.raises(TypeError, match="Adam"):
        jax.grad(through_solve(bx.SAMAAdjoint(0.1)))(problem.hparams)
    with pytest.raises(TypeError, match="Adam"):
        _approximate(problem, params, bx.SAMAAdjoint(0.1), optax.sgd(0.1))
    with pytest.raises(ValueError, match="`radius`"):
        bx.FiniteDifferenceAdjoint(radius=0.0)
    with pytest.raises(ValueError, match="`learning_rate`"):
        bx.FiniteDifferenceAdjoint(learning_rate=-1.0)
    with pytest.raises(ValueError, match="pass it as `solver`"):
        _approximate(problem, params, bx.OneStepAdjoint(), None)
    with pytest.raises(ValueError, match="`linear_solver`"):
        _approximate(problem, params, bx.OneStepAdjoint(), gd, linear_solver=bx.CG(1e-6, 1e-6))
    with pytest.raises(ValueError, match="`solver`"):
        implicit(problem, params, solver=gd)
    with pytest.raises(TypeError, match="`adjoint`"):
        implicit(problem, params, adjoint=bx.ImplicitAdjoint())
    _, hgrad, info = _approximate(problem, params, bx.OneStepAdjoint(), gd, has_aux=True)
    with pytest.raises(ValueError, match="`hypergrad`"):
        diagnose(problem, params, info, hypergrad={"a": hgrad})


@pytest.mark.slow
def test_optimistix_minimiser_is_refused():
    """An optimistix minimiser's step moves along the direction of its previous step, so one
    step's derivative with respect to λ is zero: refused, rather than a zero hypergradient."""
    problem = ridge()
    params = reference_solution(problem)
    bfgs = optx.BFGS(1e-8, 1e-8)

    def f(lam):
        sol = bx.inner_solve(
            problem.inner, params, lam, problem.inner_data, solver=bfgs, adjoint=bx.OneStepAdjoint()
        )
        return problem.outer(sol.params, lam, problem.outer_data)

    # Refused at trace time: nothing is compiled or run.
    with pytest.raises(TypeError, match="optimistix"):
        jax.eval_shape(jax.grad(f), problem.hparams)
    for adjoint in (bx.OneStepAdjoint(), bx.FiniteDifferenceAdjoint()):
        with pytest.raises(TypeError, match="optimistix|evaluates its own"):
            jax.eval_shape(lambda: _approximate(problem, params, adjoint, bfgs, has_aux=True))


@pytest.mark.parametrize(
    "adjoint",
    [pytest.param(bx.OneStepAdjoint(), marks=pytest.mark.slow), bx.FiniteDifferenceAdjoint()],
    ids=["one_step", "darts"],
)
def test_vmap_matches_a_loop(adjoint):
    """Hypergradients through `inner_solve` of a batch of hyperparameters under `jit(vmap)`
    equal those computed one by one: each task's finite difference uses its own ε."""
    problem = ridge()
    solver = bx.GradientDescent(problem.learning_rate)

    def hypergrad(lam):
        def f(lam):
            sol = bx.inner_solve(
                problem.inner,
                problem.init,
                lam,
                problem.inner_data,
                solver=solver,
                max_steps=5000,
                tol=1e-8,
                adjoint=adjoint,
            )
            return problem.outer(sol.params, lam, problem.outer_data)

        return jax.grad(f)(lam)

    batch = problem.hparams + jnp.asarray([[0.0], [0.5], [-1.0]])
    batched = jax.jit(jax.vmap(hypergrad))(batch)
    for i in range(batch.shape[0]):
        assert relerr(batched[i], hypergrad(batch[i])) < 1e-9


@pytest.mark.parametrize("method", _slow("darts", "one_step", "betty_darts"))
def test_nan_data_gives_nan(method):
    """NaN training data: the inner solve is non-finite, and so is every hypergradient
    computed from it, through `inner_solve` and in the info."""
    problem = ridge()
    X, y = problem.inner_data
    bad = dataclasses.replace(problem, inner_data=(X.at[0, 0].set(jnp.nan), y))
    adjoint, solver = METHODS[method](bad)

    def f(lam):
        sol = bx.inner_solve(
            bad.inner, bad.init, lam, bad.inner_data, solver=solver, max_steps=50, adjoint=adjoint
        )
        return bad.outer(sol.params, lam, bad.outer_data)

    assert np.all(np.isnan(np.asarray(jax.grad(f)(bad.hparams))))
    params = reference_solution(problem)
    _, hgrad, info = _approximate(bad, params, adjoint, solver, has_aux=True)
    assert np.all(np.isnan(np.asarray(hgrad)))
    assert info.result == bx.RESULTS.nonfinite
