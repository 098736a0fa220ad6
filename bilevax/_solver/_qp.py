r"""A quadratic-program solver, OSQP's ADMM (Stellato et al. 2020), differentiated through
the KKT conditions of the program (`_kkt.py`)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import lineax as lx
from jaxtyping import Array, Float

from .._checks import check_bool, check_int, check_linear_solver, check_real
from .._implicit_diff import attach_derivative
from .._kkt import complementarity_result, kkt_optimality
from .._misc import scalars_as_arrays, stop_gradient, tree_isfinite, tree_norm, tree_where_nan
from .._solution import RESULTS


class QPSolution(eqx.Module):
    r"""The result of [`bilevax.solve_qp`][].

    **Attributes:**

    - `primal`: $x^*$.
    - `dual_eq`: $\nu^*$, the multipliers of $Ax = b$ (`None` without `A`).
    - `dual_ineq`: $\mu^* \ge 0$, the multipliers of $Gx \le h$ (`None` without `G`).
    - `result`: a [`bilevax.RESULTS`][]: `successful`; `degenerate_complementarity` (solved,
        but a constraint is weakly active, so the solution has no derivative: it is NaN, or
        raises); `max_steps_reached` (the last iterate, its derivative NaN);
        `primal_infeasible`, `dual_infeasible` or `nonfinite` (every number NaN).
    - `stats`: `"num_steps"`, `"primal_residual"` $\|Ax - b, (Gx - h)_+\|_\infty$ and
        `"dual_residual"` $\|Qx + c + A^\top\nu + G^\top\mu\|_\infty$ (of the iterate
        before any NaN is put in place), and `"rho"`, ADMM's final step size.
    """

    primal: Float[Array, " n"]
    dual_eq: Float[Array, " m"] | None
    dual_ineq: Float[Array, " p"] | None
    result: RESULTS
    stats: dict[str, Array]


_RUNNING, _CONVERGED, _PRIMAL_INFEASIBLE, _DUAL_INFEASIBLE, _NONFINITE = range(5)


def solve_qp(
    Q: Float[Array, "n n"],
    c: Float[Array, " n"],
    A: Float[Array, "m n"] | None = None,
    b: Float[Array, " m"] | None = None,
    G: Float[Array, "p n"] | None = None,
    h: Float[Array, " p"] | None = None,
    *,
    max_steps: int = 10_000,
    tol=None,
    rho: float = 0.1,
    sigma: float = 1e-6,
    relaxation: float = 1.6,
    adapt_every: int = 25,
    infeasible_tol: float = 1e-5,
    linear_solver: lx.AbstractLinearSolver = lx.LU(),
    throw: bool = False,
) -> QPSolution:
    r"""Solves the convex quadratic program

    $$\min_x \tfrac12 x^\top Q x + c^\top x \quad\text{s.t.}\quad Ax = b,\; Gx \le h$$

    by OSQP's ADMM (jaxopt's `OSQP`), and differentiates its primal and dual solutions with
    respect to `Q, c, A, b, G, h` by the implicit function theorem on its KKT conditions
    ([`bilevax.kkt_optimality`][]): forward and reverse mode, under `jax.jit` and `jax.vmap`.

    The iterations solve one system with $Q + \sigma I + C^\top R\, C$, $C = [A; G]$, by
    Cholesky, refactored when the step size $\rho$ adapts (every `adapt_every` steps, by
    OSQP's rule; $\rho$ is $10^3$ times larger on the equality rows). They stop when
    the primal residual $\|Cx - z\|_\infty$ and the dual residual
    $\|Qx + c + C^\top y\|_\infty$ are at most $\text{tol}\,(1 + \text{scale})$ (OSQP's
    absolute and relative tests, both at `tol`), or when the difference of two iterates is a
    certificate of primal or dual infeasibility (OSQP's tests, at `infeasible_tol`).

    The derivative is taken only at a solution: where the result is not `successful` it is
    NaN (or, with `throw=True`, raises). It does not exist where a constraint is weakly
    active ($\mu_i$ and $(Gx - h)_i$ both within the solve's accuracy of zero): the result
    then says `degenerate_complementarity`.

    **Arguments:**

    - `Q`: an $n \times n$ positive semidefinite matrix (only its symmetric part counts).
    - `c`: a vector of size $n$.
    - `A`, `b`: the equality constraints $Ax = b$, both or neither.
    - `G`, `h`: the inequality constraints $Gx \le h$, both or neither; `h` finite.
    - `max_steps`: the most ADMM steps.
    - `tol`: the stopping test above; by default $10^{-9}$ in float64, $10^{-4}$ below. It
        is absolute where the program's scale is below 1: for a program whose entries are
        small (a loss averaged over many terms), scale it, or tighten `tol`.
    - `rho`, `sigma`, `relaxation`: ADMM's initial step size, its proximal term and its
        over-relaxation in $(0, 2)$ (OSQP's `rho`, `sigma`, `alpha`).
    - `adapt_every`: how often $\rho$ adapts, in steps.
    - `infeasible_tol`: the tolerance of the infeasibility certificates.
    - `linear_solver`: the `lineax` solver of the implicit function theorem's linear system
        (the KKT Jacobian, not symmetric); `lx.LU()` by default, as the program is dense.
    - `throw`: whether a result other than `successful` raises (for
        `degenerate_complementarity`, only once the solution is differentiated) instead of
        being reported with NaN.

    **Returns:**

    A [`bilevax.QPSolution`][].
    """
    Q, c, A, b, G, h = _check_program(Q, c, A, b, G, h)
    check_int("max_steps", max_steps, 1)
    check_int("adapt_every", adapt_every, 1)
    check_real("rho", rho, lower=0, lower_open=True)
    check_real("sigma", sigma, lower=0, lower_open=True)
    check_real("relaxation", relaxation, lower=0, upper=2, lower_open=True, upper_open=True)
    check_real("infeasible_tol", infeasible_tol, lower=0, lower_open=True)
    check_linear_solver(linear_solver)
    check_bool("throw", throw)
    if tol is None:
        tol = 1e-9 if c.dtype == jnp.float64 else 1e-4
    check_real("tol", tol, lower=0, lower_open=True)
    args = (Q, c, A, b, G, h)
    Qs, cs, As, bs, Gs, hs = stop_gradient(args)
    dtype = c.dtype
    n = c.shape[0]
    empty = jnp.zeros((0, n), dtype)
    C = jnp.concatenate([empty if As is None else As, empty if Gs is None else Gs])
    m = 0 if A is None else A.shape[0]
    lower = jnp.concatenate([_or_empty(bs, dtype), jnp.full(C.shape[0] - m, -jnp.inf, dtype)])
    upper = jnp.concatenate([_or_empty(bs, dtype), _or_empty(hs, dtype)])
    is_eq = jnp.arange(C.shape[0]) < m
    x, y, status, stats = _admm(
        (Qs + Qs.T) / 2,
        cs,
        C,
        lower,
        upper,
        is_eq,
        finite=tree_isfinite(args),
        max_steps=max_steps,
        tol=tol,
        rho=rho,
        sigma=sigma,
        relaxation=relaxation,
        adapt_every=adapt_every,
        infeasible_tol=infeasible_tol,
    )
    solution = (x, None if A is None else y[:m], None if G is None else y[m:])
    result = RESULTS.where(status == _CONVERGED, RESULTS.successful, RESULTS.max_steps_reached)
    result = RESULTS.where(status == _PRIMAL_INFEASIBLE, RESULTS.primal_infeasible, result)
    result = RESULTS.where(status == _DUAL_INFEASIBLE, RESULTS.dual_infeasible, result)
    result = RESULTS.where(status == _NONFINITE, RESULTS.nonfinite, result)
    solution = tree_where_nan(status >= _PRIMAL_INFEASIBLE, solution)

    optimality = kkt_optimality(
        _objective, None if A is None else _equalities, None if G is None else _inequalities
    )
    # The theorem's tests (‖F‖₂ and weak activity) at the accuracy the stopping test
    # warrants; a negative tolerance refuses the derivative of an unsuccessful solve.
    accuracy = jnp.maximum(
        tree_norm(optimality(solution, Qs, cs, As, bs, Gs, hs)), 10 * stats["accuracy"]
    )
    degenerate = complementarity_result(
        solution[2], optimality.inequalities(solution, Qs, cs, As, bs, Gs, hs), accuracy
    )
    degenerate = (status == _CONVERGED) & (degenerate == RESULTS.degenerate_complementarity)
    result = RESULTS.where(degenerate, RESULTS.degenerate_complementarity, result)
    root_tol = jnp.where(status == _CONVERGED, accuracy, -1.0)
    if throw:
        solution = result.error_if(
            solution,
            (result != RESULTS.successful) & (result != RESULTS.degenerate_complementarity),
        )
    solution = attach_derivative(
        solution,
        optimality,
        args,
        name="the QP's KKT conditions",
        linear_solver=linear_solver,
        symmetric=False,
        throw=throw,
        tol=root_tol,
    )
    del stats["accuracy"]
    primal, dual_eq, dual_ineq = solution
    return QPSolution(primal, dual_eq, dual_ineq, result, stats)


def _objective(x, Q, c, A, b, G, h):
    return 0.5 * x @ Q @ x + c @ x


def _equalities(x, Q, c, A, b, G, h):
    return A @ x - b


def _inequalities(x, Q, c, A, b, G, h):
    return G @ x - h


def _or_empty(v, dtype):
    return jnp.zeros(0, dtype) if v is None else v


def _inf_norm(v):
    return jnp.max(jnp.abs(v), initial=0.0)


def _admm(
    Q,
    c,
    C,
    lower,
    upper,
    is_eq,
    *,
    finite,
    max_steps,
    tol,
    rho,
    sigma,
    relaxation,
    adapt_every,
    infeasible_tol,
):
    """OSQP's iteration on $\\min \\tfrac12 x^\\top Qx + c^\\top x$ s.t. $l \\le Cx \\le u$,
    from zero. Returns `(x, y, status, stats)`."""
    dtype = c.dtype
    n, k = c.shape[0], C.shape[0]
    scale = jnp.where(is_eq, 1e3, 1.0).astype(dtype)
    eye = jnp.eye(n, dtype=dtype)

    def factor(rho):
        return jnp.linalg.cholesky(Q + sigma * eye + C.T @ ((rho * scale)[:, None] * C))

    def residuals(x, z, y):
        Cx, Qx, Cty = C @ x, Q @ x, C.T @ y
        primal, dual = _inf_norm(Cx - z), _inf_norm(Qx + c + Cty)
        primal_scale = jnp.maximum(_inf_norm(Cx), _inf_norm(z))
        dual_scale = jnp.maximum(jnp.maximum(_inf_norm(Qx), _inf_norm(Cty)), _inf_norm(c))
        return primal, dual, primal_scale, dual_scale

    def infeasibility(dx, dy):
        # OSQP's certificates, on the last change of the iterates, normalised.
        dy_norm = _inf_norm(dy)
        dy = dy / jnp.where(dy_norm > 0, dy_norm, 1.0)
        support = jnp.sum(jnp.where(dy > 0, upper * dy, 0.0) + jnp.where(dy < 0, lower * dy, 0.0))
        primal = (dy_norm > infeasible_tol) & (support < 0) & (_inf_norm(C.T @ dy) < infeasible_tol)
        dx_norm = _inf_norm(dx)
        dx = dx / jnp.where(dx_norm > 0, dx_norm, 1.0)
        Cdx = C @ dx
        bounded = jnp.all(
            jnp.where(upper < jnp.inf, Cdx < infeasible_tol, True)
            & jnp.where(lower > -jnp.inf, Cdx > -infeasible_tol, True)
        )
        dual = (
            (dx_norm > infeasible_tol)
            & (c @ dx < -infeasible_tol)
            & (_inf_norm(Q @ dx) < infeasible_tol)
            & bounded
        )
        return primal, dual

    def body(state):
        step, x, z, y, rho, chol, _, _ = state
        r = rho * scale
        x_tilde = jsl.cho_solve((chol, True), sigma * x - c + C.T @ (r * z - y))
        z_relaxed = relaxation * (C @ x_tilde) + (1 - relaxation) * z
        x_next = relaxation * x_tilde + (1 - relaxation) * x
        z_next = jnp.clip(z_relaxed + y / r, lower, upper)
        y_next = y + r * (z_relaxed - z_next)
        primal, dual, primal_scale, dual_scale = residuals(x_next, z_next, y_next)
        converged = (primal <= tol * (1 + primal_scale)) & (dual <= tol * (1 + dual_scale))
        primal_infeasible, dual_infeasible = infeasibility(x_next - x, y_next - y)
        status = jnp.where(converged, _CONVERGED, _RUNNING)
        status = jnp.where(~converged & primal_infeasible, _PRIMAL_INFEASIBLE, status)
        status = jnp.where(~converged & dual_infeasible, _DUAL_INFEASIBLE, status)
        nonfinite = ~(jnp.all(jnp.isfinite(x_next)) & jnp.all(jnp.isfinite(y_next)))
        status = jnp.where(nonfinite, _NONFINITE, status)
        # OSQP's step-size rule: balance the relative primal and dual residuals.
        tiny = jnp.finfo(dtype).tiny
        ratio = (primal / jnp.maximum(primal_scale, tiny)) / jnp.maximum(
            dual / jnp.maximum(dual_scale, tiny), tiny
        )
        new_rho = jnp.clip(rho * jnp.sqrt(ratio), 1e-6, 1e6)
        adapt = ((step + 1) % adapt_every == 0) & ((new_rho > 5 * rho) | (new_rho < rho / 5))
        adapt = adapt & (status == _RUNNING)
        rho, chol = jax.lax.cond(adapt, lambda: (new_rho, factor(new_rho)), lambda: (rho, chol))
        return step + 1, x_next, z_next, y_next, rho, chol, status, (primal, dual)

    def cond(state):
        step, *_, status, _ = state
        return (step < max_steps) & (status == _RUNNING)

    rho = jnp.asarray(rho, dtype)
    zero = jnp.zeros((), dtype)
    z0 = jnp.clip(jnp.zeros(k, dtype), lower, upper)
    status0 = jnp.where(finite, _RUNNING, _NONFINITE)
    init = (
        0,
        jnp.zeros(n, dtype),
        z0,
        jnp.zeros(k, dtype),
        rho,
        factor(rho),
        status0,
        (zero, zero),
    )
    step, x, z, y, rho, _, status, _ = jax.lax.while_loop(cond, body, init)
    primal, dual, primal_scale, dual_scale = residuals(x, z, y)
    accuracy = tol * (1 + jnp.maximum(primal_scale, dual_scale))
    feasibility = jnp.maximum(_inf_norm(C @ x - jnp.clip(C @ x, lower, upper)), 0.0)
    stats = {
        "num_steps": step,
        "primal_residual": feasibility,
        "dual_residual": dual,
        "rho": rho,
        "accuracy": accuracy,
    }
    return x, y, status, stats


def _check_program(Q, c, A, b, G, h):
    Q, c, A, b, G, h = scalars_as_arrays((Q, c, A, b, G, h))
    for name, value in (("Q", Q), ("c", c), ("A", A), ("b", b), ("G", G), ("h", h)):
        if value is not None and not eqx.is_inexact_array(value):
            raise TypeError(f"`{name}` must be a floating-point JAX array, got {value!r}.")
    if c.ndim != 1:
        raise ValueError(f"`c` must be a vector, got shape {c.shape}.")
    n = c.shape[0]
    if Q.shape != (n, n):
        raise ValueError(f"`Q` must have shape ({n}, {n}) to match `c`, got {Q.shape}.")
    for matrix, vector, mname, vname in ((A, b, "A", "b"), (G, h, "G", "h")):
        if (matrix is None) != (vector is None):
            raise ValueError(f"give both `{mname}` and `{vname}`, or neither.")
        if matrix is None:
            continue
        if matrix.ndim != 2 or matrix.shape[1] != n:
            raise ValueError(
                f"`{mname}` must be a matrix with {n} columns (the size of `c`), got shape "
                f"{matrix.shape}."
            )
        if vector.shape != (matrix.shape[0],):
            raise ValueError(
                f"`{vname}` must have shape ({matrix.shape[0]},), one entry per row of "
                f"`{mname}`, got {vector.shape}."
            )
    dtypes = {x.dtype for x in (Q, c, A, b, G, h) if x is not None}
    if len(dtypes) > 1:
        raise TypeError(f"`Q, c, A, b, G, h` must share one dtype, got {sorted(map(str, dtypes))}.")
    return Q, c, A, b, G, h
