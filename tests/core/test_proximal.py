"""Proximal and projected gradient inner solvers, and the implicit derivative of their fixed
point: against float64 finite differences, the closed forms on the active set (lasso, elastic
net), the unrolled derivative as T grows, and jaxopt's `ProximalGradient(implicit_diff=True)`.
"""

import functools

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import pytest
from helpers import relerr
from sklearn.datasets import load_diabetes

import bilevax as bx


LU = bx.ImplicitAdjoint(lx.LU())


@functools.cache
def diabetes():
    """Standardised diabetes data: 300 training and 142 validation examples, and 1/L."""
    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    train, val = (jnp.asarray(X[:300]), jnp.asarray(y[:300])), (X[300:], y[300:])
    lipschitz = float(np.linalg.eigvalsh(X[:300].T @ X[:300] / 300).max())
    return train, (jnp.asarray(val[0]), jnp.asarray(val[1])), 1 / lipschitz


def mse(w, hparams, data):
    X, y = data
    return 0.5 * jnp.mean((X @ w - y) ** 2)


def lasso_prox(w, log_l1, scaling):
    return bx.prox_lasso(w, jnp.exp(log_l1), scaling)


def enet_prox(w, log_reg, scaling):
    return bx.prox_elastic_net(w, (jnp.exp(log_reg[0]), jnp.exp(log_reg[1])), scaling)


def validation(prox, adjoint=LU, acceleration=True):
    train, val, step = diabetes()
    solver = bx.ProximalGradient(step, prox, acceleration=acceleration)

    def fn(hparams):
        sol = bx.inner_solve(
            mse,
            jnp.zeros(10),
            hparams,
            train,
            solver=solver,
            tol=1e-12,
            max_steps=20_000,
            adjoint=adjoint,
        )
        return mse(sol.params, hparams, val), sol

    return fn


def _fd(fn, x, direction, eps=1e-6):
    return float((fn(x + eps * direction) - fn(x - eps * direction)) / (2 * eps))


@pytest.fixture(scope="module")
def lasso():
    fn = jax.jit(validation(lasso_prox))
    log_l1 = jnp.asarray(np.log(0.05))
    (value, sol), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(log_l1)
    return fn, log_l1, value, sol, grad


def test_lasso_solution_and_stopping(lasso):
    _, log_l1, _, sol, _ = lasso
    train, _, _ = diabetes()
    w = np.asarray(sol.params)
    assert sol.result == bx.RESULTS.successful
    # The stopping test is the gradient mapping: at most `tol` although ∇f is not small.
    assert float(sol.stats["grad_norm"]) <= 1e-12
    assert float(jnp.linalg.norm(jax.grad(mse)(sol.params, None, train))) > 1e-2
    # Lasso KKT: ∇f_i = -λ sign(w_i) on the support, |∇f_i| <= λ off it.
    grad, lam = np.asarray(jax.grad(mse)(sol.params, None, train)), float(jnp.exp(log_l1))
    support = w != 0
    assert 2 <= support.sum() < 10
    np.testing.assert_allclose(grad[support], -lam * np.sign(w[support]), atol=1e-10)
    assert np.all(np.abs(grad[~support]) <= lam + 1e-12)


def test_lasso_finite_differences_and_closed_form(lasso):
    fn, log_l1, _, sol, grad = lasso
    train, val, _ = diabetes()
    fd = _fd(lambda h: fn(h)[0], log_l1, 1.0)
    assert abs(float(grad) - fd) <= 1e-7 * abs(fd)
    # dw_S/dλ = -(X_Sᵀ X_S / n)⁻¹ sign(w_S), times dλ/dlog λ = λ.
    w = np.asarray(sol.params)
    support = w != 0
    X = np.asarray(train[0])[:, support]
    dw = np.zeros(10)
    dw[support] = -np.linalg.solve(X.T @ X / len(X), np.sign(w[support])) * np.exp(log_l1)
    closed = float(np.asarray(jax.grad(mse)(sol.params, None, val)) @ dw)
    assert abs(float(grad) - closed) <= 1e-10 * abs(closed)


