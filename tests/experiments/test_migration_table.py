"""Every row of the "Idiom by idiom" table of docs/coming-from-jaxopt.md, run on both sides.

Each row's jaxopt form and its bilevax form run on the same small float64 problem and must
agree: prox and projection outputs, and the iterates of solvers said to take the same steps,
to 1e-12; implicit and unrolled hypergradients, VJPs and JVPs to 1e-8 relative. Where a row's
jaxopt side would use jaxopt's default linear solver (`solve_normal_cg` at jax.scipy's
`tol=1e-5`), it is given the same solver at a tight tolerance instead.
`test_every_table_row_is_tested` ties the tests to the table's first column, so a row cannot
be added to or changed on the page without a test here.

jaxopt runs under JAX's default dtype promotion, as its users run it; bilevax under the
suite's strict promotion (optax's projections need the standard one too).
"""

import functools
import operator
import pathlib
import re

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import optimistix as optx
import pytest
from jax.flatten_util import ravel_pytree

import bilevax as bx


jax.config.update("jax_enable_x64", True)
jaxopt = pytest.importorskip("jaxopt")
from jaxopt import implicit_diff as jid, linear_solve, projection as jproj, prox as jprox  # noqa: E402


PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "coming-from-jaxopt.md"
TIGHT = 1e-12
# jaxopt's default implicit-diff solver, at a tolerance that makes it comparable to bilevax's.
NORMAL_CG = functools.partial(linear_solve.solve_normal_cg, tol=TIGHT)
# The programs here are tiny and run once: XLA's backend optimisations would take about half
# of each compilation, most of this file's time, and save nothing.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def relerr(a, b) -> float:
    a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.linalg.norm(a - b) / max(float(jnp.linalg.norm(b)), 1e-300))


def assert_exact(ours, theirs):
    """Closed-form operators and identical iterations: equal to rounding."""
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def assert_close(ours, theirs, rtol=1e-8):
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    error = relerr(ours, theirs)
    assert error <= rtol, error


def standard():
    return jax.numpy_dtype_promotion("standard")


def both(theirs, ours, *, standard_ours=False):
    """`(theirs(), ours())`, compiled as one program: jaxopt's side under standard dtype
    promotion, bilevax's under the suite's strict one (or standard, for optax)."""

    def run():
        with standard():
            expected = theirs()
        if standard_ours:
            with standard():
                return expected, ours()
        return expected, ours()

    return jax.jit(run).lower().compile(COMPILER_OPTIONS)()


# --- A ridge problem, for the rows about implicit differentiation -----------------------------

_rng = np.random.default_rng(0)
N, D = 40, 5
X = jnp.asarray(_rng.normal(size=(N, D)))
Y = X @ jnp.asarray(_rng.normal(size=D)) + 0.3 * jnp.asarray(_rng.normal(size=N))
XV = jnp.asarray(_rng.normal(size=(30, D)))
YV = XV @ jnp.asarray(_rng.normal(size=D))
LAM = jnp.asarray(-1.0)
W0 = jnp.zeros(D)
# A fixed non-symmetric invertible matrix: `M ∇L` has the zeros of `∇L` and a non-symmetric
# Jacobian, so that the rows about general linear solvers are about general systems.
M = jnp.eye(D) + 0.3 * jnp.asarray(_rng.normal(size=(D, D)))


def loss(w, lam, X, Y):
    """Ridge regression of strength exp(lam)."""
    return 0.5 * jnp.mean((X @ w - Y) ** 2) + 0.5 * jnp.exp(lam) * jnp.sum(w**2)


def solver(init, lam, X, Y):
    """The routine being wrapped: the closed form of `loss`'s minimiser."""
    del init
    A = X.T @ X / X.shape[0] + jnp.exp(lam) * jnp.eye(X.shape[1])
    return jnp.linalg.solve(A, X.T @ Y / X.shape[0])


optimality = jax.grad(loss)


def general_optimality(w, lam, X, Y):
    return M @ optimality(w, lam, X, Y)


def validation(w):
    return 0.5 * jnp.mean((XV @ w - YV) ** 2)


def hypergrad(wrapped):
    """d validation(wrapped(W0, lam, X, Y)) / d(lam, X); `X` and `Y` are passed by keyword,
    which both libraries bind through the solver's signature."""
    objective = lambda lam, X: validation(wrapped(W0, lam, X=X, Y=Y))
    return jax.grad(objective, argnums=(0, 1))(LAM, X)


def compare_hypergrads(theirs, ours, rtol=1e-8):
    """`theirs` a jaxopt decorator, `ours` a function wrapping `solver`."""
    expected, grads = both(lambda: hypergrad(theirs(solver)), lambda: hypergrad(ours(solver)))
    assert_close(grads, expected, rtol)
    return expected


