"""The logistic-regression HO problems that several benchmarks time, and what belongs to no
contender: the data, an inner solver and reference hypergradients, and bilevax's implicit
hypergradient on them with the CG steps it takes.

- L2-regularised logistic regression with the regularisation as hyperparameter, one strength or
    one per feature (`implicit_vs_jaxopt`, `compile_time`, `ho_loop`, `against_torch`):

        L(w, λ) = mean log-loss(X_train w, y_train) + ½ Σ_i exp(λ_i) w_i²,
        E(w, λ) = mean log-loss(X_val w, y_val),

    on scikit-learn's breast cancer data (d = 30, standardised) and synthetic problems.
- The grouped variant (`forward_vs_reverse`, `unrolled_memory`): feature `i` has the L2 strength
    `exp(lam[group[i]])`, so the number of hyperparameters is a free knob.
"""

import functools

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

import bilevax as bx

from ..problems import log_loss, logistic_loss as inner_loss, logistic_outer as outer_loss


DENSE_MAX_D = 2_000  # dense-Hessian reference up to this size


def grouped_inner_loss(w, lam, data):
    """The grouped variant's inner loss; `data` is `((X, y), group)`."""
    (X, y), group = data
    return log_loss(w, (X, y)) + 0.5 * jnp.sum(jnp.exp(lam[group]) * w**2)


def breast_cancer(seed: int = 0):
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    X, y = X[order], y[order].astype(np.float64)
    n_train = int(0.6 * len(y))
    mean, std = X[:n_train].mean(0), X[:n_train].std(0)
    X = (X - mean) / std
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])


def synthetic(n_train: int, n_val: int, d: int, seed: int = 0):
    """Gaussian features scaled so that E‖x‖² = 10, labels from a noisy linear teacher."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_train + n_val, d)) * np.sqrt(10.0 / d)
    teacher = rng.standard_normal(d)
    logits = X @ teacher / np.sqrt(10.0) * 3.0 + 0.5 * rng.standard_normal(n_train + n_val)
    y = (logits > 0).astype(np.float64)
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])


def make_cases(quick: bool):
    """(name, train, val, log-strength, per_feature) for every problem size."""
    sizes = [("breast_cancer", breast_cancer(), 1e-2)]
    sizes.append(("synthetic_d2000", synthetic(1_000, 500, 2_000), 1e-3))
    if not quick:
        # 400 x 100,000 float64 is 320 MB: one HVP reads it twice, ~0.1 s on 2 cores.
        sizes.append(("synthetic_d100000", synthetic(400, 200, 100_000), 1e-3))
    cases = []
    for name, (train, val), strength in sizes:
        d = train[0].shape[1]
        train = tuple(jnp.asarray(a) for a in train)
        val = tuple(jnp.asarray(a) for a in val)
        scalar = jnp.log(jnp.asarray(strength))
        spread = np.random.default_rng(1).uniform(-1.0, 1.0, d)
        per_feature = jnp.asarray(np.log(strength) + spread)
        cases.append((name, train, val, scalar, False))
        cases.append((name, train, val, per_feature, True))
    return cases


@functools.partial(jax.jit, static_argnames="iterations")
def newton_cg(w, lam, data, iterations: int = 30):
    """Damped Newton with a tight CG solve for the step and a backtracking choice among eight
    step sizes: plain JAX, shared by neither contender."""
    grad = lambda w: jax.grad(inner_loss)(w, lam, data)

    def step(w, _):
        g, hvp = jax.linearize(grad, w)
        direction, _ = jax.scipy.sparse.linalg.cg(hvp, -g, tol=1e-13, maxiter=4 * w.size)
        sizes = 0.5 ** jnp.arange(8.0)
        losses = jax.vmap(lambda t: inner_loss(w + t * direction, lam, data))(sizes)
        losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
        return w + sizes[jnp.argmin(losses)] * direction, None

    w, _ = jax.lax.scan(step, w, None, length=iterations)
    return w, jnp.linalg.norm(grad(w))


def dense_reference(w, lam, train, val):
    """The implicit hypergradient with a dense Hessian and a direct solve."""
    H = jax.hessian(inner_loss)(w, lam, train)
    v = jnp.linalg.solve(H, jax.grad(outer_loss)(w, lam, val))
    mixed = jax.grad(lambda lam: jnp.vdot(jax.grad(inner_loss)(w, lam, train), v))(lam)
    return outer_loss(w, lam, val), jax.grad(outer_loss, argnums=1)(w, lam, val) - mixed


def bilevax_hypergrad(linear_solver):
    def fn(w, lam, train, val):
        return bx.implicit_hypergrad(
            outer_loss, inner_loss, w, lam, train, val, linear_solver=linear_solver
        )

    return fn


def hessian_operator(w, lam, train):
    grad = lambda w, args: jax.grad(inner_loss)(w, *args)
    return lx.JacobianLinearOperator(
        grad, w, (lam, train), tags=(lx.symmetric_tag, lx.positive_semidefinite_tag)
    )


def lineax_steps(linear_solver, w, lam, train, val) -> int:
    """CG iterations lineax takes on the system bilevax solves in reverse mode,
    H x = ∇_w E (the transposed solve; H is symmetric)."""

    @jax.jit
    def steps(w, lam, train, val):
        rhs = jax.grad(outer_loss)(w, lam, val)
        sol = lx.linear_solve(hessian_operator(w, lam, train), rhs, linear_solver, throw=False)
        return sol.stats["num_steps"]

    return int(steps(w, lam, train, val))
