import jax
import jax.numpy as jnp
import lineax as lx
import pytest
from helpers import (
    central_difference,
    directional,
    implicit,
    logistic,
    mlp,
    quadratic,
    random_direction,
    reference_hypergrad,
    reference_solution,
    relerr,
    ridge,
    solve,
)

import bilevax as bx


TIGHT_CG = lx.CG(rtol=1e-12, atol=1e-12)

LINEAR_SOLVERS = {
    "cg": TIGHT_CG,
    "gmres": lx.GMRES(rtol=1e-12, atol=1e-12),
    "bicgstab": lx.BiCGStab(rtol=1e-12, atol=1e-12),
    "lu": lx.LU(),
    "cholesky": lx.Cholesky(),
    "neumann": bx.Neumann(steps=4000, scale=0.5),
}


@pytest.mark.parametrize(
    "make_problem", [ridge, pytest.param(logistic, marks=pytest.mark.slow), quadratic]
)
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_implicit_hypergrad_matches_reference(make_problem, mode):
    problem = make_problem()
    w_star = reference_solution(problem)
    value, hgrad = implicit(
        problem,
        w_star,
        linear_solver=TIGHT_CG,
        mode=mode,
    )
    assert float(value) == pytest.approx(
        float(problem.outer(w_star, problem.hparams, problem.outer_data)), rel=1e-14
    )
    # ridge and quadratic: closed forms; logistic: dense Hessian and direct solve.
    assert relerr(hgrad, reference_hypergrad(problem)) < 1e-8


@pytest.mark.parametrize("name", list(LINEAR_SOLVERS))
def test_linear_solvers_agree_with_closed_form(name):
    problem = ridge()
    w_star = problem.exact_params(problem.hparams)
    _, hgrad = implicit(
        problem,
        w_star,
        linear_solver=LINEAR_SOLVERS[name],
    )
    assert relerr(hgrad, problem.exact_hypergrad(problem.hparams)) < 1e-8


def test_neumann_with_few_steps_is_the_truncated_series():
    # K Neumann terms invert each eigenvalue μ of H to (1 − (1 − αμ)^(K+1))/μ.
    A = jnp.diag(jnp.asarray([1.0, 0.5, 0.25]))
    b = jnp.ones(3)
    K, alpha = 5, 0.8
    x = lx.linear_solve(lx.MatrixLinearOperator(A), b, bx.Neumann(K, alpha)).value
    mu = jnp.diag(A)
    assert relerr(x, (1 - (1 - alpha * mu) ** (K + 1)) / mu) < 1e-14


def _solved_outer(problem, adjoint, solver, max_steps, tol):
    def E(hparams):
        sol = bx.inner_solve(
            problem.inner,
            problem.init,
            hparams,
            problem.inner_data,
            solver=solver,
            max_steps=max_steps,
            tol=tol,
            adjoint=adjoint,
        )
        return problem.outer(sol.params, hparams, problem.outer_data)

    return E


def _closed_form_outer(problem):
    return lambda h: problem.outer(problem.exact_params(h), h, problem.outer_data)


@pytest.mark.slow
@pytest.mark.parametrize("make_problem", [ridge, quadratic])
def test_grad_jvp_hessian_through_inner_solve(make_problem):
    problem = make_problem()
    E = _solved_outer(
        problem,
        bx.ImplicitAdjoint(TIGHT_CG),
        bx.GradientDescent(problem.learning_rate),
        200_000,
        1e-12,
    )
    E_exact = _closed_form_outer(problem)
    h = problem.hparams
    d = random_direction(h)
    # Each transformation compiled whole: far quicker than running it eagerly.
    grad, hessian, jacfwd = (jax.jit(f(E)) for f in (jax.grad, jax.hessian, jax.jacfwd))
    jvp = jax.jit(lambda h, d: jax.jvp(E, (h,), (d,))[1])
    assert relerr(grad(h), jax.grad(E_exact)(h)) < 1e-8
    assert relerr(jvp(h, d), jax.jvp(E_exact, (h,), (d,))[1]) < 1e-8
    assert relerr(jacfwd(h), jax.grad(E_exact)(h)) < 1e-8
    assert relerr(hessian(h), jax.hessian(E_exact)(h)) < 1e-7
    # Finite differences check the closed form itself, independently of JAX's derivatives.
    assert directional(grad(h), d) == pytest.approx(central_difference(E_exact, h, d), rel=1e-7)


def test_finite_differences_logistic():
    problem = logistic()
    # Jitted once each: the finite differences call them again at shifted points.
    E = jax.jit(
        _solved_outer(
            problem,
            bx.ImplicitAdjoint(TIGHT_CG),
            bx.GradientDescent(problem.learning_rate),
            100_000,
            1e-13,
        )
    )
    grad_E = jax.jit(jax.grad(E))
    h = problem.hparams
    d = jnp.ones_like(h)
    fd = central_difference(E, h, d, eps=1e-4)
    assert directional(grad_E(h), d) == pytest.approx(fd, rel=1e-6)
    second = central_difference(grad_E, h, d, eps=1e-4)
    assert float(jax.hessian(E)(h)) == pytest.approx(second, rel=1e-5)