# --- The rows ---------------------------------------------------------------------------------

ROWS = {}  # test id -> (the row's first cell on the page, the check, whether it is slow)
EXTRAS = {}  # test id -> the row's further forms (alternative solvers), run with the slow tests


def row(test_id, first_cell, *, slow=False):
    def register(check):
        ROWS[test_id] = (first_cell, check, slow)
        return check

    return register


def extra(test_id):
    def register(check):
        assert test_id in ROWS
        EXTRAS[test_id] = check
        return check

    return register


@row("custom_root", "`@custom_root(optimality_fun)` on `solver(init, *args)`")
def _():
    compare_hypergrads(
        jid.custom_root(general_optimality, solve=NORMAL_CG),
        lambda solver: bx.implicit_diff(solver, general_optimality),
    )


@row("custom_root(jax.grad(loss))", "`@custom_root(jax.grad(loss))`, a minimiser")
def _():
    compare_hypergrads(
        jid.custom_root(optimality, solve=NORMAL_CG),
        lambda solver: bx.implicit_diff(solver, optimality, symmetric=True),
    )


def fixed_point(w, lam, X, Y):
    return w - 0.5 * optimality(w, lam, X, Y)


@row("custom_fixed_point", "`@custom_fixed_point(T)`")
def _():
    compare_hypergrads(
        jid.custom_fixed_point(fixed_point, solve=NORMAL_CG),
        lambda solver: bx.implicit_diff(solver, fixed_point_fn=fixed_point),
    )


def solver_with_aux(init, lam, X, Y):
    w = solver(init, lam, X, Y)
    return w, {"loss": loss(w, lam, X, Y)}


@row("has_aux", "`has_aux=True`")
def _():
    def grad_and_aux(wrapped):
        def objective(lam, X):
            w, aux = wrapped(W0, lam, X, Y)
            return validation(w), aux

        return jax.grad(objective, argnums=(0, 1), has_aux=True)(LAM, X)

    (expected, expected_aux), (grads, aux) = both(
        lambda: grad_and_aux(
            jid.custom_root(optimality, has_aux=True, solve=NORMAL_CG)(solver_with_aux)
        ),
        lambda: grad_and_aux(bx.implicit_diff(solver_with_aux, optimality, has_aux=True)),
    )
    assert_close(grads, expected)
    assert_exact(aux, expected_aux)


def linear_solver_row(jaxopt_solve, linear_solver, *, symmetric, rtol=1e-8):
    optimality_fn = optimality if symmetric else general_optimality
    return compare_hypergrads(
        jid.custom_root(optimality_fn, solve=jaxopt_solve),
        lambda solver: bx.implicit_diff(
            solver, optimality_fn, symmetric=symmetric, linear_solver=linear_solver
        ),
        rtol,
    )


SOLVE_CG = functools.partial(linear_solve.solve_cg, tol=TIGHT, atol=0.0)


@row("solve_cg", "`solve=partial(linear_solve.solve_cg, tol=rtol, atol=atol)`")
def _():
    linear_solver_row(SOLVE_CG, bx.CG(TIGHT, 0.0), symmetric=True)


@extra("solve_cg")
def _():
    linear_solver_row(SOLVE_CG, lx.CG(TIGHT, TIGHT), symmetric=True)


@row(
    "solve_normal_cg",
    "`solve=partial(linear_solve.solve_normal_cg, tol=rtol, atol=atol)`, the default",
)
def _():
    # `custom_root` above compares the two defaults; here the solvers named explicitly.
    linear_solver_row(NORMAL_CG, bx.CG(TIGHT, 0.0), symmetric=False)


@extra("solve_normal_cg")
def _():
    linear_solver_row(NORMAL_CG, lx.CG(TIGHT, TIGHT), symmetric=False)


@row(
    "solve_gmres/solve_bicgstab",
    "`solve=partial(linear_solve.solve_gmres, tol=rtol, atol=atol)` / `solve_bicgstab`",
)
def _():
    solve = functools.partial(linear_solve.solve_gmres, tol=TIGHT)
    linear_solver_row(solve, lx.GMRES(TIGHT, TIGHT), symmetric=False)


@extra("solve_gmres/solve_bicgstab")
def _():
    solve = functools.partial(linear_solve.solve_bicgstab, tol=TIGHT)
    linear_solver_row(solve, lx.BiCGStab(TIGHT, TIGHT), symmetric=False)


@row("solve_lu/solve_cholesky", "`solve=linear_solve.solve_lu` / `solve_cholesky`")
def _():
    linear_solver_row(linear_solve.solve_lu, lx.LU(), symmetric=False)
    # jaxopt's Cholesky needs a symmetric positive definite Jacobian: a minimiser's.
    linear_solver_row(linear_solve.solve_cholesky, lx.Cholesky(), symmetric=True)


