"""jaxopt's implicit differentiation as an oracle for bilevax's.

The same w*, the same problem, and either tight CG or a dense LU solve on both sides: the
hypergradients must agree to ~1e-8 relative in float64. jaxopt is a test-only dependency.
"""

import functools

import jax
import jax.numpy as jnp
import lineax as lx
import pytest
from helpers import logistic, relerr, ridge

import bilevax as bx


jaxopt = pytest.importorskip("jaxopt")
from jaxopt.implicit_diff import custom_root  # noqa: E402
from jaxopt.linear_solve import solve_cg, solve_lu  # noqa: E402


PROBLEMS = [ridge, logistic]
# (bilevax linear solver, jaxopt `solve`): tight CG, or a dense LU on both sides.
SOLVERS = {
    "cg": (lx.CG(rtol=1e-13, atol=1e-13), functools.partial(solve_cg, tol=1e-14, maxiter=500)),
    "lu": (lx.LU(), solve_lu),
}


def _newton(problem, init, hparams, data):
    """w* by 30 full Newton steps with a dense Hessian (the problems are tiny and convex)."""
    grad = jax.grad(problem.inner)
    hessian = jax.hessian(problem.inner)
    step = lambda _, w: w - jnp.linalg.solve(hessian(w, hparams, data), grad(w, hparams, data))
    return jax.lax.fori_loop(0, 30, step, init)


@functools.cache
def _problem(make):
    problem = make()
    w_star = jax.jit(functools.partial(_newton, problem))(
        problem.init, problem.hparams, problem.inner_data
    )
    return problem, w_star


@functools.cache
def _reference(make):
    """The closed form where there is one (ridge), else a dense solve at the Newton w*."""
    problem, w_star = _problem(make)
    if problem.exact_hypergrad is not None:
        return problem.exact_hypergrad(problem.hparams)
    L = lambda w, h: problem.inner(w, h, problem.inner_data)
    E = lambda w, h: problem.outer(w, h, problem.outer_data)

    @jax.jit
    def reference(w, h):
        v = jnp.linalg.solve(jax.hessian(L)(w, h), jax.grad(E)(w, h))
        mixed = jax.grad(lambda h: jnp.vdot(jax.grad(L)(w, h), v))(h)
        return jax.grad(E, argnums=1)(w, h) - mixed

    return reference(w_star, problem.hparams)


def _jaxopt_solver(problem, solve):
    """`custom_root` around a solver that returns a given w*: jaxopt's implicit derivative at
    exactly the point bilevax is given."""

    @custom_root(jax.grad(problem.inner), solve=solve)
    def solver(init, hparams, data):
        del hparams, data
        return jax.lax.stop_gradient(init)

    return solver


@functools.cache
def _jaxopt_hypergrad(make, solver_name):
    problem, w_star = _problem(make)
    solver = _jaxopt_solver(problem, SOLVERS[solver_name][1])

    def objective(hparams):
        w = solver(w_star, hparams, problem.inner_data)
        return problem.outer(w, hparams, problem.outer_data)

    return jax.jit(jax.value_and_grad(objective))(problem.hparams)


@pytest.mark.parametrize("make", PROBLEMS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("solver", SOLVERS, ids=str)
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_implicit_hypergrad_matches_jaxopt(make, solver, mode):
    problem, w_star = _problem(make)
    linear_solver, _ = SOLVERS[solver]
    value, hgrad = jax.jit(
        functools.partial(
            bx.implicit_hypergrad,
            problem.outer,
            problem.inner,
            linear_solver=linear_solver,
            mode=mode,
        )
    )(w_star, problem.hparams, problem.inner_data, problem.outer_data)
    # jaxopt's `custom_root` is reverse mode only (a `custom_vjp`): it is the oracle for both.
    value_jo, hgrad_jo = _jaxopt_hypergrad(make, solver)
    assert hgrad.dtype == jnp.float64
    assert jnp.shape(hgrad) == jnp.shape(problem.hparams)
    assert abs(float(value) - float(value_jo)) <= 1e-12 * max(1.0, abs(float(value_jo)))
    assert relerr(hgrad, hgrad_jo) < 1e-8
    # Both against the dense reference of the helpers (closed form for ridge).
    reference = _reference(make)
    assert relerr(hgrad, reference) < 1e-8
    assert relerr(hgrad_jo, reference) < 1e-8


@pytest.mark.parametrize("make", PROBLEMS, ids=lambda m: m.__name__)
def test_grad_through_inner_solve_matches_jaxopt(make):
    """`jax.grad` through `bx.inner_solve(adjoint=ImplicitAdjoint())` against `jax.grad`
    through a jaxopt solver wrapped in `custom_root`, each finding w* on its own."""
    problem, _ = _problem(make)
    cg = lx.CG(rtol=1e-13, atol=1e-13)

    def bilevax_objective(hparams):
        sol = bx.inner_solve(
            problem.inner,
            problem.init,
            hparams,
            problem.inner_data,
            # Gradient descent, not a line-search method: near w* the loss stops resolving
            # decreases (∆L ~ ‖∇L‖² is below float64 resolution) long before ‖∇L‖ ~ 1e-12.
            solver=bx.GradientDescent(problem.learning_rate),
            max_steps=5000,
            tol=1e-12,
            adjoint=bx.ImplicitAdjoint(linear_solver=cg),
        )
        return problem.outer(sol.params, hparams, problem.outer_data), sol.stats["grad_norm"]

    newton = functools.partial(_newton, problem)
    solver = custom_root(jax.grad(problem.inner), solve=SOLVERS["cg"][1])(newton)

    def jaxopt_objective(hparams):
        w = solver(problem.init, hparams, problem.inner_data)
        return problem.outer(w, hparams, problem.outer_data)

    (value, grad_norm), hgrad = jax.jit(jax.value_and_grad(bilevax_objective, has_aux=True))(
        problem.hparams
    )
    value_jo, hgrad_jo = jax.jit(jax.value_and_grad(jaxopt_objective))(problem.hparams)
    assert float(grad_norm) <= 1e-12
    assert abs(float(value) - float(value_jo)) <= 1e-10 * max(1.0, abs(float(value_jo)))
    assert relerr(hgrad, hgrad_jo) < 1e-8
