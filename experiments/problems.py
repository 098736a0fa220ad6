"""Problems the experiments and benchmarks share: the ridge and logistic losses, the diabetes
split, a relative error, and the problem zoo that `experiments.hypergrad_diagnostics` measures.
The tests keep their own zoo (`tests/helpers.py`, the same problems and more), so that the
library's tests need nothing from `experiments/`; nothing here imports the tests.

Every zoo problem has an inner loss `L(w, λ, inner_data)`, an outer loss `E(w, λ, outer_data)`,
a starting point, a safe gradient-descent step size, and where one exists a closed form for the
solution and the hypergradient. References are float64. λ is a log strength throughout: the
penalty is `e^λ`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import bilevax as bx


# -- losses ------------------------------------------------------------------------------------


def mse(w, hparams, data):
    """Mean squared error of the linear model `w` on `data = (X, y)` (`hparams` unused)."""
    del hparams
    X, y = data
    return jnp.mean((X @ w - y) ** 2)


def half_mse(w, hparams, data):
    """Half the mean squared error (`hparams` unused)."""
    del hparams
    X, y = data
    return 0.5 * jnp.mean((X @ w - y) ** 2)


def ridge_loss(w, log_l2, data):
    """Per-feature ridge: `½ mean((Xw − y)²) + ½ Σ_i e^{log_l2_i} w_i²`."""
    X, y = data
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(log_l2) * w**2)


def log_loss(w, data):
    """Mean binary log-loss of the linear model `w` on `data = (X, y)`, labels in {0, 1}."""
    X, y = data
    z = X @ w
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z)


def logistic_outer(w, hparams, data):
    """`log_loss` as an outer loss (`hparams` unused)."""
    del hparams
    return log_loss(w, data)


def logistic_loss(w, log_l2, data):
    """Per-feature L2-regularised logistic regression: `log_loss + ½ Σ_i e^{log_l2_i} w_i²`."""
    return log_loss(w, data) + 0.5 * jnp.sum(jnp.exp(log_l2) * w**2)


# -- data --------------------------------------------------------------------------------------


DIABETES_SPLIT = (242, 100, 100)  # train / validation / test


def diabetes(seed: int, split=DIABETES_SPLIT):
    """scikit-learn's bundled diabetes data (442 patients, 10 features) in a random order drawn
    with `seed`, split into `(train, val, test)`, each `(X, y)` in float64 and standardised with
    the training part's mean and standard deviation."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    X, y = X[order], y[order]
    n, m, _ = split
    X = (X - X[:n].mean(0)) / X[:n].std(0)
    y = (y - y[:n].mean()) / y[:n].std()
    part = lambda a, b: (jnp.asarray(X[a:b], jnp.float64), jnp.asarray(y[a:b], jnp.float64))
    return part(0, n), part(n, n + m), part(n + m, None)


def gram_eigenvalues(X) -> np.ndarray:
    """The eigenvalues of `XᵀX / n` (float64 NumPy, ascending): the curvature of a least-squares
    loss, for step sizes."""
    X = np.asarray(X)
    return np.linalg.eigvalsh(X.T @ X / len(X))


# -- optimisation ------------------------------------------------------------------------------


def lbfgsb_from(fun, starts, bounds, maxiter: int = 1000):
    """L-BFGS-B (scipy) on `fun(x) -> (value, gradient)` within `bounds` from each of `starts`,
    to tight tolerances: `(best result, total function evaluations)`. For the closed-form
    optima the experiments measure against."""
    import scipy.optimize

    best, nfev = None, 0
    for x0 in starts:
        options = dict(maxiter=maxiter, ftol=1e-15, gtol=1e-12)
        r = scipy.optimize.minimize(
            fun, x0, jac=True, method="L-BFGS-B", bounds=bounds, options=options
        )
        nfev += r.nfev
        if best is None or r.fun < best.fun:
            best = r
    assert best is not None
    return best, nfev


# -- comparison --------------------------------------------------------------------------------


def relerr(a, b):
    """‖a − b‖ / ‖b‖, the 2-norms over all leaves of two pytrees of one structure: a float
    computed in float64 NumPy, or inside a trace (`jax.jit`, `jax.vmap`) a JAX scalar."""
    a_leaves, b_leaves = jax.tree.leaves(a), jax.tree.leaves(b)
    if any(isinstance(x, jax.core.Tracer) for x in (*a_leaves, *b_leaves)):
        flat = lambda leaves: jnp.concatenate([jnp.ravel(x) for x in leaves])
        if len(b_leaves) == 1:  # one array: exactly `norm(a - b) / norm(b)`
            a_flat, b_flat = a_leaves[0], b_leaves[0]
        else:
            a_flat, b_flat = flat(a_leaves), flat(b_leaves)
        return jnp.linalg.norm(a_flat - b_flat) / jnp.linalg.norm(b_flat)
    flat = lambda leaves: np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
    a_flat, b_flat = flat(a_leaves), flat(b_leaves)
    return float(np.linalg.norm(a_flat - b_flat) / max(np.linalg.norm(b_flat), 1e-300))