@extra("solve_lu/solve_cholesky")
def _():
    # Without `symmetric=True`, bilevax's Cholesky runs on the normal equations.
    compare_hypergrads(
        jid.custom_root(optimality, solve=linear_solve.solve_cholesky),
        lambda solver: bx.implicit_diff(solver, general_optimality, linear_solver=lx.Cholesky()),
    )


def neumann_solve(matvec, b, steps=10, scale=0.5):
    """A hand-written truncated Neumann series, `scale * sum_{k=0}^{steps} (I - scale A)^k b`,
    as a jaxopt `solve`."""
    term, total = b, b
    for _ in range(steps):
        term = jax.tree.map(lambda t, at: t - scale * at, term, matvec(term))
        total = jax.tree.map(jnp.add, total, term)
    return jax.tree.map(lambda t: scale * t, total)


@row("Neumann (hand-written)", "`solve=` a hand-written truncated Neumann series")
def _():
    # The Hessian's eigenvalues lie in (0.8, 1.8): the series converges at scale 0.5, and ten
    # terms leave an error far above 1e-8, so the two are compared as truncated series.
    expected = linear_solver_row(neumann_solve, bx.Neumann(10, 0.5), symmetric=True, rtol=1e-12)
    exact = jax.jit(jax.grad(lambda lam, X: validation(solver(W0, lam, X, Y)), argnums=(0, 1)))(
        LAM, X
    )
    assert relerr(expected, exact) > 1e-6


# `wrapped` of the root_vjp and root_jvp rows: the solution itself is the "solver".
WRAPPED = bx.implicit_diff(lambda init, *args: init, general_optimality)
SOLUTION = solver(W0, LAM, X, Y)
ARGS = (LAM, X, Y)


@row("root_vjp", "`root_vjp(optimality_fun, sol, args, cotangent)`")
def _():
    cotangent = jnp.asarray(np.random.default_rng(2).normal(size=D))

    def ours():
        _, vjp = jax.vjp(lambda *args: WRAPPED(SOLUTION, *args), *ARGS)
        return vjp(cotangent)

    expected, vjp = both(
        lambda: jid.root_vjp(general_optimality, SOLUTION, ARGS, cotangent, solve=NORMAL_CG), ours
    )
    assert_close(vjp, expected)


@row("root_jvp", "`root_jvp(optimality_fun, sol, args, tangents)`")
def _():
    rng = np.random.default_rng(3)
    tangents = (jnp.asarray(0.7), jnp.asarray(rng.normal(size=(N, D))), jnp.zeros(N))
    expected, jvp = both(
        lambda: jid.root_jvp(general_optimality, SOLUTION, ARGS, tangents, solve=NORMAL_CG),
        lambda: jax.jvp(lambda *args: WRAPPED(SOLUTION, *args), ARGS, tangents)[1],
    )
    assert_close(jvp, expected)


# --- The rows about solvers: a ridge problem `fun(w, hparams, data)` --------------------------

DATA, VAL = (X, Y), (XV, YV)
STEP = 1.0 / (float(jnp.linalg.eigvalsh(X.T @ X / N).max()) + 1.0)


def ridge(w, lam, data):
    return loss(w, lam, *data)


def mse(w, data):
    X, Y = data
    return 0.5 * jnp.mean((X @ w - Y) ** 2)


def solution_and_hypergrad(run, hparams, val=VAL):
    """`run(hparams) -> params`: the params, and d mse(params, val) / d hparams."""

    def objective(hparams):
        params = run(hparams)
        return mse(params, val), params

    grad, params = jax.grad(objective, has_aux=True)(hparams)
    return {"params": params, "hypergrad": grad}


def bilevax_run(inner_loss, init, data, **kwargs):
    return lambda h: bx.inner_solve(inner_loss, init, h, data, **kwargs).params


def jaxopt_run(solver, init, data):
    return lambda h: solver.run(init, h, data).params