@pytest.mark.slow
def test_mlp_hypergradient_against_dense_reference():
    # Non-convex inner problem: polish a local minimiser with Newton's method, then compare
    # with a dense-Hessian implicit hypergradient written in plain JAX.
    problem = mlp()
    start = solve(problem).params
    w_star = reference_solution(problem, start=start)
    reference = reference_hypergrad(problem, params_star=w_star)
    for linear_solver in (lx.GMRES(rtol=1e-12, atol=1e-12), lx.LU()):
        _, hgrad = implicit(
            problem,
            w_star,
            linear_solver=linear_solver,
        )
        assert relerr(hgrad, reference) < 1e-8


def test_derivative_with_respect_to_data_and_closed_over_arrays():
    problem = ridge()
    Xt, yt = problem.inner_data
    scale = jnp.asarray(1.3)

    def E(y_train, scale):
        # `inner` closes over `scale`, a traced array: it must be differentiated too.
        inner = lambda w, h, d: scale * problem.inner(w, h, d)
        sol = bx.inner_solve(
            inner,
            problem.init,
            problem.hparams,
            (Xt, y_train),
            solver=bx.GradientDescent(problem.learning_rate / 1.3),
            max_steps=100_000,
            tol=1e-12,
            adjoint=bx.ImplicitAdjoint(TIGHT_CG),
        )
        return problem.outer(sol.params, problem.hparams, problem.outer_data)

    def E_exact(y_train, scale):
        n = Xt.shape[0]
        A = Xt.T @ Xt / n + jnp.diag(jnp.exp(problem.hparams))
        w = jnp.linalg.solve(A, Xt.T @ y_train / n)
        return problem.outer(w, problem.hparams, problem.outer_data) + 0.0 * scale

    grads = jax.grad(E, argnums=(0, 1))(yt, scale)
    exact = jax.grad(E_exact, argnums=(0, 1))(yt, scale)
    assert relerr(grads[0], exact[0]) < 1e-8
    # The minimiser does not depend on a positive scale of the loss.
    assert abs(float(grads[1])) < 1e-10


def test_vmap_of_implicit_hypergrad_equals_loop():
    problem = ridge()
    hs = jnp.stack([problem.hparams - 0.5, problem.hparams, problem.hparams + 0.5])
    ws = jax.vmap(problem.exact_params)(hs)
    f = lambda w, h: bx.implicit_hypergrad(
        problem.outer,
        problem.inner,
        w,
        h,
        problem.inner_data,
        problem.outer_data,
        linear_solver=TIGHT_CG,
    )[1]
    batched = jax.vmap(f)(ws, hs)
    for i in range(3):
        assert relerr(batched[i], problem.exact_hypergrad(hs[i])) < 1e-8


@pytest.mark.parametrize("mode", ["reverse", pytest.param("forward", marks=pytest.mark.slow)])
def test_unconverged_linear_solve_raises_or_returns_its_approximation(mode):
    # A linear solve stopped early raises by default; with `throw=False` it returns its
    # iterate, close to but not at the answer (approximate is not failed).
    problem = logistic()
    w_star = reference_solution(problem)
    truncated = lx.CG(rtol=1e-14, atol=1e-14, max_steps=2)
    with pytest.raises(Exception, match="did not reach its tolerance"):
        jax.block_until_ready(implicit(problem, w_star, linear_solver=truncated, mode=mode))
    _, hgrad = implicit(problem, w_star, linear_solver=truncated, mode=mode, throw=False)
    error = relerr(hgrad, reference_hypergrad(problem))
    assert 1e-8 < error < 0.1


@pytest.mark.slow
def test_adjoint_tolerance_follows_the_inner_solve():
    # With the defaults, a Hessian through `inner_solve(tol=t)` is as accurate as `t` allows:
    # the adjoint's CG stops at the inner tolerance, not at a fixed 1e-6 (which left a
    # 5.8e-8 relative error here at t = 1e-11, against 2.3e-10 now). Diabetes ridge,
    # per-feature log-L2.
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    Xv, yv = jnp.asarray(X[300:]), jnp.asarray(y[300:] / 100.0)
    X, y = jnp.asarray(X[:300]), jnp.asarray(y[:300] / 100.0)
    n, d = X.shape
    inner = lambda w, lam, data: (
        0.5 * jnp.mean((data[0] @ w - data[1]) ** 2) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)
    )
    outer = lambda w, lam, data: 0.5 * jnp.mean((data[0] @ w - data[1]) ** 2)
    lam = jnp.full(d, jnp.log(1e-2))
    lipschitz = float(jnp.linalg.eigvalsh(X.T @ X / n).max()) + 1e-2

    def exact(lam):
        w = jnp.linalg.solve(X.T @ X / n + jnp.diag(jnp.exp(lam)), X.T @ y / n)
        return outer(w, lam, (Xv, yv))

    def through_solve(lam):
        sol = bx.inner_solve(
            inner,
            jnp.zeros(d),
            lam,
            (X, y),
            solver=bx.GradientDescent(1.0 / lipschitz, momentum=0.9),
            max_steps=200_000,
            tol=1e-11,
        )
        return outer(sol.params, lam, (Xv, yv))

    hessian = jax.jit(jax.hessian(through_solve))  # compiled whole: far quicker than eagerly
    assert relerr(hessian(lam), jax.hessian(exact)(lam)) < 1e-8
