"""`bx.implicit_diff`: implicit differentiation attached to any solver, from an optimality
condition (jaxopt's `custom_root`) or a fixed-point map (jaxopt's `custom_fixed_point`).
Checked against closed forms, float64 finite differences, forward == reverse mode, Hessians,
and jaxopt's `custom_root`."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
from helpers import relerr

import bilevax as bx


RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(30, 5)))
Y = jnp.asarray(RNG.normal(size=30))
B = jnp.asarray(RNG.normal(size=(5, 5)) / 5)


def ridge_loss(w, lam, X, y):
    return 0.5 * jnp.sum((X @ w - y) ** 2) + 0.5 * lam * jnp.sum(w**2)


def closed_form(init, lam, X, y):
    del init
    return jnp.linalg.solve(X.T @ X + lam * jnp.eye(X.shape[1]), X.T @ y)


def scipy_cg(init, lam, X, y):
    matvec = lambda w: X.T @ (X @ w) + lam * w
    return jax.scipy.sparse.linalg.cg(matvec, X.T @ y, x0=init, tol=1e-14, maxiter=500)[0]


def bfgs(init, lam, X, y):
    fn = lambda w, args: ridge_loss(w, *args)
    solver = optx.BFGS(rtol=1e-13, atol=1e-13)
    return optx.minimise(fn, solver, init, (lam, X, y), max_steps=500).value


def exact_jacobian(lam):
    """dw*/dλ = -(XᵀX + λI)⁻¹ w*."""
    A = X.T @ X + lam * jnp.eye(5)
    return -jnp.linalg.solve(A, closed_form(None, lam, X, Y))


@pytest.mark.slow
@pytest.mark.parametrize(
    "solve_fn, symmetric",
    [
        (closed_form, False),
        (closed_form, True),
        (bfgs, False),
        (scipy_cg, True),
        (bfgs, True),
        (scipy_cg, False),
    ],
)
def test_ridge_any_solver(solve_fn, symmetric):
    solve = bx.implicit_diff(solve_fn, jax.grad(ridge_loss), symmetric=symmetric)
    lam = jnp.asarray(2.0)
    reverse = jax.jacrev(lambda lam: solve(jnp.zeros(5), lam, X, Y))(lam)
    forward = jax.jacfwd(lambda lam: solve(jnp.zeros(5), lam, X, Y))(lam)
    # CG on the normal equations (symmetric=False) is less accurate than CG on H itself.
    tol = 1e-9 if symmetric else 1e-5
    assert relerr(reverse, exact_jacobian(lam)) <= tol
    assert relerr(forward, exact_jacobian(lam)) <= tol


@pytest.mark.slow
def test_derivative_wrt_data_and_closure():
    """Arguments after `init` and arrays the optimality closes over are all differentiated."""
    lam = jnp.asarray(1.5)
    solve = bx.implicit_diff(closed_form, jax.grad(ridge_loss), linear_solver=lx.LU())
    direction = jnp.asarray(RNG.normal(size=X.shape))
    objective = lambda X: jnp.sum(solve(None, lam, X, Y) ** 2)
    exact = lambda X: jnp.sum(closed_form(None, lam, X, Y) ** 2)
    assert jnp.allclose(jax.grad(objective)(X), jax.grad(exact)(X), rtol=1e-10, atol=1e-12)

    def closed_over(X):
        optimality = lambda w, lam, y: jax.grad(ridge_loss)(w, lam, X, y)
        solve = bx.implicit_diff(
            lambda init, lam, y: closed_form(init, lam, X, y), optimality, linear_solver=lx.LU()
        )
        return jnp.sum(solve(None, lam, Y) ** 2)

    assert jnp.allclose(
        jax.jvp(closed_over, (X,), (direction,))[1],
        jax.jvp(exact, (X,), (direction,))[1],
        rtol=1e-10,
    )


@pytest.mark.slow
def test_hessian_through_the_wrapper():
    solve = bx.implicit_diff(closed_form, jax.grad(ridge_loss), symmetric=True)
    target = jnp.asarray(RNG.normal(size=5))
    objective = lambda loglam: jnp.sum((solve(None, jnp.exp(loglam), X, Y) - target) ** 2)
    loglam = 0.3
    # In NumPy: w' = -s A⁻¹w and w'' = -s A⁻¹w + 2s² A⁻²w for A = XᵀX + sI, s = e^loglam.
    s = np.exp(loglam)
    A = np.asarray(X.T @ X) + s * np.eye(5)
    w = np.linalg.solve(A, np.asarray(X.T @ Y))
    Aw = np.linalg.solve(A, w)
    dw, d2w = -s * Aw, -s * Aw + 2 * s**2 * np.linalg.solve(A, Aw)
    reference = 2 * (dw @ dw + (w - np.asarray(target)) @ d2w)
    hessian = float(jax.hessian(objective)(jnp.asarray(loglam)))
    assert abs(hessian - reference) <= 1e-8 * abs(reference)


def contraction(w, theta):
    """A non-symmetric contraction T(w, θ) = tanh(Bw) + θ (‖B‖ < 1)."""
    return jnp.tanh(B @ w) + theta


def iterate(init, theta):
    return jax.lax.fori_loop(0, 200, lambda _, w: contraction(w, theta), init)


def exact_fixed_point_jacobian(theta):
    """dw*/dθ = (I − ∂_w T)⁻¹ ∂_θ T with ∂_θ T = I."""
    w = iterate(jnp.zeros(5), theta)
    return jnp.linalg.inv(jnp.eye(5) - jax.jacobian(contraction)(w, theta))


LINEAR_SOLVERS = [
    pytest.param(lx.CG(rtol=1e-12, atol=1e-12), id="cg (normal equations)"),
    pytest.param(lx.LU(), id="lu", marks=pytest.mark.slow),
    pytest.param(lx.GMRES(rtol=1e-12, atol=1e-12), id="gmres", marks=pytest.mark.slow),
    pytest.param(bx.Neumann(steps=300), id="neumann", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("linear_solver", LINEAR_SOLVERS)
@pytest.mark.slow
def test_fixed_point_non_symmetric(linear_solver):
    theta = jnp.asarray(RNG.normal(size=5))
    exact = exact_fixed_point_jacobian(theta)
    assert not jnp.allclose(exact, exact.T, atol=1e-3)  # the system really is not symmetric
    as_fixed_point = bx.implicit_diff(
        iterate, fixed_point_fn=contraction, linear_solver=linear_solver
    )
    as_root = bx.implicit_diff(
        iterate, lambda w, theta: w - contraction(w, theta), linear_solver=linear_solver
    )
    assert (
        relerr(jax.jacrev(lambda theta: as_fixed_point(jnp.zeros(5), theta))(theta), exact) <= 1e-9
    )
    assert relerr(jax.jacfwd(lambda theta: as_root(jnp.zeros(5), theta))(theta), exact) <= 1e-9


def test_aux_jit_vmap():
    def with_aux(init, lam, X, y):
        w = closed_form(init, lam, X, y)
        return w, {"residual": jnp.linalg.norm(jax.grad(ridge_loss)(w, lam, X, y))}

    solve = bx.implicit_diff(with_aux, jax.grad(ridge_loss), symmetric=True, has_aux=True)
    lams = jnp.asarray([0.5, 1.0, 4.0])
    jac = jax.jit(jax.vmap(jax.jacrev(lambda lam: solve(None, lam, X, Y)[0])))(lams)
    for lam, row in zip(lams, jac):
        assert relerr(row, exact_jacobian(lam)) <= 1e-8
    _, aux = solve(None, lams[0], X, Y)
    assert float(aux["residual"]) <= 1e-10


@pytest.mark.slow
def test_jaxopt_custom_root_oracle():
    jaxopt = pytest.importorskip("jaxopt")
    from jaxopt.linear_solve import solve_lu

    optimality = jax.grad(ridge_loss)
    theirs = jaxopt.implicit_diff.custom_root(optimality, solve=solve_lu)(closed_form)
    ours = bx.implicit_diff(closed_form, optimality, linear_solver=lx.LU())
    lam = jnp.asarray(0.7)
    objective = lambda solve: lambda lam, X: jnp.sum(jnp.sin(solve(None, lam, X, Y)))
    grads_theirs = jax.grad(objective(theirs), argnums=(0, 1))(lam, X)
    grads_ours = jax.grad(objective(ours), argnums=(0, 1))(lam, X)
    assert relerr(grads_ours, grads_theirs) <= 1e-10


@pytest.mark.slow
def test_jaxopt_root_vjp_root_jvp_idioms():
    """The "Coming from jaxopt" page's forms of `root_vjp` and `root_jvp`."""
    pytest.importorskip("jaxopt")
    from jaxopt.implicit_diff import root_jvp, root_vjp
    from jaxopt.linear_solve import solve_lu

    optimality = lambda w, lam: jax.grad(ridge_loss)(w, lam, X, Y)
    lam = jnp.asarray(0.7)
    sol = closed_form(None, lam, X, Y)
    wrapped = bx.implicit_diff(lambda init, *args: init, optimality, linear_solver=lx.LU())
    cotangent = jnp.asarray(RNG.normal(size=5))
    _, vjp = jax.vjp(lambda *args: wrapped(sol, *args), lam)
    theirs = root_vjp(optimality, sol, (lam,), cotangent, solve=solve_lu)
    assert relerr(vjp(cotangent), theirs) <= 1e-10
    _, jvp = jax.jvp(lambda *args: wrapped(sol, *args), (lam,), (jnp.asarray(1.0),))
    theirs = root_jvp(optimality, sol, (lam,), (jnp.asarray(1.0),), solve=solve_lu)
    assert relerr(jvp, theirs) <= 1e-10


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of `optimality_fn` and `fixed_point_fn`"):
        bx.implicit_diff(closed_form)
    with pytest.raises(ValueError, match="exactly one"):
        bx.implicit_diff(closed_form, jax.grad(ridge_loss), fixed_point_fn=contraction)
    with pytest.raises(TypeError, match="`solve_fn`"):
        bx.implicit_diff(3, jax.grad(ridge_loss))
    with pytest.raises(TypeError, match="`linear_solver`"):
        bx.implicit_diff(closed_form, jax.grad(ridge_loss), linear_solver="cg")
    bad = bx.implicit_diff(closed_form, lambda w, lam, X, y: jnp.sum(w))
    with pytest.raises(ValueError, match="`optimality_fn`"):
        bad(None, 1.0, X, Y)
    with pytest.raises(TypeError, match="`throw`"):
        bx.implicit_diff(closed_form, jax.grad(ridge_loss), throw="yes")
    with pytest.raises(TypeError, match="`symmetric`"):
        bx.implicit_diff(closed_form, jax.grad(ridge_loss), symmetric=None)