@row(
    "GradientDescent",
    "`GradientDescent(fun, stepsize=lr, acceleration=False).run(init, hparams, data)`",
)
def _():
    def theirs():
        solver = functools.partial(jaxopt.GradientDescent, ridge, stepsize=STEP)
        converged = solver(
            acceleration=False, maxiter=5000, tol=1e-12, implicit_diff_solve=NORMAL_CG
        )
        return {
            "20 steps": solver(acceleration=False, maxiter=20, tol=0.0).run(W0, LAM, DATA).params,
            "20 accelerated steps": solver(maxiter=20, tol=0.0).run(W0, LAM, DATA).params,
            "converged": solution_and_hypergrad(jaxopt_run(converged, W0, DATA), LAM),
        }

    def ours():
        solve = functools.partial(bx.inner_solve, ridge, W0, LAM, DATA, tol=0.0, max_steps=20)
        accelerated = bx.ProximalGradient(STEP)
        solver = bx.GradientDescent(STEP)
        return {
            "20 steps": solve(solver=solver).params,
            "20 accelerated steps": solve(solver=accelerated).params,
            "converged": solution_and_hypergrad(
                bilevax_run(ridge, W0, DATA, solver=solver, tol=1e-12, max_steps=5000), LAM
            ),
        }

    expected, outputs = both(theirs, ours)
    assert_exact(outputs["20 steps"], expected["20 steps"])
    assert_exact(outputs["20 accelerated steps"], expected["20 accelerated steps"])
    assert_close(outputs["converged"], expected["converged"])


def logistic(w, lam, data):
    """L2-regularised logistic regression on the labels `Y > 0`, strength exp(lam)."""
    X, Y = data
    z = X @ w
    labels = (Y > 0).astype(z.dtype)
    return jnp.mean(jnp.logaddexp(0.0, z) - labels * z) + 0.5 * jnp.exp(lam) * jnp.sum(w**2)


@row("LBFGS/BFGS/NonlinearCG", "`LBFGS(fun, ...)`, `BFGS`, `NonlinearCG`", slow=True)
def _():
    # optimistix's line searches compare loss values, so they stall where the decrease falls
    # below float64 rounding: at a gradient norm of 1e-9 to 1e-8 on this problem, whatever
    # their `rtol` and `atol`. bilevax stops at 1e-8, jaxopt (whose zoom line search tests
    # gradients) at 1e-11, so the two agree to about 1e-7 rather than 1e-8.
    pairs = [
        (jaxopt.LBFGS, optx.LBFGS),
        (jaxopt.BFGS, optx.BFGS),
        (jaxopt.NonlinearCG, optx.NonlinearCG),
    ]
    for theirs, ours in pairs:
        theirs = theirs(logistic, maxiter=1000, tol=1e-11, implicit_diff_solve=NORMAL_CG)
        ours = ours(rtol=1e-8, atol=1e-8)
        expected, outputs = both(
            lambda: solution_and_hypergrad(jaxopt_run(theirs, W0, DATA), LAM),
            lambda: solution_and_hypergrad(
                bilevax_run(logistic, W0, DATA, solver=ours, tol=1e-8, max_steps=1000), LAM
            ),
        )
        assert_close(outputs, expected, rtol=1e-6)


@row("OptaxSolver", "`OptaxSolver(fun, opt=optax.adam(1e-3), implicit_diff=True)`")
def _():
    # 300 Adam steps: the same iterate, and the same implicit hypergradient there (both
    # apply the implicit function theorem at the point they reach).
    theirs = jaxopt.OptaxSolver(
        ridge, opt=optax.adam(1e-2), maxiter=300, tol=0.0, implicit_diff=True,
        implicit_diff_solve=NORMAL_CG,
    )  # fmt: skip
    run = bilevax_run(ridge, W0, DATA, solver=optax.adam(1e-2), tol=0.0, max_steps=300)
    expected, outputs = both(
        lambda: solution_and_hypergrad(jaxopt_run(theirs, W0, DATA), LAM),
        lambda: solution_and_hypergrad(run, LAM),
        standard_ours=True,  # optax's Adam mixes int and float
    )
    assert_exact(outputs["params"], expected["params"])
    assert_close(outputs["hypergrad"], expected["hypergrad"])


@row("implicit_diff=False", "`implicit_diff=False` (unrolling)")
def _():
    theirs = jaxopt.GradientDescent(
        ridge, stepsize=STEP, acceleration=False, maxiter=30, tol=0.0, implicit_diff=False
    )

    def ours():
        solver = bx.GradientDescent(STEP)
        adjoint = bx.UnrolledAdjoint()
        run = bilevax_run(ridge, W0, DATA, solver=solver, max_steps=30, adjoint=adjoint)
        outer = lambda w, lam, data: mse(w, data)
        _, grad = bx.unrolled_hypergrad(
            outer, ridge, W0, LAM, DATA, VAL, solver=solver, num_steps=30
        )
        return solution_and_hypergrad(run, LAM)["hypergrad"], grad

    expected, (inner_solve_grad, unrolled_grad) = both(
        lambda: solution_and_hypergrad(jaxopt_run(theirs, W0, DATA), LAM)["hypergrad"], ours
    )
    assert_close(inner_solve_grad, expected, rtol=1e-12)
    assert_close(unrolled_grad, expected, rtol=1e-12)