# -- the zoo -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    name: str
    inner: Callable
    outer: Callable
    init: Any
    hparams: Any
    inner_data: Any
    outer_data: Any
    learning_rate: float
    exact_params: Callable | None = None  # hparams -> w*(λ)
    exact_hypergrad: Callable | None = None  # hparams -> dE(w*(λ), λ)/dλ
    strongly_convex: bool = True


def ridge(n=60, d=5, seed=0) -> Problem:
    """Per-feature L2: L = ½‖Xw − y‖²/n + ½ Σ exp(λ_i) w_i², E = ½‖X_v w − y_v‖²/n_v."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n + 40, d))
    y = X @ rng.normal(size=d) + 0.3 * rng.normal(size=n + 40)
    train = (jnp.asarray(X[:n]), jnp.asarray(y[:n]))
    val = (jnp.asarray(X[n:]), jnp.asarray(y[n:]))

    def system(lam):
        Xt, yt = train
        return Xt.T @ Xt / n + jnp.diag(jnp.exp(lam)), Xt.T @ yt / n

    def exact_params(lam):
        A, b = system(lam)
        return jnp.linalg.solve(A, b)

    def exact_hypergrad(lam):
        A, _ = system(lam)
        w = exact_params(lam)
        Xv, yv = val
        g = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
        return -jnp.linalg.solve(A, g) * jnp.exp(lam) * w

    lam = jnp.log(jnp.linspace(0.1, 1.0, d))
    lmax = float(np.linalg.eigvalsh(X[:n].T @ X[:n] / n).max()) + 1.0
    return Problem(
        "ridge",
        ridge_loss,
        half_mse,
        jnp.zeros(d),
        lam,
        train,
        val,
        1.0 / lmax,
        exact_params,
        exact_hypergrad,
    )


def logistic(n=80, d=6, seed=1) -> Problem:
    """L2-regularised binary logistic regression, λ = log of the L2 strength; the outer loss is
    the validation log-loss. No closed form: references come from `reference_solution`."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n + 50, d))
    y = (X @ rng.normal(size=d) + 0.5 * rng.normal(size=n + 50) > 0).astype(np.float64)
    train = (jnp.asarray(X[:n]), jnp.asarray(y[:n]))
    val = (jnp.asarray(X[n:]), jnp.asarray(y[n:]))

    def inner(w, lam, data):
        return log_loss(w, data) + 0.5 * jnp.exp(lam) * jnp.sum(w**2)

    lmax = float(np.linalg.eigvalsh(X[:n].T @ X[:n] / n).max()) / 4 + 1.0
    return Problem(
        "logistic",
        inner,
        logistic_outer,
        jnp.zeros(d),
        jnp.log(jnp.asarray(0.1)),
        train,
        val,
        1.0 / lmax,
    )


