r"""The KKT conditions of a constrained inner problem, as an optimality condition for
[`bilevax.implicit_diff`][].

The problem is $\min_x f(x, \theta)$ subject to $h(x, \theta) = 0$ and $g(x, \theta) \le 0$,
with multipliers $\nu$ and $\mu \ge 0$. Its KKT point $(x^*, \nu^*, \mu^*)$ is a root of

$$F(x, \nu, \mu, \theta) = \big(\nabla_x f + J_h^\top \nu + J_g^\top \mu,\; h(x),\;
  \mu \odot g(x)\big),$$

jaxopt's `make_kkt_optimality_fun`. The implicit function theorem applies to $F$ where
complementarity is strict: every inequality is either active with $\mu_i > 0$ or inactive
with $g_i < 0$. Where some $\mu_i = g_i = 0$ (weakly active) the active set changes under an
arbitrarily small perturbation, the solution is not differentiable there, and $\partial F$ is
singular; such a point is reported, never differentiated.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from ._checks import check_callable, check_same_structure
from ._misc import stop_gradient
from ._solution import RESULTS


def kkt_optimality(
    loss: Callable,
    eq_constraints: Callable | None = None,
    ineq_constraints: Callable | None = None,
) -> "KKTOptimality":
    r"""The KKT conditions of $\min_x f(x)$ s.t. $h(x) = 0$, $g(x) \le 0$, as the optimality
    condition of [`bilevax.implicit_diff`][]: jaxopt's `make_kkt_optimality_fun`.

    The solution is the triple `(primal, dual_eq, dual_ineq)` $= (x, \nu, \mu)$ (a tuple, or a
    named tuple such as jaxopt's `KKTSolution`), each a pytree of floating-point arrays
    (`None` for a kind of constraint the problem does not have), and

    $$F\big((x, \nu, \mu), \theta\big) = \big(\nabla_x f + J_h^\top \nu + J_g^\top \mu,\;
      h(x),\; \mu \odot g(x)\big).$$

    $\partial F$ is not symmetric, so `implicit_diff` is used with `symmetric=False` (its
    default): CG on the normal equations, or `lx.GMRES`, `lx.LU()`. Its derivative is that of
    the primal and of both duals, in forward and reverse mode.

    Where the theorem does not apply it reports, through `implicit_diff`'s failure policy (an
    error with `throw=True`, NaN derivatives with `throw=False`), with `tol` the same
    tolerance as `implicit_diff`'s test $\|F\|_2 \le$ `tol`:

    - [`bilevax.RESULTS`][]`.degenerate_complementarity`: some constraint is weakly active,
      $|\mu_i| \le$ `tol` and $|g_i(x)| \le$ `tol`. It becomes active or inactive under an
      arbitrarily small perturbation, so the solution has no derivative there (only one-sided
      ones).
    - `RESULTS.kkt_infeasible`: $\mu_i <$ `-tol` or $g_i(x) >$ `tol`: not a KKT point (the
      residual $F$ may still vanish, with $\mu_i g_i = 0$).

    `check(solution, *args, tol=...)` returns that code itself.

    **Arguments:**

    - `loss`: `(x, *args) -> scalar`, the objective $f$.
    - `eq_constraints`: `(x, *args) -> pytree`, $h$; the problem imposes $h(x) = 0$.
    - `ineq_constraints`: `(x, *args) -> pytree`, $g$; the problem imposes $g(x) \le 0$.

    All three receive the arguments of `solve_fn` after `init` (jaxopt's
    `optimality_fun(params, params_obj, params_eq, params_ineq)` is
    `kkt_optimality(lambda x, po, pe, pi: f(x, po), ...)`).

    **Returns:**

    A [`bilevax.KKTOptimality`][], the function `F(solution, *args)`.

    !!! example

        ```python
        # Projection of θ onto the halfspace aᵀx ≤ b: x* = θ − μ* a.
        loss = lambda x, theta, a, b: 0.5 * jnp.sum((x - theta) ** 2)
        ineq = lambda x, theta, a, b: a @ x - b

        def project(init, theta, a, b):
            mu = jnp.maximum(a @ theta - b, 0.0) / (a @ a)
            return theta - mu * a, None, mu

        project = bx.implicit_diff(project, bx.kkt_optimality(loss, None, ineq))
        x, _, mu = project(None, theta, a, b)
        ```
    """
    check_callable("loss", loss)
    if eq_constraints is not None:
        check_callable("eq_constraints", eq_constraints)
    if ineq_constraints is not None:
        check_callable("ineq_constraints", ineq_constraints)
    return KKTOptimality(loss, eq_constraints, ineq_constraints)


class KKTOptimality(eqx.Module):
    """The KKT conditions of a constrained problem: see [`bilevax.kkt_optimality`][]."""

    loss: Callable
    eq_constraints: Callable | None
    ineq_constraints: Callable | None

    def __call__(self, solution, *args):
        """$F$ at `solution = (primal, dual_eq, dual_ineq)`, with the structure of
        `solution`."""
        primal, dual_eq, dual_ineq = self._unpack(solution, args)

        def lagrangian(x):
            value = self.loss(x, *args)
            if self.eq_constraints is not None:
                value = value + _vdot(dual_eq, self.eq_constraints(x, *args))
            if self.ineq_constraints is not None:
                value = value + _vdot(dual_ineq, self.ineq_constraints(x, *args))
            return value

        stationarity = jax.grad(lagrangian)(primal)
        feasibility = None
        if self.eq_constraints is not None:
            feasibility = self.eq_constraints(primal, *args)
        slackness = None
        if self.ineq_constraints is not None:
            slackness = jax.tree.map(jnp.multiply, dual_ineq, self.ineq_constraints(primal, *args))
        if hasattr(solution, "_fields"):  # a named tuple, as jaxopt's `KKTSolution`
            return type(solution)(stationarity, feasibility, slackness)
        return stationarity, feasibility, slackness

    def inequalities(self, solution, *args) -> PyTree[Array] | None:
        r"""$g(x)$ at the solution's primal (`None` without inequality constraints)."""
        if self.ineq_constraints is None:
            return None
        return self.ineq_constraints(solution[0], *args)

    def check(self, solution, *args, tol: Any) -> RESULTS:
        """Whether the theorem applies at `solution`: `RESULTS.successful`,
        `kkt_infeasible` (a multiplier below `-tol` or a constraint above `tol`) or
        `degenerate_complementarity` (a constraint with $|\\mu_i|$ and $|g_i|$ both at most
        `tol`). Not differentiated."""
        solution, args = stop_gradient((solution, args))
        return complementarity_result(solution[2], self.inequalities(solution, *args), tol)

    def _unpack(self, solution, args):
        if not (isinstance(solution, tuple | list) and len(solution) == 3):
            raise TypeError(
                "the solution differentiated with `kkt_optimality` must be a triple "
                f"`(primal, dual_eq, dual_ineq)`, got {type(solution).__name__}."
            )
        primal, dual_eq, dual_ineq = solution
        out = eqx.filter_eval_shape(self.loss, primal, *args)
        if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == ()):
            raise ValueError(f"`loss` must return a scalar, got {out}.")
        for name, fn, dual, dual_name in (
            ("eq_constraints", self.eq_constraints, dual_eq, "dual_eq"),
            ("ineq_constraints", self.ineq_constraints, dual_ineq, "dual_ineq"),
        ):
            if fn is None:
                if jax.tree.leaves(dual):
                    raise ValueError(
                        f"the solution has a `{dual_name}` but `kkt_optimality` was given no "
                        f"`{name}`: pass `None` as `{dual_name}`."
                    )
                continue
            values = eqx.filter_eval_shape(fn, primal, *args)
            check_same_structure(
                f"`{dual_name}` (the multipliers)", dual, values, f"the output of `{name}`"
            )
        return primal, dual_eq, dual_ineq


def complementarity_result(
    dual_ineq: PyTree[Array] | None, inequalities: PyTree[Array] | None, tol: Any
) -> RESULTS:
    r"""`kkt_infeasible` where some $\mu_i <$ `-tol` or $g_i >$ `tol`, else
    `degenerate_complementarity` where some $|\mu_i|, |g_i| \le$ `tol`, else `successful`.
    A NaN is neither: it is left to the linear solve, which reports it as non-finite."""
    mu = jax.tree.leaves(dual_ineq)
    g = jax.tree.leaves(inequalities)
    if not mu:
        return RESULTS.successful
    infeasible = jnp.asarray(False)
    degenerate = jnp.asarray(False)
    for m, c in zip(mu, g):
        infeasible = infeasible | jnp.any(m < -tol) | jnp.any(c > tol)
        degenerate = degenerate | jnp.any((jnp.abs(m) <= tol) & (jnp.abs(c) <= tol))
    result = RESULTS.where(degenerate, RESULTS.degenerate_complementarity, RESULTS.successful)
    return RESULTS.where(infeasible, RESULTS.kkt_infeasible, result)


def _vdot(a: PyTree[Array], b: PyTree[Array]):
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