# A lasso, and a least-squares problem in a box, for the composite solvers.
_rng8 = np.random.default_rng(1)
X8 = jnp.asarray(_rng8.normal(size=(80, 8)))
W8 = jnp.asarray([1.5, -2.0, 0.0, 0.0, 0.8, 0.0, 0.0, 0.0])
DATA8 = (X8[:50], X8[:50] @ W8 + 0.3 * jnp.asarray(_rng8.normal(size=50)))
VAL8 = (X8[50:], X8[50:] @ W8)
STEP8 = 1.0 / float(jnp.linalg.eigvalsh(DATA8[0].T @ DATA8[0] / 50).max())
INIT8 = jnp.zeros(8)


def composite_row(jaxopt_solve, bilevax_solve, hparams):
    """`*_solve(acceleration, max_steps, tol) -> run`: 25 steps with and without acceleration
    are the same; so are the solution and the hypergradient at convergence."""

    def outputs(solve):
        return lambda: {
            "25 steps": solve(True, 25, 0.0)(hparams),
            "25 unaccelerated steps": solve(False, 25, 0.0)(hparams),
            "converged": solution_and_hypergrad(solve(True, 20_000, 1e-12), hparams, VAL8),
        }

    expected, ours = both(outputs(jaxopt_solve), outputs(bilevax_solve))
    assert_exact(ours["25 steps"], expected["25 steps"])
    assert_exact(ours["25 unaccelerated steps"], expected["25 unaccelerated steps"])
    assert_close(ours["converged"], expected["converged"])
    assert float(jnp.linalg.norm(ravel_pytree(expected["converged"]["hypergrad"])[0])) > 1e-3


@row(
    "ProximalGradient",
    "`ProximalGradient(fun, prox, stepsize=stepsize).run(init, hyperparams_prox, data)`",
)
def _():
    def jaxopt_solve(acceleration, maxiter, tol):
        solver = jaxopt.ProximalGradient(
            mse, jprox.prox_lasso, stepsize=STEP8, acceleration=acceleration, maxiter=maxiter,
            tol=tol, implicit_diff_solve=NORMAL_CG,
        )  # fmt: skip
        return jaxopt_run(solver, INIT8, DATA8)

    def bilevax_solve(acceleration, max_steps, tol):
        solver = bx.ProximalGradient(STEP8, bx.prox_lasso, acceleration=acceleration)
        fun = lambda w, hparams, data: mse(w, data)
        return bilevax_run(fun, INIT8, DATA8, solver=solver, max_steps=max_steps, tol=tol)

    composite_row(jaxopt_solve, bilevax_solve, jnp.asarray(0.15))


@row(
    "ProjectedGradient",
    "`ProjectedGradient(fun, projection, stepsize=stepsize).run(init, hyperparams_proj, data)`",
)
def _():
    # Least squares in a box whose bounds are the hyperparameters; some bounds are active.
    def jaxopt_solve(acceleration, maxiter, tol):
        solver = jaxopt.ProjectedGradient(
            mse, jproj.projection_box, stepsize=STEP8, acceleration=acceleration,
            maxiter=maxiter, tol=tol, implicit_diff_solve=NORMAL_CG,
        )  # fmt: skip
        return jaxopt_run(solver, INIT8, DATA8)

    def bilevax_solve(acceleration, max_steps, tol):
        projection = lambda w, box: optax.projections.projection_box(w, *box)
        solver = bx.ProjectedGradient(STEP8, projection, acceleration=acceleration)
        fun = lambda w, hparams, data: mse(w, data)
        return bilevax_run(fun, INIT8, DATA8, solver=solver, max_steps=max_steps, tol=tol)

    composite_row(jaxopt_solve, bilevax_solve, (jnp.full(8, -0.5), jnp.full(8, 0.6)))


@row("implicit_diff_solve", "`implicit_diff_solve=...` on a solver")
def _():
    theirs = jaxopt.GradientDescent(
        ridge, stepsize=STEP, acceleration=False, maxiter=5000, tol=1e-12,
        implicit_diff_solve=linear_solve.solve_lu,
    )  # fmt: skip
    adjoint = bx.ImplicitAdjoint(linear_solver=lx.LU())
    solver = bx.GradientDescent(STEP)
    run = bilevax_run(ridge, W0, DATA, solver=solver, tol=1e-12, max_steps=5000, adjoint=adjoint)
    expected, outputs = both(
        lambda: solution_and_hypergrad(jaxopt_run(theirs, W0, DATA), LAM),
        lambda: solution_and_hypergrad(run, LAM),
    )
    assert_close(outputs, expected)


# --- Proximal operators and projections ------------------------------------------------------