def test_elastic_net_closed_form():
    fn = jax.jit(validation(enet_prox))
    log_reg = jnp.log(jnp.asarray([0.05, 0.3]))
    (value, sol), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(log_reg)
    train, val, _ = diabetes()
    w = np.asarray(sol.params)
    support = w != 0
    assert 2 <= support.sum() < 10
    l1, l2 = np.exp(np.asarray(log_reg))
    X, y = np.asarray(train[0]), np.asarray(train[1])
    XS = X[:, support]
    A = XS.T @ XS / len(X) + l2 * np.eye(support.sum())
    # The solution on its support is a closed form, and so is its derivative.
    np.testing.assert_allclose(
        w[support], np.linalg.solve(A, XS.T @ y / len(X) - l1 * np.sign(w[support])), rtol=1e-9
    )
    dw = np.zeros((10, 2))
    dw[support, 0] = -np.linalg.solve(A, np.sign(w[support])) * l1
    dw[support, 1] = -np.linalg.solve(A, w[support]) * l2
    closed = np.asarray(jax.grad(mse)(sol.params, None, val)) @ dw
    assert relerr(grad, closed) <= 1e-9
    direction = jnp.asarray([0.6, -0.8])
    fd = _fd(lambda h: fn(h)[0], log_reg, direction)
    assert abs(float(grad @ direction) - fd) <= 1e-6 * abs(fd)


def test_unrolled_converges_to_implicit(lasso):
    _, log_l1, _, _, implicit = lasso
    train, val, step = diabetes()
    solver = bx.ProximalGradient(step, lasso_prox)
    errors = []
    for steps in (10, 100, 1000):
        _, unrolled = bx.unrolled_hypergrad(
            mse, mse, jnp.zeros(10), log_l1, train, val, solver=solver, num_steps=steps
        )
        errors.append(abs(float(unrolled - implicit)) / abs(float(implicit)))
    assert errors[0] > 1e-2
    assert errors[-1] < 1e-9
    assert errors[0] > errors[1] > errors[2]


def test_forward_equals_reverse(lasso):
    fn, log_l1, _, _, grad = lasso
    _, forward = jax.jvp(lambda h: fn(h)[0], (log_l1,), (jnp.ones_like(log_l1),))
    assert abs(float(forward - grad)) <= 1e-12 * abs(float(grad))


@pytest.mark.slow
def test_hessian(lasso):
    fn, log_l1, _, _, _ = lasso
    value_fn = lambda h: fn(h)[0]
    hessian = jax.hessian(value_fn)(log_l1)
    eps = 1e-5
    fd = (jax.grad(value_fn)(log_l1 + eps) - jax.grad(value_fn)(log_l1 - eps)) / (2 * eps)
    assert abs(float(hessian - fd)) <= 1e-6 * abs(float(fd))


@pytest.mark.parametrize(
    "adjoint",
    [
        pytest.param(bx.ImplicitAdjoint(), marks=pytest.mark.slow),
        pytest.param(bx.ImplicitAdjoint(lx.GMRES(rtol=1e-12, atol=1e-12)), marks=pytest.mark.slow),
    ],
)
def test_iterative_linear_solvers(lasso, adjoint):
    """`lx.CG` runs on the normal equations (the fixed-point Jacobian is not symmetric)."""
    _, log_l1, _, _, grad = lasso
    other = jax.grad(lambda h: validation(lasso_prox, adjoint)(h)[0])(log_l1)
    assert abs(float(other - grad)) <= 1e-6 * abs(float(grad))


@pytest.mark.slow
def test_unaccelerated_matches(lasso):
    _, log_l1, value, _, grad = lasso
    (other_value, sol), other = jax.value_and_grad(
        validation(lasso_prox, acceleration=False), has_aux=True
    )(log_l1)
    assert sol.result == bx.RESULTS.successful
    assert abs(float(other_value - value)) <= 1e-10
    assert abs(float(other - grad)) <= 1e-8 * abs(float(grad))


# Constrained and group-sparse problems: a ridge-like smooth part, hyperparameters that move
# the solution on a face of the constraint set, checked against finite differences.
def _smooth(w, hparams, data):
    X, y = data
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.05 * jnp.sum(hparams["shift"] * w)


