"""Proximal and projected gradient inner solvers, and the implicit derivative of their fixed
point: against float64 finite differences, the closed forms on the active set (lasso, elastic
net), the unrolled derivative as T grows, and jaxopt's `ProximalGradient(implicit_diff=True)`.
"""

import functools

import helpers
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


def _counting(loss):
    """`loss` that counts its evaluations when they run (a callback in a compiled loop runs once
    per iteration; a trace-time counter would count the loop body once)."""
    calls = []

    def counted(w, hparams, data):
        jax.debug.callback(lambda: calls.append(None))
        return loss(w, hparams, data)

    def count(run):
        del calls[:]
        jax.block_until_ready(run())
        jax.effects_barrier()
        return len(calls)

    return counted, count


@pytest.mark.parametrize("adjoint", [LU, bx.UnrolledAdjoint()], ids=["to_tolerance", "unrolled"])
def test_fista_evaluates_one_gradient_per_step(adjoint):
    """Ten more FISTA steps cost ten more gradient evaluations (they cost twenty when the
    driver evaluated the gradient at the iterate for its stopping test and the step another at
    the extrapolated point), as many as unaccelerated steps; the iterates are FISTA's."""
    train, _, step = diabetes()
    counted, count = _counting(mse)
    prox = functools.partial(lasso_prox, log_l1=jnp.asarray(np.log(0.05)))

    def run(acceleration, steps):
        solver = bx.ProximalGradient(step, lambda w, h, s: prox(w, scaling=s), acceleration)
        kwargs = dict(solver=solver, tol=0.0, max_steps=steps, adjoint=adjoint)
        return bx.inner_solve(counted, jnp.zeros(10), None, train, **kwargs)

    for acceleration in (True, False):
        per_ten = count(lambda: run(acceleration, 20).params) - count(
            lambda: run(acceleration, 10).params
        )
        assert per_ten == 10, (acceleration, per_ten)
    # FISTA by hand: w_{k+1} = T(y_k), y_{k+1} = w_{k+1} + (t_k - 1)/t_{k+1} (w_{k+1} - w_k).
    grad = jax.grad(mse)
    w = y = jnp.zeros(10)
    t = 1.0
    for _ in range(20):
        new = prox(y - step * grad(y, None, train), scaling=step)
        t, previous = (1 + np.sqrt(1 + 4 * t**2)) / 2, t
        w, y = new, new + (previous - 1) / t * (new - w)
    np.testing.assert_allclose(run(True, 20).params, w, rtol=0, atol=1e-13)


def test_fista_stopping_state_vmap_and_failure(lasso):
    """The accelerated loop stops on the gradient mapping where its step evaluated the
    gradient; the result is judged at the returned point, tasks of a `vmap` stop on their own
    test, a carried state is accepted, and a diverging solve ends `nonfinite` with NaNs."""
    _, log_l1, _, sol, _ = lasso
    train, _, step = diabetes()
    solver = bx.ProximalGradient(step, lasso_prox)
    solve = functools.partial(bx.inner_solve, mse, jnp.zeros(10), data=train, solver=solver)

    @jax.jit
    def batched(log_l1s, tol):
        return jax.vmap(lambda h: solve(hparams=h, tol=tol, max_steps=20_000))(log_l1s)

    log_l1s = jnp.stack([log_l1, log_l1 + 1.0])
    batch = batched(log_l1s, 1e-12)
    assert batch.stats["num_steps"][0] == sol.stats["num_steps"]
    np.testing.assert_allclose(batch.params[0], sol.params, rtol=0, atol=1e-15)
    alone = solve(hparams=log_l1s[1], tol=1e-12, max_steps=20_000)
    assert batch.stats["num_steps"][1] == alone.stats["num_steps"] != sol.stats["num_steps"]
    assert np.all(np.asarray(batch.result._value) == bx.RESULTS.successful._value)
    # `grad_norm` is the gradient mapping at the returned point, recomputed there.
    mapped = lasso_prox(sol.params - step * jax.grad(mse)(sol.params, None, train), log_l1, step)
    np.testing.assert_allclose(
        sol.stats["grad_norm"], jnp.linalg.norm(sol.params - mapped) / step, rtol=1e-10
    )
    # A looser tolerance stops sooner, at a point that passes it.
    loose = batched(log_l1s, 1e-6)
    assert np.all(loose.stats["grad_norm"] <= 1e-6)
    assert np.all(loose.stats["num_steps"] < batch.stats["num_steps"])
    # Resumed from a finished solve's state, at the solution: no step is needed.
    again = bx.inner_solve(
        mse, sol.params, log_l1, train, solver=solver, tol=1e-12, solver_state=sol.state
    )
    assert again.result == bx.RESULTS.successful and int(again.stats["num_steps"]) <= 1
    # A step of 3/L diverges: the loop stops at the first non-finite value.
    diverged = bx.inner_solve(
        mse,
        jnp.zeros(10),
        log_l1,
        train,
        solver=bx.ProximalGradient(3 * step, lasso_prox),
        tol=1e-12,
        max_steps=20_000,
    )
    assert diverged.result == bx.RESULTS.nonfinite
    assert np.all(np.isnan(diverged.params))
    assert int(diverged.stats["num_steps"]) < 20_000