XS = jnp.asarray(_rng.normal(size=7))
TREE = {"a": jnp.asarray(_rng.normal(size=4)), "b": jnp.asarray(_rng.normal(size=(2, 3)))}
SCALING = 0.7


def per_entry(tree, low, high, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.uniform(low, high, size=x.shape)), tree)


@row("prox_lasso", "`jaxopt.prox.prox_lasso(x, l1reg, scaling)`")
def _():
    cases = [(x, l1reg) for x in (XS, TREE) for l1reg in (0.4, per_entry(x, 0.0, 1.0, 1))]
    expected, ours = both(
        lambda: [jprox.prox_lasso(x, l1reg, SCALING) for x, l1reg in cases],
        lambda: [bx.prox_lasso(x, l1reg, SCALING) for x, l1reg in cases],
    )
    assert_exact(ours, expected)


@row("prox_elastic_net", "`jaxopt.prox.prox_elastic_net(x, (l1reg, l2reg), scaling)`")
def _():
    cases = [(x, 0.3, 2.0) for x in (XS, TREE)]
    cases += [(x, per_entry(x, 0, 1, 2), per_entry(x, 0, 3, 3)) for x in (XS, TREE)]
    expected, (ours, unchanged) = both(
        lambda: [jprox.prox_elastic_net(x, (l1, l2), SCALING) for x, l1, l2 in cases],
        lambda: (
            [
                bx.prox_elastic_net(x, (l1, jax.tree.map(operator.mul, l1, l2)), SCALING)
                for x, l1, l2 in cases
            ],
            [bx.prox_elastic_net(x, (l1, l2), SCALING) for x, l1, l2 in cases],
        ),
    )
    assert_exact(ours, expected)
    # The pair passed through unchanged is another penalty.
    assert all(relerr(a, b) > 1e-2 for a, b in zip(unchanged, expected))


@row("prox_group_lasso", "`jaxopt.prox.prox_group_lasso(x, l2reg, scaling)`")
def _():
    flat, unravel = ravel_pytree(TREE)
    l2regs = (0.5, 3.0)  # a group shrunk, and a group set to zero
    expected, ours = both(
        lambda: [
            {
                "array": jprox.prox_group_lasso(XS, l2reg, SCALING),
                "pytree": jprox.prox_group_lasso(TREE, l2reg, SCALING),
                "per leaf": jax.tree.map(lambda x: jprox.prox_group_lasso(x, l2reg, SCALING), TREE),
            }
            for l2reg in l2regs
        ],
        lambda: [
            {
                "array": bx.prox_group_lasso(XS, l2reg, SCALING),
                # jaxopt's one group is the whole pytree, bilevax's groups are its leaves.
                "pytree": unravel(bx.prox_group_lasso(flat, l2reg, SCALING)),
                "per leaf": bx.prox_group_lasso(TREE, l2reg, SCALING),
            }
            for l2reg in l2regs
        ],
    )
    assert_exact(ours, expected)


@row("prox_none", "`jaxopt.prox.prox_none`")
def _():
    def theirs():
        fun = lambda w, data: ridge(w, LAM, data)
        solver = functools.partial(
            jaxopt.ProximalGradient, fun, jprox.prox_none, stepsize=STEP, maxiter=20, tol=0.0
        )
        return [solver(acceleration=a).run(W0, None, DATA).params for a in (False, True)]

    def ours():
        fun = lambda w, hparams, data: ridge(w, LAM, data)
        solvers = [bx.GradientDescent(STEP), bx.ProximalGradient(STEP)]
        return [
            bx.inner_solve(fun, W0, None, DATA, solver=s, max_steps=20, tol=0.0).params
            for s in solvers
        ]

    expected, outputs = both(theirs, ours)
    assert_exact(outputs, expected)


P = optax.projections
V = jnp.asarray(_rng.normal(size=6)) * 2


def compare_projections(pairs):
    """`pairs` of `(jaxopt_call, optax_call)`; optax's projections need standard promotion."""
    expected, ours = both(
        lambda: [theirs() for theirs, _ in pairs],
        lambda: [ours() for _, ours in pairs],
        standard_ours=True,
    )
    assert_exact(ours, expected)


@row("projection_non_negative", "`jaxopt.projection.projection_non_negative(x)`")
def _():
    compare_projections(
        [
            (lambda x=x: jproj.projection_non_negative(x), lambda x=x: P.projection_non_negative(x))
            for x in (V, TREE)
        ]
    )


@row("projection_box", "`jaxopt.projection.projection_box(x, (lower, upper))`")
def _():
    # jaxopt takes scalar bounds for an array only; bounds like `x` for any pytree.
    cases = [(V, -0.5, 0.8)] + [
        (x, per_entry(x, -1, 0, 4), per_entry(x, 0, 1, 5)) for x in (V, TREE)
    ]
    compare_projections(
        [
            (lambda c=c: jproj.projection_box(c[0], c[1:]), lambda c=c: P.projection_box(*c))
            for c in cases
        ]
    )