CASES = {
    "group_lasso": (
        bx.ProximalGradient,
        lambda w, h, s: bx.prox_group_lasso(w, jnp.exp(h["log_reg"]), s),
    ),
    "non_negative": (
        bx.ProjectedGradient,
        lambda w, h: optax.projections.projection_non_negative(w),
    ),
    "box": (
        bx.ProjectedGradient,
        lambda w, h: optax.projections.projection_box(w, -jnp.exp(h["log_reg"]), 0.2),
    ),
    "simplex": (bx.ProjectedGradient, lambda w, h: optax.projections.projection_simplex(w)),
    "l2_ball": (
        bx.ProjectedGradient,
        lambda w, h: optax.projections.projection_l2_ball(w, jnp.exp(h["log_reg"])),
    ),
}
SLOW_CASES = ("group_lasso", "non_negative", "box", "l2_ball")


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=pytest.mark.slow if case in SLOW_CASES else ()) for case in CASES],
)
def test_constrained_finite_differences(case):
    cls, operator = CASES[case]
    rng = np.random.default_rng(0)
    X, y = jnp.asarray(rng.normal(size=(40, 6))), jnp.asarray(rng.normal(size=40))
    Xv, yv = jnp.asarray(rng.normal(size=(30, 6))), jnp.asarray(rng.normal(size=30))
    step = 1 / float(np.linalg.eigvalsh(np.asarray(X.T @ X) / 40).max())
    hparams = {"shift": jnp.asarray(rng.normal(size=6)), "log_reg": jnp.asarray(np.log(0.3))}
    solver = cls(step, operator)

    @jax.jit
    def fn(hparams):
        sol = bx.inner_solve(
            _smooth,
            jnp.full(6, 1 / 6),
            hparams,
            (X, y),
            solver=solver,
            tol=1e-12,
            max_steps=50_000,
            adjoint=LU,
        )
        return mse(sol.params, None, (Xv, yv)), sol

    (_, sol), grad = jax.value_and_grad(fn, has_aux=True)(hparams)
    assert sol.result == bx.RESULTS.successful
    direction = {"shift": jnp.asarray(rng.normal(size=6)), "log_reg": jnp.asarray(0.7)}
    fd = _fd(lambda t: fn(jax.tree.map(lambda h, d: h + t * d, hparams, direction))[0], 0.0, 1.0)
    analytic = sum(
        float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))
    )
    assert abs(analytic - fd) <= 1e-6 * abs(fd) + 1e-10
    assert abs(fd) > 1e-4  # the check is not vacuous


@pytest.mark.slow
def test_simplex_data_reweighting():
    """Example weights p on the simplex as hyperparameters of a weighted ridge regression: the
    implicit hypergradient against finite differences along a direction in the simplex's
    tangent space, and one projected outer step lowers the validation loss."""
    train, val, _ = diabetes()
    X, y = train[0][:60], train[1][:60]
    weights = jnp.full(60, 1 / 60)
    step = 1 / (float(np.linalg.eigvalsh(np.asarray(X.T @ X) / 60).max()) + 1e-2)

    def weighted(w, p, data):
        X, y = data
        return 0.5 * jnp.sum(p * (X @ w - y) ** 2) + 0.5e-2 * jnp.sum(w**2)

    @jax.jit
    def fn(p):
        sol = bx.inner_solve(
            weighted,
            jnp.zeros(10),
            p,
            (X, y),
            solver=bx.GradientDescent(step),
            tol=1e-12,
            max_steps=20_000,
            adjoint=LU,
        )
        return mse(sol.params, None, val)

    grad = jax.grad(fn)(weights)
    direction = jnp.asarray(np.random.default_rng(1).normal(size=60))
    direction = direction - direction.mean()
    fd = _fd(fn, weights, direction, eps=1e-7)
    assert abs(float(grad @ direction) - fd) <= 1e-6 * abs(fd)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float here
        stepped = optax.projections.projection_simplex(weights - 1e-2 * grad)
    assert float(fn(stepped)) < float(fn(weights))