def test_solution_matches_jaxopt(lasso):
    """The lasso solution equals jaxopt's `ProximalGradient` (FISTA) at the same tolerance."""
    _, log_l1, _, sol, _ = lasso
    train, _, _ = diabetes()
    solver = _jaxopt_lasso_solver(implicit_diff=False)
    with jax.numpy_dtype_promotion("standard"):
        theirs = jax.jit(solver.run)(jnp.zeros(10), jnp.exp(log_l1), train).params
    np.testing.assert_allclose(sol.params, theirs, rtol=0, atol=1e-10)


# Without `prox` (g = 0), `ProximalGradient` is accelerated gradient descent, jaxopt's
# `GradientDescent(acceleration=True)`: its residual is the gradient, differentiated on the
# symmetric path.
@pytest.mark.parametrize("name", ["none", "jaxopt.prox.prox_none"])
def test_identity_prox_is_gradient_descent(name):
    from bilevax._ift import jacobian_operator, optimality_for

    prox = None if name == "none" else _jaxopt()[0].prox.prox_none
    problem = helpers.ridge()
    solver = bx.ProximalGradient(problem.learning_rate, prox)
    args = (problem.inner, problem.hparams, problem.inner_data)
    # The seam that chooses the linear solve: the gradient, its Jacobian the symmetric Hessian.
    optimality, inputs, symmetric = optimality_for(solver, None, *args)
    assert symmetric and solver.residual_is_gradient
    operator = jacobian_operator(optimality, problem.init, inputs, symmetric=symmetric)
    assert lx.is_symmetric(operator) and lx.is_positive_semidefinite(operator)
    # A prox that is not known to be the identity keeps the general (non-symmetric) path.
    assert not optimality_for(bx.ProximalGradient(0.1, lambda w, h, s: w), None, *args)[2]

    cg = bx.ImplicitAdjoint(lx.CG(rtol=1e-13, atol=1e-13))

    def validation(hparams):
        sol = bx.inner_solve(
            problem.inner,
            problem.init,
            hparams,
            problem.inner_data,
            solver=solver,
            tol=1e-13,
            max_steps=10_000,
            adjoint=cg,
        )
        return problem.outer(sol.params, hparams, problem.outer_data), sol

    (_, sol), grad = jax.jit(jax.value_and_grad(validation, has_aux=True))(problem.hparams)
    assert sol.result == bx.RESULTS.successful
    # The stopping residual is the gradient itself, not (w - (w - ηg)) / η, which would lose
    # all its digits near a solution.
    true_grad = jax.grad(problem.inner)(sol.params, problem.hparams, problem.inner_data)
    args = (problem.hparams, problem.inner_data)
    assert solver.residual(problem.inner, sol.params, true_grad, args) is true_grad
    assert relerr(sol.stats["grad_norm"], jnp.linalg.norm(true_grad)) <= 1e-3
    assert relerr(grad, problem.exact_hypergrad(problem.hparams)) <= 1e-8


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
    _, log_l1, _, _, grad = lasso
    train, val, _ = diabetes()
    solver = _jaxopt_lasso_solver(implicit_diff=True)
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


def _jaxopt_lasso_solver(implicit_diff: bool):
    """jaxopt's FISTA on the diabetes lasso, to the tolerance of bilevax's; its implicit
    derivative (if any) by a dense LU solve."""
    jaxopt, solve_lu, prox_lasso = _jaxopt()
    _, _, step = diabetes()
    return jaxopt.ProximalGradient(
        fun=lambda w, data: mse(w, None, data),
        prox=prox_lasso,
        stepsize=step,
        maxiter=20_000,
        tol=1e-12,
        implicit_diff=implicit_diff,
        implicit_diff_solve=solve_lu,
    )


# tests/experiments/test_lasso_ho.py runs the same programs from the docs by default.
@pytest.mark.slow
def test_jaxopt_lasso_ho_trajectory():
    """The same lasso-HO program, jaxopt's `ProximalGradient(implicit_diff=True)` against
    bilevax's `inner_solve(solver=bx.ProximalGradient(...))`, 20 outer Adam steps: the
    validation-loss trajectories and the final hyperparameter agree to 1e-6."""
    train, val, step = diabetes()
    loss = lambda w, data: mse(w, None, data)
    jaxopt_solver = _jaxopt_lasso_solver(implicit_diff=True)

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