@row("projection_simplex", "`jaxopt.projection.projection_simplex(x, value)`")
def _():
    compare_projections(
        [
            (lambda v=v: jproj.projection_simplex(V, v), lambda v=v: P.projection_simplex(V, v))
            for v in (1.0, 2.5)
        ]
    )


@row(
    "projection_l2_ball/projection_l1_ball",
    "`jaxopt.projection.projection_l2_ball(x, max_value)` / `projection_l1_ball`",
)
def _():
    compare_projections(
        [
            (lambda r=r, n=name: getattr(jproj, n)(V, r), lambda r=r, n=name: getattr(P, n)(V, r))
            for name in ("projection_l2_ball", "projection_l1_ball")
            for r in (0.5, 100.0)  # a projection, and a point already inside
        ]
    )


@row(
    "projection_hyperplane/projection_halfspace",
    "`projection_hyperplane(x, (a, b))` / `projection_halfspace(x, (a, b))`",
)
def _():
    a = jnp.asarray(_rng.normal(size=6))
    compare_projections(
        [
            (
                lambda b=b, n=name: getattr(jproj, n)(V, (a, b)),
                lambda b=b, n=name: getattr(P, n)(V, a, b),
            )
            for name in ("projection_hyperplane", "projection_halfspace")
            for b in (0.4, 100.0)  # outside the halfspace, and inside
        ]
    )


@row(
    "projection_linf_ball/hypercube/spheres",
    "`projection_linf_ball`, `projection_hypercube`, `projection_l1_sphere`, "
    "`projection_l2_sphere`",
)
def _():
    names = ["projection_linf_ball", "projection_hypercube"]
    names += ["projection_l1_sphere", "projection_l2_sphere"]
    compare_projections(
        [(lambda n=n: getattr(jproj, n)(V, 0.7), lambda n=n: getattr(P, n)(V, 0.7)) for n in names]
    )


# --- Constrained problems: KKT conditions and quadratic programs ---------------------------------


QP_WEIGHTS = [jnp.asarray(_rng.normal(size=k)) for k in (5, 2, 4)]


from jaxopt._src.base import KKTSolution  # noqa: E402 (not public)
from jaxopt._src.implicit_diff import make_kkt_optimality_fun  # noqa: E402 (not public)


def halfspace_projection(init, params_obj, params_eq, params_ineq):
    """Projection of `params_obj` onto aᵀx ≤ b, `params_ineq = (a, b)`, with its multiplier."""
    del init, params_eq
    a, b = params_ineq
    mu = jnp.maximum(a @ params_obj - b, 0.0) / (a @ a)
    return KKTSolution(params_obj - mu * a, None, mu)


@row("make_kkt_optimality_fun", "`make_kkt_optimality_fun(obj_fun, eq_fun, ineq_fun)`")
def _():
    obj_fun = lambda x, theta: 0.5 * jnp.sum((x - theta) ** 2)
    ineq_fun = lambda x, params_ineq: params_ineq[0] @ x - params_ineq[1]
    theta, a = jnp.asarray(_rng.normal(size=4)), jnp.asarray(_rng.normal(size=4))
    args = (theta, None, (a, jnp.asarray(-0.3)))

    def grads(wrapped):
        def objective(theta, a):
            x, _, mu = wrapped(None, theta, None, (a, args[2][1]))
            return jnp.vdot(QP_WEIGHTS[2], x) + mu

        return jax.grad(objective, argnums=(0, 1))(theta, a)

    expected, ours = both(
        lambda: grads(
            jid.custom_root(make_kkt_optimality_fun(obj_fun, None, ineq_fun), solve=NORMAL_CG)(
                halfspace_projection
            )
        ),
        lambda: grads(
            bx.implicit_diff(
                halfspace_projection,
                bx.kkt_optimality(
                    lambda x, po, pe, pi: obj_fun(x, po),
                    None,
                    lambda x, po, pe, pi: ineq_fun(x, pi),
                ),
            )
        ),
    )
    assert_close(ours, expected)


def qp_data(seed=7, n=5, m=2, p=4):
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(n, n))
    data = (M @ M.T + 0.1 * np.eye(n), rng.normal(size=n), rng.normal(size=(m, n)))
    data += (rng.normal(size=m), rng.normal(size=(p, n)), 0.1 * rng.normal(size=p))
    return tuple(jnp.asarray(x) for x in data)


QP = qp_data()
# ADMM on both sides: bilevax's stops at a relative 1e-12 here, jaxopt's at an absolute
# 1e-11 (its `tol`), so solutions and derivatives agree to about 1e-8, not to rounding.
QP_RTOL = 1e-7