@pytest.mark.slow
def test_jaxopt_hypergradient(lasso):
    """jaxopt's implicit derivative of its own lasso solution equals bilevax's."""
    jaxopt, solve_lu, prox_lasso = _jaxopt()
    _, log_l1, _, _, grad = lasso
    train, val, step = diabetes()
    solver = jaxopt.ProximalGradient(
        fun=lambda w, data: mse(w, None, data),
        prox=prox_lasso,
        stepsize=step,
        maxiter=20_000,
        tol=1e-12,
        implicit_diff=True,
        implicit_diff_solve=solve_lu,
    )
    validation = lambda h: mse(solver.run(jnp.zeros(10), jnp.exp(h), train).params, None, val)
    assert abs(float(jax.grad(validation)(log_l1) - grad)) <= 1e-9 * abs(float(grad))


def test_bad_arguments():
    with pytest.raises(TypeError, match="`prox`"):
        bx.ProximalGradient(0.1, prox=3.0)
    with pytest.raises(TypeError, match="`projection`"):
        bx.ProjectedGradient(0.1, projection=None)
    with pytest.raises(TypeError, match="`hyperparams`"):
        bx.prox_elastic_net(jnp.ones(3), 0.1)


def _jaxopt():
    jaxopt = pytest.importorskip("jaxopt")
    from jaxopt.linear_solve import solve_lu
    from jaxopt.prox import prox_lasso

    return jaxopt, solve_lu, prox_lasso


# tests/experiments/test_lasso_ho.py runs the same programs from the docs by default.
@pytest.mark.slow
def test_jaxopt_lasso_ho_trajectory():
    """The same lasso-HO program, jaxopt's `ProximalGradient(implicit_diff=True)` against
    bilevax's `inner_solve(solver=bx.ProximalGradient(...))`, 20 outer Adam steps: the
    validation-loss trajectories and the final hyperparameter agree to 1e-6."""
    jaxopt, solve_lu, prox_lasso = _jaxopt()
    train, val, step = diabetes()
    loss = lambda w, data: mse(w, None, data)

    jaxopt_solver = jaxopt.ProximalGradient(
        fun=loss,
        prox=prox_lasso,
        stepsize=step,
        maxiter=20_000,
        tol=1e-12,
        implicit_diff=True,
        implicit_diff_solve=solve_lu,
    )

    def jaxopt_validation(log_l1):
        w = jaxopt_solver.run(jnp.zeros(10), jnp.exp(log_l1), train).params
        return loss(w, val)

    bx_solver = bx.ProximalGradient(step, lasso_prox)

    def bx_validation(log_l1):
        w = bx.inner_solve(
            mse,
            jnp.zeros(10),
            log_l1,
            train,
            solver=bx_solver,
            tol=1e-12,
            max_steps=20_000,
            adjoint=LU,
        ).params
        return loss(w, val)

    def outer_loop(validation):
        optimizer = optax.adam(0.2)
        log_l1 = jnp.asarray(np.log(0.2))
        state = optimizer.init(log_l1)
        step_fn = jax.jit(jax.value_and_grad(validation))
        trajectory, grads = [], []
        for _ in range(20):
            value, grad = step_fn(log_l1)
            grads.append(float(grad))
            with jax.numpy_dtype_promotion("standard"):
                updates, state = optimizer.update(grad, state)
            log_l1 = optax.apply_updates(log_l1, updates)
            trajectory.append(float(value))
        return np.asarray(trajectory), np.asarray(grads), float(log_l1)

    jaxopt_trajectory, jaxopt_grads, jaxopt_final = outer_loop(jaxopt_validation)
    bx_trajectory, bx_grads, bx_final = outer_loop(bx_validation)
    # The first hypergradients are taken at the same point: they agree to rounding.
    assert abs(bx_grads[0] - jaxopt_grads[0]) <= 1e-9 * abs(jaxopt_grads[0])
    assert jaxopt_trajectory[-1] < jaxopt_trajectory[0] - 1e-3  # the outer loop does move
    np.testing.assert_allclose(bx_trajectory, jaxopt_trajectory, rtol=0, atol=1e-6)
    assert abs(bx_final - jaxopt_final) <= 1e-6