def quadratic(d=8, condition=1e3, seed=2) -> Problem:
    """Ill-conditioned quadratic: L = ½ wᵀAw − (Bλ)ᵀw with cond(A) = `condition`;
    E = ½‖w − c‖² + ½‖λ‖²·0.01, so w* = A⁻¹Bλ and dE/dλ = BᵀA⁻¹(w* − c) + 0.01 λ."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    A = jnp.asarray(Q @ np.diag(np.geomspace(1.0, condition, d)) @ Q.T)
    A = (A + A.T) / 2
    B = jnp.asarray(rng.normal(size=(d, 3)))
    c = jnp.asarray(rng.normal(size=d))

    def inner(w, lam, data):
        A, B = data
        return 0.5 * w @ A @ w - (B @ lam) @ w

    def outer(w, lam, c):
        return 0.5 * jnp.sum((w - c) ** 2) + 0.005 * jnp.sum(lam**2)

    def exact_params(lam):
        return jnp.linalg.solve(A, B @ lam)

    def exact_hypergrad(lam):
        return B.T @ jnp.linalg.solve(A, exact_params(lam) - c) + 0.01 * lam

    return Problem(
        "quadratic",
        inner,
        outer,
        jnp.zeros(d),
        jnp.asarray([1.0, -0.5, 0.3]),
        (A, B),
        c,
        1.0 / condition,
        exact_params,
        exact_hypergrad,
    )


def mlp(seed=3) -> Problem:
    """A tiny tanh MLP (an Equinox module as the parameters) with per-layer-free L2 strength
    exp(λ); non-convex, so only finite differences and independent loops are references."""
    key_data, key_model = jax.random.split(jax.random.key(seed))
    X = jax.random.normal(key_data, (40, 2))
    y = jnp.sin(X[:, :1] * 2) + X[:, 1:] ** 2
    model = eqx.nn.MLP(2, 1, width_size=6, depth=1, activation=jnp.tanh, key=key_model)

    def inner(model, lam, data):
        X, y = data
        params = eqx.filter(model, eqx.is_inexact_array)
        l2 = sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
        return jnp.mean((jax.vmap(model)(X) - y) ** 2) + 0.5 * jnp.exp(lam) * l2

    def outer(model, lam, data):
        del lam
        X, y = data
        return jnp.mean((jax.vmap(model)(X) - y) ** 2)

    return Problem(
        "mlp",
        inner,
        outer,
        model,
        jnp.log(jnp.asarray(1e-2)),
        (X[:25], y[:25]),
        (X[25:], y[25:]),
        0.2,
        strongly_convex=False,
    )


def scaled_ridge(d=30, n=120, seed=0):
    """Ridge regression whose features span three decades of scale: H is badly conditioned
    because of its diagonal, which Jacobi preconditioning undoes."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(1.0, 1e3, d)
    X = rng.normal(size=(n + 40, d)) * scales
    y = X @ (rng.normal(size=d) / scales) + 0.3 * rng.normal(size=n + 40)
    train = (jnp.asarray(X[:n]), jnp.asarray(y[:n]))
    val = (jnp.asarray(X[n:]), jnp.asarray(y[n:]))
    lam = jnp.full(d, -2.0)

    Xt, yt = train
    A = Xt.T @ Xt / n + jnp.diag(jnp.exp(lam))
    w_star = jnp.linalg.solve(A, Xt.T @ yt / n)
    Xv, yv = val
    g = Xv.T @ (Xv @ w_star - yv) / Xv.shape[0]
    exact = -jnp.linalg.solve(A, g) * jnp.exp(lam) * w_star
    return ridge_loss, half_mse, w_star, lam, train, val, exact, A


def reference_solution(problem: Problem, hparams=None, start=None):
    """w*(λ) by Newton's method on the flattened parameters (dense Hessian, plain JAX) from
    `start` (default `problem.init`): an implementation independent of bilevax's solvers,
    for problems without closed forms."""
    hparams = problem.hparams if hparams is None else hparams
    if problem.exact_params is not None:
        return problem.exact_params(hparams)
    start = problem.init if start is None else start
    float_start, static = eqx.partition(start, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(float_start)
    f = lambda v: problem.inner(eqx.combine(unravel(v), static), hparams, problem.inner_data)
    for _ in range(30):
        flat = flat - jnp.linalg.solve(jax.hessian(f)(flat), jax.grad(f)(flat))
    return eqx.combine(unravel(flat), static)


def reference_hypergrad(problem: Problem, hparams=None, params_star=None):
    """The implicit hypergradient with a dense Hessian and a direct solve (plain JAX), at
    `params_star` (default: `reference_solution`)."""
    hparams = problem.hparams if hparams is None else hparams
    if problem.exact_hypergrad is not None and params_star is None:
        return problem.exact_hypergrad(hparams)
    w = reference_solution(problem, hparams) if params_star is None else params_star
    float_w, static = eqx.partition(w, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(float_w)
    L = lambda v, h: problem.inner(eqx.combine(unravel(v), static), h, problem.inner_data)
    E = lambda v, h: problem.outer(eqx.combine(unravel(v), static), h, problem.outer_data)
    H = jax.hessian(L)(flat, hparams)
    v = jnp.linalg.solve(H, jax.grad(E)(flat, hparams))
    mixed_vjp = jax.grad(lambda h: jnp.vdot(jax.grad(L)(flat, h), v))(hparams)
    return jax.grad(E, argnums=1)(flat, hparams) - mixed_vjp


def implicit(problem: Problem, params_star, **kwargs):
    """`bx.implicit_hypergrad` on a zoo problem at `params_star`."""
    return bx.implicit_hypergrad(
        problem.outer,
        problem.inner,
        params_star,
        problem.hparams,
        problem.inner_data,
        problem.outer_data,
        **kwargs,
    )


ALL = [ridge, logistic, quadratic, mlp]


def diagnose(problem: Problem, params, info, **kwargs):
    """`bx.diagnostics.hypergrad_info` on a zoo problem at `params`, from the
    [`bilevax.HypergradInfo`][] `info` of a hypergradient there."""
    return bx.diagnostics.hypergrad_info(
        problem.outer,
        problem.inner,
        params,
        problem.hparams,
        problem.inner_data,
        problem.outer_data,
        info,
        **kwargs,
    )