def qp_grads(solve):
    """The solution, and the gradient of a fixed weighting of primal and duals with respect
    to every array of the program."""
    scalar = lambda *data: sum(
        jnp.vdot(w, v) for w, v in zip(QP_WEIGHTS, solve(*data)) if v is not None
    )
    return solve(*QP), jax.grad(scalar, argnums=tuple(range(len(QP))))(*QP)


def jaxopt_qp(solver_class, **kwargs):
    return solver_class(
        tol=1e-11,
        maxiter=100_000,
        implicit_diff_solve=functools.partial(linear_solve.solve_normal_cg, tol=TIGHT),
        **kwargs,
    )


def bilevax_qp(*data):
    sol = bx.solve_qp(*data, tol=1e-12, max_steps=100_000)
    return sol.primal, sol.dual_eq, sol.dual_ineq


@row(
    "OSQP",
    "`OSQP().run(params_obj=(Q, c), params_eq=(A, b), params_ineq=(G, h))`",
    slow=True,
)
def _():
    def theirs(Q, c, A, b, G, h):
        p = jaxopt_qp(jaxopt.OSQP).run(params_obj=(Q, c), params_eq=(A, b), params_ineq=(G, h))
        return tuple(p.params)

    expected, ours = both(lambda: qp_grads(theirs), lambda: qp_grads(bilevax_qp))
    assert_close(ours, expected, QP_RTOL)


@row("BoxOSQP", "`BoxOSQP().run(params_obj=(Q, c), params_eq=A, params_ineq=(l, u))`", slow=True)
def _():
    Q, c, _, _, A, u = QP
    lower = u - 1.0

    def theirs(Q, c, A, u):
        p = jaxopt_qp(jaxopt.BoxOSQP).run(params_obj=(Q, c), params_eq=A, params_ineq=(lower, u))
        return p.params.primal[0], p.params.dual_eq

    def ours(Q, c, A, u):
        p = bx.solve_qp(
            Q, c, None, None, jnp.concatenate([A, -A]), jnp.concatenate([u, -lower]), tol=1e-12
        )
        # BoxOSQP's one multiplier per row is μ_upper − μ_lower.
        return p.primal, p.dual_ineq[:4] - p.dual_ineq[4:]

    def grads(solve):
        scalar = lambda *data: sum(jnp.vdot(w, v) for w, v in zip(QP_WEIGHTS[::2], solve(*data)))
        return solve(Q, c, A, u), jax.grad(scalar, argnums=(0, 1, 2, 3))(Q, c, A, u)

    expected, result = both(lambda: grads(theirs), lambda: grads(ours))
    assert_close(result, expected, QP_RTOL)


@row(
    "EqualityConstrainedQP",
    "`EqualityConstrainedQP().run(params_obj=(Q, c), params_eq=(A, b))`",
    slow=True,
)
def _():
    def theirs(Q, c, A, b):
        p = jaxopt.EqualityConstrainedQP(tol=1e-12).run(params_obj=(Q, c), params_eq=(A, b))
        return p.params.primal, p.params.dual_eq

    def ours(Q, c, A, b):
        sol = bx.solve_qp(Q, c, A, b, tol=1e-12, max_steps=100_000)
        return sol.primal, sol.dual_eq

    def grads(solve):
        scalar = lambda *data: sum(jnp.vdot(w, v) for w, v in zip(QP_WEIGHTS, solve(*data)))
        return solve(*QP[:4]), jax.grad(scalar, argnums=(0, 1, 2, 3))(*QP[:4])

    expected, result = both(lambda: grads(theirs), lambda: grads(ours))
    assert_close(result, expected, QP_RTOL)


# --- The tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "check",
    [
        pytest.param(check, id=test_id, marks=[pytest.mark.slow] if slow else [])
        for test_id, (_, check, slow) in ROWS.items()
    ],
)
def test_row(check):
    check()


@pytest.mark.slow
@pytest.mark.parametrize("check", [pytest.param(c, id=i) for i, c in EXTRAS.items()])
def test_row_alternatives(check):
    check()


def _table_first_cells() -> list[str]:
    table = PAGE.read_text().split("| jaxopt | bilevax |\n|---|---|\n", 1)[1].split("\n\n")[0]
    cells = []
    for line in table.splitlines():
        match = re.fullmatch(r"\| (.*?) \| .* \|", line)
        assert match, line
        cells.append(match.group(1))
    return cells


def test_every_table_row_is_tested():
    """The page's table and the rows above: the same first cells, in the same order."""
    assert _table_first_cells() == [cell for cell, _, _ in ROWS.values()]
